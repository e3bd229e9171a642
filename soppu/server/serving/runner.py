"""`soppu serve`: the base model, the `current` serving version, the engine, the HTTP app, and a
watcher that swaps in a new version when `current` moves."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from soppu import basemodel
from soppu.server.compressed_store import StoreError
from soppu.server.publish import verify_version
from soppu.server.serving.api import create_app
from soppu.server.serving.asgi import DEFAULT_MAX_BODY
from soppu.server.serving.engine import Engine, VersionMisfit
from soppu.server.serving.keys import KeysFile
from soppu.server.serving.shared_weights import SharedAdapters, load_shared
from soppu.server.versions import ServingVersion, Versions

log = logging.getLogger("soppu.serve")


def current_dir(serving: Path) -> Path:
    return Versions(serving).require_current()


def public_name(model: str) -> str:
    """The base model's id for clients: a Hub id as it is, a local folder by its name only
    (the server's paths are nobody's business)."""
    return Path(model).name if Path(model).expanduser().exists() else model


def base_model_of(version: Path) -> str:
    return ServingVersion(version).base_model


class VersionWatcher:
    """Polls `serving/current`; loads a new version off the engine thread and hands it over.
    A version that does not fit the loaded model is refused once (logged, kept in
    `engine.refused`) and the old one keeps serving; one that fails to load (half-written,
    corrupt) is tried again at the next poll, its reason logged once."""

    def __init__(self, serving: Path, engine: Engine, loaded: Path, interval: float = 1.0):
        self.serving, self.engine, self.loaded, self.interval = serving, engine, loaded, interval
        self._said: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soppu-watcher", daemon=True)

    def start(self) -> VersionWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except VersionMisfit as exc:
                log.error("not switching versions: %s; still serving %s", exc, self.loaded.name)
            except Exception as exc:  # a half-written or bad version: keep serving the old one
                self._say(f"not switching versions: {exc}")

    def poll(self) -> None:
        version = current_dir(self.serving)
        if version == self.loaded or version.name in self.engine.refused:
            return  # refused once already: the engine keeps why
        try:
            verify_version(version)  # versions appear whole: a mismatch is corruption
        except StoreError as exc:
            self.engine.refused[version.name] = str(exc)
            raise VersionMisfit(f"serving version {version.name} is refused: {exc}") from None
        adapters = load_shared(version)
        self.engine.swap(adapters)  # a misfit raises VersionMisfit and is kept in `refused`
        self.loaded = version
        self._said = None
        log.info("serving version %s (%d users)", version.name, len(adapters.users))

    def _say(self, message: str) -> None:
        if message != self._said:
            log.warning("%s", message)
            self._said = message


def build(
    serving: Path,
    base_model: str | None = None,
    *,
    max_batch: int = 64,
    max_wait: float = 0.005,
    watch_interval: float = 1.0,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    keys: Path | None = None,
) -> tuple[FastAPI, Engine]:
    version = current_dir(serving)
    verify_version(version)  # every file it lists, users' PEFT dirs included
    adapters: SharedAdapters = load_shared(version)
    base = basemodel.load(base_model or base_model_of(version))
    engine = Engine(
        base.model,
        base.tokenizer,
        adapters,
        max_batch=max_batch,
        max_wait=max_wait,
        base_model=base_model_of(version),
    )
    info = {
        "model_id": public_name(base.name),
        "model_dtype": str(next(base.model.parameters()).dtype).removeprefix("torch."),
        "model_device_type": next(base.model.parameters()).device.type,
        "version": "soppu",
        "sha": None,
        "docker_label": None,
        "max_concurrent_requests": max_batch,
    }
    max_positions = getattr(base.model.config, "max_position_embeddings", 2048)
    watcher = VersionWatcher(Path(serving), engine, version, watch_interval)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        watcher.start()
        try:
            yield
        finally:
            watcher.stop()
            engine.stop()

    app = create_app(
        engine,
        info,
        max_input_tokens=min(1024, max_positions // 2),
        max_total_tokens=max_positions,
        max_body_bytes=max_body_bytes,
        serving=Path(serving),
        keys=KeysFile(keys) if keys is not None else None,
        lifespan=lifespan,
    )
    app.state.watcher = watcher
    return app, engine


def run(app: FastAPI, engine: Engine, host: str, port: int) -> int:
    """Serve until SIGTERM/SIGINT (uvicorn shuts down gracefully and re-raises the signal)
    or until the engine thread dies; returns the exit status: 1 if the engine died."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30
    )
    server = uvicorn.Server(config)
    if not log.handlers:  # version switches, refusals and engine failures on stderr
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)

    def stop_serving(exc: BaseException) -> None:
        server.should_exit = True  # uvicorn polls it; answered requests drain first

    engine.on_death = stop_serving
    server.run()
    if engine.died is not None:
        log.critical("exiting: %s", engine.why_stopped())
        return 1
    return 0 if server.started else 1
