"""The OpenAI-style routes: `POST /v1/completions` and `/v1/chat/completions` (streaming
too); `model` is the user id (empty or the base model's id: the base model)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi import Request as HttpRequest

from soppu.server.serving.engine import Request
from soppu.server.serving.generation import EventStream, Generation, context, sse_event
from soppu.server.serving.request import one_line
from soppu.server.serving.schemas import ApiError, ChatMessage, ChatRequest, CompletionRequest

router = APIRouter()


@router.get("/v1/models")
async def models(http: HttpRequest) -> dict[str, Any]:
    """The base model and the users' adapters this caller may use (with API keys: their own,
    or every one for an admin key), as OpenAI lists models; `id` is what `model` takes."""
    ctx = context(http)
    key = ctx.caller(http)
    users = sorted(ctx.engine.users)
    if key is not None and not key.admin:
        users = [u for u in users if u == key.user]
    created = int(time.time())
    entries = [ctx.info["model_id"], *users]
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "soppu"}
            for name in entries
        ],
    }


@router.post("/v1/completions")
async def completions(http: HttpRequest, body: CompletionRequest):
    return await _complete(http, body, body.prompt, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(http: HttpRequest, body: ChatRequest):
    tokenizer = context(http).engine.tokenizer
    prompt = await asyncio.to_thread(_chat_prompt, tokenizer, body.messages)
    return await _complete(http, body, prompt, chat=True)


async def _complete(http: HttpRequest, body: CompletionRequest, prompt: str, chat: bool):
    ctx = context(http)
    model_id = ctx.info["model_id"]
    asked = None if body.model in ("", model_id) else body.model
    user = ctx.authorize(ctx.caller(http), asked, base=body.model == model_id)
    generation = await ctx.start(
        prompt,
        user,
        body.sampling(),
        score_prompt=body.echo and body.logprobs is not None,
        top_logprobs=body.logprobs or 0,
    )
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    kind = "chat.completion" if chat else "text_completion"
    base = {"id": ident, "created": int(time.time()), "model": body.model or model_id}
    if body.stream:
        return EventStream(_stream(generation, base, kind, chat), generation)
    request = await generation.answer(http.receive)
    choice: dict[str, Any] = {"index": 0, "finish_reason": _reason(request), "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": request.text}
    else:
        choice["text"] = prompt + request.text if body.echo else request.text
        if body.logprobs is not None:
            as_ids = body.return_tokens_as_token_ids
            choice["logprobs"] = logprobs(ctx.engine.tokenizer, request, body.echo, as_ids)
    usage = {
        "prompt_tokens": len(request.prompt),
        "completion_tokens": len(request.tokens),
        "total_tokens": len(request.prompt) + len(request.tokens),
    }
    return {**base, "object": kind, "choices": [choice], "usage": usage}


def logprobs(tokenizer, request: Request, echo: bool, as_ids: bool = False) -> dict[str, list]:
    """OpenAI's legacy `logprobs` object: the prompt's tokens first when echoed (the first
    has no logprob: null), then the completion's, with the asked-for alternatives; with
    `as_ids` (vLLM's `return_tokens_as_token_ids`) every token written "token_id:<id>"."""
    ids, scores, tops = [], [], []
    if echo:
        ids += request.prompt
        scores += request.prompt_logprobs
        tops += request.prompt_top or [{}] * len(request.prompt)
    ids += [t.id for t in request.tokens]
    scores += [t.logprob for t in request.tokens]
    tops += request.top or [{}] * len(request.tokens)

    def name(i: int) -> str:
        return f"token_id:{i}" if as_ids else tokenizer.decode([i])

    texts = [tokenizer.decode([i]) for i in ids]
    offsets = [0]
    for text in texts[:-1]:
        offsets.append(offsets[-1] + len(text))
    alternatives = [
        {name(i): v for i, v in top.items()} if request.top_logprobs else None for top in tops
    ]
    if echo and alternatives:
        alternatives[0] = None  # nothing predicts the first token
    return {
        "tokens": [name(i) for i in ids] if as_ids else texts,
        "token_logprobs": scores,
        "top_logprobs": alternatives,
        "text_offset": offsets,
    }


def _reason(request: Request) -> str:
    return "stop" if request.finish_reason in ("eos_token", "stop_sequence") else "length"


async def _stream(
    generation: Generation, base: dict[str, Any], kind: str, chat: bool
) -> AsyncIterator[str]:
    request = generation.request
    chunk_kind = "chat.completion.chunk" if chat else kind
    async for token in generation.tokens():
        done = request.finish_reason is not None and token is request.tokens[-1]
        piece = {"delta": {"content": token.text}} if chat else {"text": token.text}
        choice = {"index": 0, **piece, "finish_reason": _reason(request) if done else None}
        yield sse_event({**base, "object": chunk_kind, "choices": [choice]})
    if request.error:
        yield sse_event(
            {"error": {"message": request.error, "type": request.error_kind, "param": None}}
        )
    yield "data: [DONE]\n\n"


def _chat_prompt(tokenizer, messages: list[ChatMessage]) -> str:
    turns = [{"role": m.role, "content": m.content} for m in messages]
    if not getattr(tokenizer, "chat_template", None):
        return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # the model's template refuses these turns (roles, order)
        raise ApiError(422, f"messages: {one_line(exc)}", "validation") from None
