"""One request from an HTTP handler to the engine and back, over the app's one context:
tokenising off the event loop, length checks, submitting, reading tokens as they come, and
cancelling when the client goes away. The LoRAX and OpenAI routes are mappers over this."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request as HttpRequest
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from soppu.server.serving.asgi import DEFAULT_MAX_BODY, Metrics
from soppu.server.serving.engine import Engine, EngineStopped, Request, Sampling, Token, UnknownUser
from soppu.server.serving.keys import Key, KeysFile
from soppu.server.serving.request import event_sink, one_line
from soppu.server.serving.schemas import ApiError

STATUS = {"generation": 500, "not_found": 404, "unavailable": 503}  # engine error kinds


@dataclass
class AppContext:
    """What every route reads: the engine, the limits, the serving dir and the metrics."""

    engine: Engine
    info: dict[str, Any]
    max_input_tokens: int = 1024
    max_total_tokens: int = 2048
    max_body_bytes: int = DEFAULT_MAX_BODY
    serving: Path | None = None
    metrics: Metrics = field(default_factory=Metrics)
    keys: KeysFile | None = None  # None: no authentication (loopback, or --insecure-no-auth)
    # A prompt longer than this many UTF-8 bytes has more than max_input_tokens tokens however
    # it tokenises (no token spans more bytes than the vocabulary's longest): refused unread
    max_prompt_bytes: int | None = None

    def caller(self, http: HttpRequest) -> Key | None:
        """The request's API key; None when the server runs without keys; 401 without one."""
        if self.keys is None:
            return None
        key = self.keys.check(bearer_token(http))
        if key is None:
            message = "a valid API key is required (Authorization: Bearer <key>)"
            raise ApiError(401, message, "unauthorized")
        return key

    def authorize(self, key: Key | None, requested: str | None, base: bool = False) -> str | None:
        """The user whose adapter the request uses (None: the base model), for the caller's
        `key` (None: a server without keys). A user's key asking for no adapter gets its own,
        asking for the base model (`base`) gets that, and asking for anyone else's gets 403,
        the same answer whether or not that user exists."""
        if key is None:
            return requested
        if requested is None and not base and not key.admin:
            requested = key.user
        if not key.may_use(requested):
            raise ApiError(403, "this API key may not use that adapter", "forbidden")
        return requested

    async def start(
        self,
        prompt: str,
        user: str | None,
        sampling: Sampling,
        *,
        score_prompt: bool = False,
        top_logprobs: int = 0,
    ) -> Generation:
        """Tokenise (in a thread: a long prompt takes seconds), check, submit; `score_prompt`
        asks for each prompt token's logprob, `top_logprobs` for the likeliest alternatives."""
        if self.max_prompt_bytes is not None and len(prompt) > self.max_prompt_bytes // 4:
            size = len(prompt.encode("utf-8", "surrogatepass"))  # before any tokenising
            if size > self.max_prompt_bytes:
                raise ApiError(
                    422,
                    f"inputs are {size:,} bytes: more than {self.max_input_tokens} tokens "
                    f"however they tokenise (at most {self.max_prompt_bytes:,} bytes)",
                    "validation",
                )
        ids = await asyncio.to_thread(self._encode, prompt)
        _check_lengths(
            len(ids), sampling.max_new_tokens, self.max_input_tokens, self.max_total_tokens
        )
        events: asyncio.Queue = asyncio.Queue()
        sink = event_sink(asyncio.get_running_loop(), events)
        request = Request(
            ids, user, sampling, sink, score_prompt=score_prompt, top_logprobs=top_logprobs
        )
        try:
            self.engine.submit(request)
        except UnknownUser:
            version = self.engine.adapters.version
            message = f"no adapter for user {user!r} in serving version {version}"
            raise ApiError(404, message, "not_found") from None
        except EngineStopped as exc:
            raise ApiError(503, str(exc), "unavailable") from None
        return Generation(self.engine, request, events)

    def _encode(self, prompt: str) -> list[int]:
        try:
            prompt.encode("utf-8")  # JSON may carry lone surrogates, which no tokenizer takes
            return self.engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        except Exception as exc:
            raise ApiError(
                422, f"inputs cannot be tokenised: {one_line(exc)}", "validation"
            ) from None


def bearer_token(http: HttpRequest) -> str | None:
    scheme, _, token = http.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def context(http: HttpRequest) -> AppContext:
    return http.app.state.soppu


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


def sse_event(payload: dict[str, Any]) -> str:
    return f"data:{json.dumps(payload)}\n\n"
