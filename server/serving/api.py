"""The HTTP API, LoRAX-compatible, on FastAPI.

    POST /generate, /generate_stream (server-sent events), and POST / (what lorax-client calls:
         a one-element list, or events when "stream" is true)
    POST /v1/completions, /v1/chat/completions   OpenAI style; `model` is the user id
    GET  /health, /info, /metrics (Prometheus)

`parameters.adapter_id` is the user id, or (adapter_source "local") the path of a published
user dir inside the serving dir; no adapter id means the base model. Unknown users are 404,
bad parameters and oversized inputs 422, bodies over the limit 413, a stopped engine 503;
every error is one JSON line `{"error": message, "error_type": kind}`, in a stream too.

Prompts are tokenised off the event loop, so a long one never stalls other requests. A
client that goes away (a closed stream, a dropped connection while waiting) cancels its
request: its row leaves the batch at the engine's next step.
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
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from server.serving.asgi import DEFAULT_MAX_BODY, BodyLimit, CountRequests, Metrics
from server.serving.engine import Engine, EngineStopped, Request, Sampling, Token, UnknownUser
from server.serving.request import event_sink, one_line
from server.serving.schemas import (
    ApiError,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    GenerateRequest,
    lorax_user,
)

STATUS = {"generation": 500, "not_found": 404, "unavailable": 503}  # engine error kinds


def create_app(
    engine: Engine,
    info: dict[str, Any],
    *,
    max_input_tokens: int = 1024,
    max_total_tokens: int = 2048,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    serving: Path | None = None,
    metrics: Metrics | None = None,
    lifespan=None,
) -> FastAPI:
    metrics = metrics or Metrics()
    metrics.watch(engine)
    app = FastAPI(title="soppu serve", version=info.get("version", ""), lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(CountRequests, metrics=metrics, routes=lambda: _paths(app))
    _error_handlers(app)

    def encode(prompt: str) -> list[int]:
        try:
            prompt.encode("utf-8")  # JSON may carry lone surrogates, which no tokenizer takes
            return engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        except Exception as exc:
            raise ApiError(
                422, f"inputs cannot be tokenised: {one_line(exc)}", "validation"
            ) from None

    async def start(prompt: str, user: str | None, sampling: Sampling) -> Generation:
        ids = await asyncio.to_thread(encode, prompt)  # a long prompt takes seconds
        _check_lengths(len(ids), sampling.max_new_tokens, max_input_tokens, max_total_tokens)
        events: asyncio.Queue = asyncio.Queue()
        request = Request(ids, user, sampling, event_sink(asyncio.get_running_loop(), events))
        try:
            engine.submit(request)
        except UnknownUser:
            version = engine.adapters.version
            message = f"no adapter for user {user!r} in serving version {version}"
            raise ApiError(404, message, "not_found") from None
        except EngineStopped as exc:
            raise ApiError(503, str(exc), "unavailable") from None
        return Generation(engine, request, events)

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

    async def lorax_start(body: GenerateRequest) -> Generation:
        user = lorax_user(body.parameters, serving)
        return await start(body.inputs, user, body.parameters.sampling())

    async def generate_body(http: HttpRequest, body: GenerateRequest) -> dict[str, Any]:
        request = await (await lorax_start(body)).answer(http.receive)
        text = request.text
        if body.parameters.return_full_text:
            text = body.inputs + text
        return {
            "generated_text": text,
            "details": details(request, True) if body.parameters.details else None,
        }

    async def generate_events(body: GenerateRequest) -> StreamingResponse:
        generation = await lorax_start(body)
        request = generation.request

        async def stream() -> AsyncIterator[str]:
            async for token in generation.tokens():
                done = request.finish_reason is not None and token is request.tokens[-1]
                yield _sse(
                    {
                        "token": vars(token),
                        "generated_text": request.text if done else None,
                        "details": details(request, False) if done else None,
                    }
                )
            if request.error:
                yield _sse({"error": request.error, "error_type": request.error_kind})

        return EventStream(stream(), generation)

    @app.post("/generate")
    async def generate(http: HttpRequest, body: GenerateRequest) -> dict[str, Any]:
        return await generate_body(http, body)

    @app.post("/generate_stream")
    async def generate_stream(body: GenerateRequest) -> StreamingResponse:
        return await generate_events(body)

    @app.post("/")
    async def compat_generate(http: HttpRequest, body: GenerateRequest):
        if body.stream:
            return await generate_events(body)
        return [await generate_body(http, body)]

    def openai_user(model: str) -> str | None:
        return None if model in ("", info["model_id"]) else model

    async def openai(http: HttpRequest, body: CompletionRequest, prompt: str, chat: bool):
        generation = await start(prompt, openai_user(body.model), body.sampling())
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        kind = "chat.completion" if chat else "text_completion"
        base = {"id": ident, "created": int(time.time()), "model": body.model or info["model_id"]}
        if body.stream:
            return EventStream(_openai_stream(generation, base, kind, chat), generation)
        request = await generation.answer(http.receive)
        choice: dict[str, Any] = {"index": 0, "finish_reason": _reason(request), "logprobs": None}
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
    async def completions(http: HttpRequest, body: CompletionRequest):
        return await openai(http, body, body.prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest, body: ChatRequest):
        prompt = await asyncio.to_thread(_chat_prompt, engine.tokenizer, body.messages)
        return await openai(http, body, prompt, chat=True)

    @app.get("/health")
    async def health():
        serving_now = engine.pending_adapters or engine.adapters
        state = {
            "version": serving_now.version,
            "users": len(serving_now.users),
            "engine_alive": engine.alive,
            "refused_versions": engine.refused,
        }
        if not engine.alive:
            failure = {"error": engine.why_stopped(), "error_type": "unavailable"}
            return JSONResponse({**failure, **state}, 503)
        return state

    @app.get("/info")
    async def get_info() -> dict[str, Any]:
        return {
            **info,
            "serving_version": engine.adapters.version,
            "adapters": len(engine.users),
            "max_input_length": max_input_tokens,
            "max_total_tokens": max_total_tokens,
            "max_batch_size": engine.max_batch,
            "max_body_bytes": max_body_bytes,
        }

    @app.get("/metrics")
    async def get_metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class Generation:
    """A submitted request, read by its HTTP handler as its tokens come."""

    def __init__(self, engine: Engine, request: Request, events: asyncio.Queue):
        self.engine, self.request, self.events = engine, request, events

    async def tokens(self) -> AsyncIterator[Token]:
        """Its tokens; a reader that stops early (a stream whose client left is cancelled by
        Starlette) cancels the request in the engine."""
        try:
            while (event := await self.events.get()) is not None:
                yield event
        finally:
            self.close()

    def close(self) -> None:
        """Cancel the request in the engine unless it has finished."""
        if self.request.finish_reason is None:
            self.engine.cancel(self.request)

    async def answer(self, receive: Receive) -> Request:
        """The finished request; raises its error, or 499 if the client left first."""
        finished = asyncio.ensure_future(self._finished())
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not finished.done():
                finished.cancel()
                self.close()
        if not finished.done() or finished.cancelled():
            raise ApiError(499, "the client closed the connection", "cancelled")
        if self.request.error:
            kind = self.request.error_kind
            raise ApiError(STATUS.get(kind, 500), self.request.error, kind)
        return self.request

    async def _finished(self) -> None:
        async for _ in self.tokens():
            pass


async def _disconnected(receive: Receive) -> None:
    """Returns once the client is gone (the body was read already: nothing else comes)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _check_lengths(prompt: int, new: int, max_input: int, max_total: int) -> None:
    if not prompt:
        raise ApiError(422, "inputs are empty", "validation")
    if prompt > max_input:
        raise ApiError(422, f"inputs are {prompt} tokens; at most {max_input}", "validation")
    if prompt + new > max_total:
        raise ApiError(
            422,
            f"inputs ({prompt}) + max_new_tokens ({new}) exceed {max_total} tokens",
            "validation",
        )


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: HttpRequest, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "; ".join(_problem(e) for e in exc.errors()), "validation")

    @app.exception_handler(HTTPException)
    async def _http(_: HttpRequest, exc: HTTPException) -> JSONResponse:
        kind = "too_large" if exc.status_code == 413 else "http"
        return _error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def _internal(_: HttpRequest, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {one_line(exc)}", "internal")


def _problem(error: dict[str, Any]) -> str:
    if error.get("type") == "json_invalid":
        return f"the body is not JSON: {error.get('ctx', {}).get('error', 'invalid')}"
    where = ".".join(str(p) for p in error["loc"][1:]) or "body"
    return f"{where}: {error['msg']}"


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": kind}, status)


def _paths(app: FastAPI) -> set[str]:
    return {getattr(route, "path", "") for route in app.routes}


def _reason(request: Request) -> str:
    return "stop" if request.finish_reason in ("eos_token", "stop_sequence") else "length"


class EventStream(StreamingResponse):
    """Server-sent events; once the response ends, by its last event or because Starlette
    saw the client leave and cancelled it, an unfinished request is cancelled in the engine."""

    def __init__(self, events: AsyncIterator[str], generation: Generation):
        super().__init__(events, media_type="text/event-stream")
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()


async def _openai_stream(
    generation: Generation, base: dict[str, Any], kind: str, chat: bool
) -> AsyncIterator[str]:
    request = generation.request
    chunk_kind = "chat.completion.chunk" if chat else kind
    async for token in generation.tokens():
        done = request.finish_reason is not None and token is request.tokens[-1]
        piece = {"delta": {"content": token.text}} if chat else {"text": token.text}
        choice = {"index": 0, **piece, "finish_reason": _reason(request) if done else None}
        yield _sse({**base, "object": chunk_kind, "choices": [choice]})
    if request.error:
        yield _sse({"error": request.error, "error_type": request.error_kind})
    yield "data: [DONE]\n\n"


def _sse(payload: dict[str, Any]) -> str:
    return f"data:{json.dumps(payload)}\n\n"


def _chat_prompt(tokenizer, messages: list[ChatMessage]) -> str:
    turns = [{"role": m.role, "content": m.content} for m in messages]
    if not getattr(tokenizer, "chat_template", None):
        return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # the model's template refuses these turns (roles, order)
        raise ApiError(422, f"messages: {one_line(exc)}", "validation") from None
