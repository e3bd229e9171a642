"""`soppu serve`: answer LoRAX- and OpenAI-style requests for every user from the shared bases.
Registered on the main app by soppu/cli/__init__.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from soppu.cli.common import ThreadsOpt, clear_errors, console, set_threads

keys_app = typer.Typer(help="API keys for soppu serve: who may use which adapter.")


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(score)
    app.add_typer(keys_app, name="keys")


KeysOpt = Annotated[
    Path | None,
    typer.Option(
        "--keys", help="The keys file (default: SERVING/keys.json, the one --api-keys reads)."
    ),
]
ServingOpt = Annotated[
    Path | None, typer.Option("--serving", help="The serving dir the keys are for.")
]


def _keys_file(serving: Path | None, keys: Path | None):
    from soppu.server.serving.keys import KeysFile

    if keys is None and serving is None:
        raise ValueError("give --serving SERVING (its keys.json) or --keys FILE")
    return KeysFile(keys or serving / "keys.json")


@keys_app.command("add")
def keys_add(
    user: Annotated[str | None, typer.Argument(help="The user the key is for.")] = None,
    serving: ServingOpt = None,
    admin: Annotated[bool, typer.Option(help="A key for every adapter and the base.")] = False,
    keys: KeysOpt = None,
) -> None:
    """Make a key and print it once (the file keeps only a salted hash)."""
    with clear_errors():
        entry, token = _keys_file(serving, keys).add(user, admin=admin)
    who = "every adapter (admin)" if entry.admin else f"user {entry.user}"
    console.print(f"key {entry.id} for {who}; shown once, keep it:", highlight=False)
    print(token)


@keys_app.command("list")
def keys_list(serving: ServingOpt = None, keys: KeysOpt = None) -> None:
    """The keys: id, who, made when (never the keys themselves)."""
    with clear_errors():
        entries = _keys_file(serving, keys).entries()
    for entry in entries:
        console.print(f"{entry.id}  {'admin' if entry.admin else entry.user}  {entry.created}")
    if not entries:
        console.print("no keys")


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (from keys list).")],
    serving: ServingOpt = None,
    keys: KeysOpt = None,
) -> None:
    """Revoke a key; a running server refuses it from its next request."""
    with clear_errors():
        entry = _keys_file(serving, keys).revoke(key_id)
    console.print(f"revoked key {entry.id} ({'admin' if entry.admin else entry.user})")


def serve(
    serving: Annotated[Path, typer.Argument(help="A serving dir (with `current`).")],
    base_model: Annotated[
        str | None, typer.Option(help="HF id or folder (default: the version's base model).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = 8080,
    max_batch: Annotated[int, typer.Option(min=1, help="Rows per model step, at most.")] = 64,
    max_wait_ms: Annotated[
        float, typer.Option(min=0, max=10_000, help="How long an idle batch waits (ms).")
    ] = 5.0,
    threads: ThreadsOpt = None,
    max_body_bytes: Annotated[
        int, typer.Option(min=1, help="Larger request bodies are refused (413) unread.")
    ] = 1 << 20,
    api_keys: Annotated[
        Path | None,
        typer.Option(help="A keys file (soppu keys add): every request needs a key."),
    ] = None,
    insecure_no_auth: Annotated[
        bool, typer.Option(help="Listen beyond loopback without keys: anyone may use any adapter.")
    ] = False,
) -> None:
    """Serve every user of the current version from the shared bases (LoRAX/OpenAI HTTP)."""
    # U and V once per batch, Σ_i per row; a new version under `current` is swapped in without
    # dropping requests (one that does not fit the base model is refused, the old one kept);
    # exits 1 if the engine stops.
    from soppu.basemodel import quiet_libraries
    from soppu.server.serving.runner import build, run

    quiet_libraries()
    set_threads(threads)
    with clear_errors():
        if api_keys is None and not insecure_no_auth and not _loopback(host):
            raise ValueError(
                f"--host {host} is reachable by others: give --api-keys (soppu keys add), or "
                "--insecure-no-auth to let anyone who reaches it use any user's adapter"
            )
        if api_keys is not None and not api_keys.is_file():
            raise FileNotFoundError(f"{api_keys}: no keys file (make one with soppu keys add)")
        app, engine = build(
            serving,
            base_model,
            max_batch=max_batch,
            max_wait=max_wait_ms / 1000,
            max_body_bytes=max_body_bytes,
            keys=api_keys,
        )
    if api_keys is None and not _loopback(host):
        console.print(
            "[bold red]no authentication:[/] anyone who reaches this port may use any "
            "user's adapter (--insecure-no-auth)"
        )
    console.print(
        f"serving {len(engine.users)} users of [bold]{engine.adapters.version}[/] on "
        f"http://{host}:{port} (LoRAX: POST /generate; OpenAI: /v1/completions)"
    )
    if status := run(app, engine, host, port):
        raise typer.Exit(status)


def score(
    url: Annotated[
        str, typer.Argument(help="The server: soppu serve's or vLLM's, http://HOST:PORT.")
    ],
    text: Annotated[Path, typer.Argument(help="Your validation text (UTF-8), never trained on.")],
    model: Annotated[
        list[str],
        typer.Option(
            help="An adapter to try (a user id, or vLLM's --lora-modules name); the first is "
            "yours, advised unless another beats it significantly."
        ),
    ],
    reference: Annotated[
        str, typer.Option(help="What each model is compared with ('': the base model).")
    ] = "",
    block_chars: Annotated[int, typer.Option(min=2, help="Characters per scored block.")] = 1500,
    api_key: Annotated[
        str | None, typer.Option(envvar="SOPPU_API_KEY", help="Sent as a Bearer token.")
    ] = None,
) -> None:
    """Which adapter to use: score your own text on the server, each model against the base."""
    from rich.table import Table

    from soppu.cli.common import progress_bar
    from soppu.completions import base_model_id
    from soppu.server.serving import scoring

    with clear_errors():
        try:
            content = text.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{text}: cannot read it as UTF-8 text ({exc})") from None
        blocks = scoring.blocks_of(content, block_chars)
        if len(blocks) < 2:
            raise ValueError(f"{text}: {len(blocks)} block(s) of text; at least 2 to compare")
        # The base model by the name the server gives it: with API keys, no name is the
        # key's own adapter.
        reference = reference or base_model_id(url, api_key)
        scored = []
        with progress_bar("scoring") as update:
            for name in [reference, *model]:
                shown_name = name or "base"
                scored.append(
                    scoring.score(
                        url, name, blocks, api_key, lambda d, t, n=shown_name: update(n, d, t)
                    )
                )
        gains, best = scoring.compare(scored[0], scored[1:])
    table = Table(title=f"{len(blocks)} blocks, {int(scored[0].tokens.sum())} tokens")
    for column in ("model", "perplexity", "gain over " + (reference or "base") + " [95%]"):
        table.add_column(column, overflow="fold")
    table.add_row(reference or "base", f"{scored[0].perplexity:.2f}", "–")
    for s in scored[1:]:
        g = gains[s.model]
        interval = f"{g.point:+.1%} [{g.low:+.1%}, {g.high:+.1%}] {g.verdict}"
        table.add_row(s.model, f"{s.perplexity:.2f}", interval)
    console.print(table)
    console.print(
        f"use: [bold]{best or 'base'}[/] (the first --model where it beats the reference "
        "significantly and no other beats it so; else the lowest loss among the reference "
        "and the models significantly better than it)"
    )


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
