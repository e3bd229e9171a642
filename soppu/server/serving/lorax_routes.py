"""The LoRAX routes: `POST /generate`, `/generate_stream` (server-sent events) and `POST /`
(what lorax-client calls: a one-element list, or events when "stream" is true)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import StreamingResponse

from soppu.server.serving.engine import Request
from soppu.server.serving.generation import EventStream, Generation, context, sse_event
from soppu.server.serving.schemas import GenerateRequest, lorax_user

router = APIRouter()


@router.post("/generate")
async def generate(http: HttpRequest, body: GenerateRequest) -> dict[str, Any]:
    return await _answer(http, body)


@router.post("/generate_stream")
async def generate_stream(http: HttpRequest, body: GenerateRequest) -> StreamingResponse:
    return await _events(http, body)


@router.post("/")
async def compat_generate(http: HttpRequest, body: GenerateRequest):
    if body.stream:
        return await _events(http, body)
    return [await _answer(http, body)]


async def _start(http: HttpRequest, body: GenerateRequest) -> Generation:
    ctx = context(http)
    key = ctx.caller(http)  # 401 before anything is said about adapters or paths
    base = body.parameters.adapter_id == ctx.info["model_id"]  # the base model, by its id
    asked = None if base else lorax_user(body.parameters, ctx.serving)
    user = ctx.authorize(key, asked, base=base)
    scoring = body.parameters.decoder_input_details
    return await ctx.start(body.inputs, user, body.parameters.sampling(), score_prompt=scoring)


async def _answer(http: HttpRequest, body: GenerateRequest) -> dict[str, Any]:
    request = await (await _start(http, body)).answer(http.receive)
    text = request.text
    if body.parameters.return_full_text:
        text = body.inputs + text
    return {
        "generated_text": text,
        "details": details(request, True, tokenizer=context(http).engine.tokenizer)
        if body.parameters.details
        else None,
    }


async def _events(http: HttpRequest, body: GenerateRequest) -> StreamingResponse:
    generation = await _start(http, body)
    return EventStream(_stream(generation), generation)


async def _stream(generation: Generation) -> AsyncIterator[str]:
    request = generation.request
    async for token in generation.tokens():
        done = request.finish_reason is not None and token is request.tokens[-1]
        yield sse_event(
            {
                "token": vars(token),
                "generated_text": request.text if done else None,
                "details": details(request, False) if done else None,
            }
        )
    if request.error:
        yield sse_event({"error": request.error, "error_type": request.error_kind})


def details(request: Request, with_tokens: bool, tokenizer=None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "finish_reason": request.finish_reason,
        "prompt_tokens": len(request.prompt),
        "generated_tokens": len(request.tokens),
        "seed": request.sampling.seed,
    }
    if with_tokens:
        out |= {
            "prefill": _prefill(request, tokenizer),
            "tokens": [vars(t) for t in request.tokens],
            "best_of_sequences": None,
        }
    return out


def _prefill(request: Request, tokenizer) -> list[dict[str, Any]]:
    """TGI's `decoder_input_details`: each input token with its logprob (the first: null)."""
    if not request.score_prompt:
        return []
    return [
        {"id": i, "text": tokenizer.decode([i]), "logprob": score}
        for i, score in zip(request.prompt, request.prompt_logprobs, strict=True)
    ]
