"""A compression round on a federation's run folder: store → compressed version → serving.

Works on a stopped or a running federation: the store is snapshotted by hard links under the
run's lock (instant), so a round committing meanwhile neither blocks on nor corrupts it.

What is compressed for each user is what they are served (`RUN/selection.json`: their
personal adapter, the global one, or none), and the manifest's source records the choice.

When the only change since the last compressed version is new users (every user it holds
still has the adapter it was compressed from, and all are served their own), the new users
are projected onto its bases (`add_users`) instead of recompressing everyone; a slot they
drift away from is refit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from soppu import atomic
from soppu.compression.compress import CompressionConfig
from soppu.emulator import read_info
from soppu.server.add_users import add_adapters
from soppu.server.compress_store import Progress, compress_adapters
from soppu.server.compressed_store import CompressedStore
from soppu.server.publish import publish
from soppu.server.store import RunFolder, snapshot, stored_round
from soppu.server.versions import Versions


def compress_and_publish(
    paths: Mapping[str, Path],
    store: Path,
    serving: Path,
    config: CompressionConfig,
    *,
    export_rank: int | None = None,
    progress: Progress | None = None,
    source: dict[str, Any] | None = None,
) -> Path:
    """Users' adapter dirs (user → dir) → the store `store` → the next version in `serving`
    (made current); returns that version."""
    Versions(serving).check()  # before the compression's work, not after it
    compress_adapters(paths, store, config, progress=progress, source=source)
    return publish(store, serving, export_rank=export_rank, progress=progress)


def compress_run(
    run: RunFolder,
    config: CompressionConfig,
    *,
    export_rank: int | None = None,
    refit_above: float | None = 0.2,
    incremental: bool = True,
    progress: Progress | None = None,
) -> tuple[Path, Path]:
    """Compress every stored user's adapter (or, `incremental`, add the new ones to the last
    version) and publish; returns (compressed, serving version)."""
    round_ = run.state()["round"]
    num_layers = read_info(run.emulator).plan["num_layers"]
    Versions(run.serving).check()
    compressed = Versions(run.compressed)
    with compressed.lock(), atomic.scratch_dir(run.compressed, "snapshot") as links:
        target = compressed.next()  # one compression round at a time takes the next number
        paths = snapshot(run, links, run.served_sources())
        served = run.selection_choices()
        source: dict[str, Any] = {
            "run": str(run.root.resolve()),
            "round": round_,
            "num_layers": num_layers,  # so publishing covers every layer of the base model
            "served": {user: served.get(user, "personal") for user in paths},
        }
        own = all(choice == "personal" for choice in served.values())
        previous = _grown_from(run, set(paths), config) if incremental and own else None
        if previous is None:
            compress_adapters(paths, target, config, progress=progress, source=source)
        else:
            old = set(CompressedStore(previous).users())
            add_adapters(
                previous,
                {u: p for u, p in paths.items() if u not in old},
                target,
                refit_above=refit_above,
                originals={u: p for u, p in paths.items() if u in old},
                progress=progress,
                source=source,
            )
    version = publish(target, run.serving, export_rank=export_rank, progress=progress)
    return target, version


def _grown_from(run: RunFolder, users: set[str], config: CompressionConfig) -> Path | None:
    """The last compressed version, if it was made with this config, every user it holds is
    unchanged since and others have joined; else None (recompress everyone)."""
    previous = Versions(run.compressed).newest()
    if previous is None:
        return None
    manifest = CompressedStore(previous).manifest()
    if replace(CompressionConfig(**manifest["config"]), device=config.device) != config:
        return None
    old = set(manifest["users"])
    served_then = manifest.get("source", {}).get("served", {})
    if any(choice != "personal" for choice in served_then.values()):
        return None  # a user was served another adapter than their own: recompress
    since = manifest.get("source", {}).get("round")
    if since is None or not old < users:
        return None
    changed = [u for u in old if (stored_round(run, u) or 0) > since]
    return None if changed else previous
