"""The HTTP API, LoRAX-compatible, on FastAPI: the app's wiring.

    POST /generate, /generate_stream (server-sent events), and POST / (what lorax-client calls:
         a one-element list, or events when "stream" is true)        lorax_routes.py
    POST /v1/completions, /v1/chat/completions   OpenAI style; `model` is the user id
                                                                     openai_routes.py
    POST /v1/hidden_states   the base model's hidden states for a split client
                                                                     features_route.py
    GET  /health, /info, /metrics (Prometheus)                       here

`parameters.adapter_id` is the user id, or (adapter_source "local") the path of a published
user dir inside the serving dir; no adapter id means the base model. With API keys
(`--api-keys`, `soppu/server/serving/keys.py`) every generation needs `Authorization: Bearer <key>`
(401 without); a user's key uses that user's adapter when none is named, the base model when
it is named by its id (`/info`'s `model_id`), and gets 403 for anyone else's. Unknown users are 404,
bad parameters and oversized inputs 422, bodies over the limit 413, a stopped engine 503;
every error is one JSON line, `{"error": message, "error_type": kind}` (LoRAX's shape) or on
the OpenAI routes `{"error": {"message", "type", "param", "code"}}` (OpenAI's), in a stream too.

Prompts are tokenised off the event loop, so a long one never stalls other requests. A
client that goes away (a closed stream, a dropped connection while waiting) cancels its
request: its row leaves the batch at the engine's next step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from soppu.server.serving import features_route, lorax_routes, openai_routes
from soppu.server.serving.asgi import DEFAULT_MAX_BODY, BodyLimit, CountRequests, Metrics
from soppu.server.serving.engine import Engine
from soppu.server.serving.generation import AppContext, context
from soppu.server.serving.keys import KeysFile
from soppu.server.serving.request import one_line
from soppu.server.serving.schemas import ApiError, error_body

router = APIRouter()


def create_app(
    engine: Engine,
    info: dict[str, Any],
    *,
    max_input_tokens: int = 1024,
    max_total_tokens: int = 2048,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    serving: Path | None = None,
    metrics: Metrics | None = None,
    keys: KeysFile | None = None,
    lifespan=None,
) -> FastAPI:
    ctx = AppContext(
        engine,
        info,
        max_input_tokens,
        max_total_tokens,
        max_body_bytes,
        serving,
        metrics or Metrics(),
        keys,
        max_input_tokens * longest_token(engine.tokenizer),
    )
    ctx.metrics.watch(engine)
    app = FastAPI(title="soppu serve", version=info.get("version", ""), lifespan=lifespan)
    app.state.soppu = ctx
    app.state.engine, app.state.metrics = engine, ctx.metrics
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(CountRequests, metrics=ctx.metrics, routes=lambda: _paths(app))
    _error_handlers(app)
    for routes in (lorax_routes.router, openai_routes.router, features_route.router, router):
        for route in routes.routes:  # flat on the app, so `_paths` and the metrics see them
            app.add_api_route(route.path, route.endpoint, methods=sorted(route.methods))
    return app


def longest_token(tokenizer) -> int:
    """The most UTF-8 bytes one token of `tokenizer` stands for (a byte-level BPE's vocabulary
    strings hold one character per byte; 4 bytes a character covers any other)."""
    return 4 * max((len(t) for t in tokenizer.get_vocab()), default=1)


@router.get("/health")
async def health(http: HttpRequest):
    engine = context(http).engine
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


@router.get("/info")
async def get_info(http: HttpRequest) -> dict[str, Any]:
    ctx = context(http)
    return {
        **ctx.info,
        "serving_version": ctx.engine.adapters.version,
        "adapters": len(ctx.engine.users),
        "max_input_length": ctx.max_input_tokens,
        "max_total_tokens": ctx.max_total_tokens,
        "max_batch_size": ctx.engine.max_batch,
        "max_body_bytes": ctx.max_body_bytes,
    }


@router.get("/metrics")
async def get_metrics(http: HttpRequest) -> PlainTextResponse:
    registry = context(http).metrics.registry
    return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(http: HttpRequest, exc: ApiError) -> JSONResponse:
        response = _error(http, exc.status, exc.message, exc.kind)
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(http: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        return _error(http, 422, "; ".join(_problem(e) for e in exc.errors()), "validation")

    @app.exception_handler(HTTPException)
    async def _http(http: HttpRequest, exc: HTTPException) -> JSONResponse:
        kind = "too_large" if exc.status_code == 413 else "http"
        return _error(http, exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def _internal(http: HttpRequest, exc: Exception) -> JSONResponse:
        return _error(http, 500, f"internal error: {one_line(exc)}", "internal")


def _problem(error: dict[str, Any]) -> str:
    if error.get("type") == "json_invalid":
        return f"the body is not JSON: {error.get('ctx', {}).get('error', 'invalid')}"
    where = ".".join(str(p) for p in error["loc"][1:]) or "body"
    return f"{where}: {error['msg']}"


def _error(http: HttpRequest, status: int, message: str, kind: str) -> JSONResponse:
    """One JSON line: OpenAI's shape on its routes (/v1/…), LoRAX's (TGI's) elsewhere."""
    return JSONResponse(error_body(http.url.path, message, kind, status), status)


def _paths(app: FastAPI) -> set[str]:
    return {getattr(route, "path", "") for route in app.routes}
