"""`soppu serve`: the base model, the `current` serving version, the engine, the HTTP app, and a
watcher that swaps in a new version when `current` moves."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from server.publish import CURRENT
from server.serving.api import create_app
from server.serving.engine import Engine
from server.serving.shared_lora import SharedAdapters, load_shared
from soppu import basemodel

log = logging.getLogger("soppu.serve")


def current_dir(serving: Path) -> Path:
    link = Path(serving) / CURRENT
    if not link.is_symlink() or not link.resolve().is_dir():
        raise FileNotFoundError(f"{link}: no current serving version (run `soppu publish`)")
    return link.resolve()


def base_model_of(version: Path) -> str:
    return json.loads((version / "manifest.json").read_text())["base_model"]


class VersionWatcher:
    """Polls `serving/current`; loads a new version off the engine thread and hands it over."""

    def __init__(self, serving: Path, engine: Engine, loaded: Path, interval: float = 1.0):
        self.serving, self.engine, self.loaded, self.interval = serving, engine, loaded, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soppu-watcher", daemon=True)

    def start(self) -> VersionWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                version = current_dir(self.serving)
                if version != self.loaded:
                    adapters = load_shared(version)
                    self.engine.swap(adapters)
                    self.loaded = version
                    log.info("serving version %s (%d users)", version.name, len(adapters.users))
            except Exception as exc:  # a half-written or bad version: keep serving the old one
                log.warning("not switching versions: %s", exc)


def build(
    serving: Path,
    base_model: str | None = None,
    *,
    max_batch: int = 64,
    max_wait: float = 0.005,
    watch_interval: float = 1.0,
) -> tuple[FastAPI, Engine]:
    version = current_dir(serving)
    adapters: SharedAdapters = load_shared(version)
    base = basemodel.load(base_model or base_model_of(version))
    engine = Engine(base.model, base.tokenizer, adapters, max_batch=max_batch, max_wait=max_wait)
    info = {
        "model_id": base.name,
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
        lifespan=lifespan,
    )
    return app, engine
