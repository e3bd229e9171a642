"""The HTTP API, LoRAX-compatible, on FastAPI.

    POST /generate, /generate_stream (server-sent events), and POST / (what lorax-client calls:
         a one-element list, or events when "stream" is true)
    POST /v1/completions, /v1/chat/completions   OpenAI style; `model` is the user id
    GET  /health, /info, /metrics (Prometheus)

`parameters.adapter_id` is the user id (or a path whose last part is one, as LoRAX users pass
`serving/current/users/<user>` with `adapter_source="local"`); no adapter id means the base
model. Unknown users are 404, bad parameters and oversized inputs 422, each with a message.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.serving.engine import Engine, Request, Sampling, Token, UnknownUser, event_sink


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class Parameters(BaseModel):
    model_config = ConfigDict(extra="allow")  # lorax-client sends every field, mostly null

    adapter_id: str | None = None
    adapter_source: str | None = None
    max_new_tokens: int | None = Field(default=20, ge=1)
    temperature: float | None = Field(default=None, gt=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    do_sample: bool = False
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    details: bool = False
    return_full_text: bool | None = False
    top_k: int | None = Field(default=None, ge=1)
    ignore_eos_token: bool = False
    best_of: int | None = None

    @field_validator("best_of")
    @classmethod
    def _one(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("best_of > 1 is not supported")
        return value

    @model_validator(mode="after")
    def _nothing_silently_ignored(self) -> Parameters:
        """lorax-client sends every field; those at their neutral value are fine, anything
        else this server does not do is refused by name rather than ignored."""
        neutral = {"repetition_penalty": 1.0, "api_token": None}
        for name, value in (self.model_extra or {}).items():
            if value in (None, False, [], {}) or neutral.get(name, object()) == value:
                continue
            if name == "api_token":
                continue  # adapters are local: there is nothing to authenticate against
            raise ValueError(f"{name}={value!r} is not supported by soppu serve")
        return self


class GenerateRequest(BaseModel):
    inputs: str
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = ""
    prompt: str
    max_tokens: int | None = Field(default=16, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(CompletionRequest):
    prompt: str = ""
    messages: list[ChatMessage]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "soppu_requests",
            "Requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.tokens = Counter("soppu_generated_tokens", "Tokens generated", registry=self.registry)
        self.batch = Histogram(
            "soppu_batch_size",
            "Rows per model step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.latency = Histogram(
            "soppu_request_seconds",
            "Request latency",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.first_token = Histogram(
            "soppu_time_to_first_token_seconds",
            "Time to first token",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
            registry=self.registry,
        )


def create_app(
    engine: Engine,
    info: dict[str, Any],
    *,
    max_input_tokens: int = 1024,
    max_total_tokens: int = 2048,
    metrics: Metrics | None = None,
    lifespan=None,
) -> FastAPI:
    metrics = metrics or Metrics()
    engine.on_step = lambda rows, seconds: metrics.batch.observe(rows)
    app = FastAPI(title="soppu serve", version=info.get("version", ""), lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: HttpRequest, exc: ApiError) -> JSONResponse:
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return JSONResponse({"error": exc.message, "error_type": exc.kind}, exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        metrics.requests.labels(request.url.path, "422").inc()
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        return JSONResponse({"error": problems, "error_type": "validation"}, 422)

    def start(prompt: str, user: str | None, sampling: Sampling) -> tuple[Request, asyncio.Queue]:
        ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ApiError(422, "inputs are empty", "validation")
        if len(ids) > max_input_tokens:
            raise ApiError(
                422, f"inputs are {len(ids)} tokens; at most {max_input_tokens}", "validation"
            )
        if len(ids) + sampling.max_new_tokens > max_total_tokens:
            raise ApiError(
                422,
                f"inputs ({len(ids)}) + max_new_tokens "
                f"({sampling.max_new_tokens}) exceed {max_total_tokens} tokens",
                "validation",
            )
        events: asyncio.Queue = asyncio.Queue()
        request = Request(ids, user, sampling, event_sink(asyncio.get_running_loop(), events))
        try:
            engine.submit(request)
        except UnknownUser:
            raise ApiError(
                404,
                f"no adapter for user {user!r} in serving version {engine.adapters.version}",
                "not_found",
            ) from None
        return request, events

    async def tokens(request: Request, events: asyncio.Queue) -> AsyncIterator[Token]:
        while (event := await events.get()) is not None:
            yield event
        if request.error:
            raise ApiError(500, request.error, "generation")

    async def finished(request: Request, events: asyncio.Queue) -> Request:
        async for _ in tokens(request, events):
            pass
        observe(request)
        return request

    def observe(request: Request) -> None:
        metrics.tokens.inc(len(request.tokens))
        metrics.latency.observe(time.perf_counter() - request.arrived)
        if request.first_token_at is not None:
            metrics.first_token.observe(request.first_token_at - request.arrived)

    def lorax_user(parameters: Parameters) -> str | None:
        if not parameters.adapter_id:
            return None
        if parameters.adapter_source == "local" or "/" in parameters.adapter_id:
            return Path(parameters.adapter_id).name
        return parameters.adapter_id

    def lorax_sampling(p: Parameters) -> Sampling:
        return Sampling(
            max_new_tokens=p.max_new_tokens or 20,
            temperature=p.temperature or 1.0,
            top_p=p.top_p or 1.0,
            top_k=p.top_k,
            do_sample=p.do_sample,
            seed=p.seed,
            stop=tuple(p.stop),
            ignore_eos=p.ignore_eos_token,
        )

    def details(request: Request, with_tokens: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "finish_reason": request.finish_reason,
            "prompt_tokens": len(request.prompt),
            "generated_tokens": len(request.tokens),
            "seed": request.sampling.seed,
        }
        if with_tokens:
            out |= {
                "prefill": [],
                "tokens": [vars(t) for t in request.tokens],
                "best_of_sequences": None,
            }
        return out

    async def generate_body(body: GenerateRequest) -> dict[str, Any]:
        request = await finished(
            *start(body.inputs, lorax_user(body.parameters), lorax_sampling(body.parameters))
        )
        metrics.requests.labels("/generate", "200").inc()
        text = request.text
        if body.parameters.return_full_text:
            text = body.inputs + text
        return {
            "generated_text": text,
            "details": details(request, True) if body.parameters.details else None,
        }

    async def generate_events(body: GenerateRequest) -> StreamingResponse:
        request, events = start(
            body.inputs, lorax_user(body.parameters), lorax_sampling(body.parameters)
        )

        async def stream() -> AsyncIterator[str]:
            async for token in tokens(request, events):
                done = request.finish_reason is not None and token is request.tokens[-1]
                yield _sse(
                    {
                        "token": vars(token),
                        "generated_text": request.text if done else None,
                        "details": details(request, False) if done else None,
                    }
                )
            observe(request)
            metrics.requests.labels("/generate_stream", "200").inc()

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/generate")
    async def generate(body: GenerateRequest) -> dict[str, Any]:
        return await generate_body(body)

    @app.post("/generate_stream")
    async def generate_stream(body: GenerateRequest) -> StreamingResponse:
        return await generate_events(body)

    @app.post("/")
    async def compat_generate(body: GenerateRequest):
        return await generate_events(body) if body.stream else [await generate_body(body)]

    def openai_user(model: str) -> str | None:
        return None if model in ("", info["model_id"]) else model

    def openai_sampling(body: CompletionRequest) -> Sampling:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        temperature = 1.0 if body.temperature is None else body.temperature
        return Sampling(
            max_new_tokens=body.max_tokens or 16,
            temperature=temperature or 1.0,
            top_p=body.top_p or 1.0,
            do_sample=temperature > 0,
            seed=body.seed,
            stop=tuple(stop),
        )

    async def openai(body: CompletionRequest, prompt: str, chat: bool):
        request, events = start(prompt, openai_user(body.model), openai_sampling(body))
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        kind = "chat.completion" if chat else "text_completion"
        base = {"id": ident, "created": int(time.time()), "model": body.model or info["model_id"]}
        if body.stream:
            return StreamingResponse(
                _openai_stream(request, events, tokens, observe, base, kind, chat),
                media_type="text/event-stream",
            )
        await finished(request, events)
        reason = "stop" if request.finish_reason in ("eos_token", "stop_sequence") else "length"
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": request.text}
        else:
            choice["text"] = request.text
        usage = {
            "prompt_tokens": len(request.prompt),
            "completion_tokens": len(request.tokens),
            "total_tokens": len(request.prompt) + len(request.tokens),
        }
        return {**base, "object": kind, "choices": [choice], "usage": usage}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await openai(body, body.prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        return await openai(body, _chat_prompt(engine.tokenizer, body.messages), chat=True)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {}

    @app.get("/info")
    async def get_info() -> dict[str, Any]:
        return {
            **info,
            "serving_version": engine.adapters.version,
            "adapters": len(engine.users),
            "max_input_length": max_input_tokens,
            "max_total_tokens": max_total_tokens,
            "max_batch_size": engine.max_batch,
        }

    @app.get("/metrics")
    async def get_metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _openai_stream(request, events, tokens, observe, base, kind, chat) -> AsyncIterator[str]:
    chunk_kind = "chat.completion.chunk" if chat else kind
    async for token in tokens(request, events):
        done = request.finish_reason is not None and token is request.tokens[-1]
        reason = None
        if done:
            reason = "stop" if request.finish_reason in ("eos_token", "stop_sequence") else "length"
        piece = {"delta": {"content": token.text}} if chat else {"text": token.text}
        yield _sse(
            {
                **base,
                "object": chunk_kind,
                "choices": [{"index": 0, **piece, "finish_reason": reason}],
            }
        )
    observe(request)
    yield "data: [DONE]\n\n"


def _sse(payload: dict[str, Any]) -> str:
    return f"data:{json.dumps(payload)}\n\n"


def _chat_prompt(tokenizer, messages: list[ChatMessage]) -> str:
    turns = [{"role": m.role, "content": m.content} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"
