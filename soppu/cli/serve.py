"""`soppu serve`: answer LoRAX- and OpenAI-style requests for every user from the shared bases.
Registered on the main app by soppu/cli/__init__.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from soppu.cli.common import ThreadsOpt, clear_errors, console, set_threads


def register(app: typer.Typer) -> None:
    app.command()(serve)


def serve(
    serving: Annotated[Path, typer.Argument(help="A serving dir (with `current`).")],
    base_model: Annotated[
        str | None, typer.Option(help="HF id or folder (default: the version's base model).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8080,
    max_batch: Annotated[int, typer.Option(help="Rows per model step, at most.")] = 64,
    max_wait_ms: Annotated[float, typer.Option(help="How long an idle batch waits.")] = 5.0,
    threads: ThreadsOpt = None,
    max_body_bytes: Annotated[
        int, typer.Option(min=1, help="Larger request bodies are refused (413) unread.")
    ] = 1 << 20,
) -> None:
    """Serve every user of the current version from the shared bases (LoRAX/OpenAI HTTP)."""
    # U and V once per batch, Σ_i per row; a new version under `current` is swapped in without
    # dropping requests (one that does not fit the base model is refused, the old one kept);
    # exits 1 if the engine stops.
    from server.serving.runner import build, run
    from soppu.basemodel import quiet_libraries

    quiet_libraries()
    set_threads(threads)
    with clear_errors():
        app, engine = build(
            serving,
            base_model,
            max_batch=max_batch,
            max_wait=max_wait_ms / 1000,
            max_body_bytes=max_body_bytes,
        )
    console.print(
        f"serving {len(engine.users)} users of [bold]{engine.adapters.version}[/] on "
        f"http://{host}:{port} (LoRAX: POST /generate; OpenAI: /v1/completions)"
    )
    if status := run(app, engine, host, port):
        raise typer.Exit(status)
