"""A compression round on a federation's run folder: store → compressed version → serving.

Works on a stopped or a running federation: the store is snapshotted by hard links under the
run's lock (instant), so a round committing meanwhile neither blocks on nor corrupts it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from compression.engine import CompressionConfig
from server.compress_round import Progress, compress_adapters
from server.publish import next_version, publish
from server.store import RunFolder, snapshot
from soppu.emulator import read_info


def compress_run(
    run: RunFolder,
    config: CompressionConfig,
    *,
    export_rank: int | None = None,
    progress: Progress | None = None,
) -> tuple[Path, Path]:
    """Compress every stored user's adapter and publish; returns (compressed, serving version)."""
    round_ = run.state()["round"]
    num_layers = read_info(run.emulator).plan["num_layers"]
    target = next_version(run.compressed)
    links = run.compressed / f".{target.name}.snapshot"
    shutil.rmtree(links, ignore_errors=True)
    try:
        paths = snapshot(run, links)
        source: dict[str, Any] = {
            "run": str(run.root.resolve()),
            "round": round_,
            "num_layers": num_layers,  # so publishing covers every layer of the base model
        }
        compress_adapters(paths, target, config, progress=progress, source=source)
    finally:
        shutil.rmtree(links, ignore_errors=True)
    version = publish(target, run.serving, export_rank=export_rank, progress=progress)
    return target, version
