"""SOPPU's cache (`$SOPPU_CACHE`, else ~/.cache/soppu): what it holds, and pruning what grows.

    aligned-emulators/<base>-<recipe>/   the server's aligned emulators, one per recipe and
                                         base model (keyed by the weights, not their folder)
    emulators/emu-<id>/                  emulators installed on a node (one per version),
                                         with repairs/: its users' repaired middle layers
    models/, data/                       the prepared default model and Shakespeare users

Entries are removed by renaming them aside first, so a reader sees an entry whole or not at
all; a reuse marks an entry as used (its `last-used` file), which is what pruning goes by.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from soppu import atomic

GROWING = ("aligned-emulators", "emulators")  # what pruning removes unless told otherwise
KINDS = (*GROWING, "models", "data")
_USED = ".last-used"
_EMULATOR_META = "soppu_emulator.json"


def cache_dir() -> Path:
    """SOPPU's cache: $SOPPU_CACHE, else $XDG_CACHE_HOME/soppu, else ~/.cache/soppu."""
    if os.environ.get("SOPPU_CACHE"):
        return Path(os.environ["SOPPU_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "soppu"


@dataclass(frozen=True)
class Entry:
    kind: str
    path: Path
    bytes: int
    last_used: float  # seconds since the epoch
    detail: str

    @property
    def days_unused(self) -> float:
        return (time.time() - self.last_used) / 86400


def entries(root: Path | None = None, kinds: Iterable[str] = KINDS) -> list[Entry]:
    """Every entry of `kinds` in the cache, least recently used first."""
    root = Path(root) if root else cache_dir()
    found = []
    for kind in kinds:
        folder = root / kind
        for path in sorted(folder.glob("[!.]*")) if folder.is_dir() else []:
            if path.is_dir():
                found.append(Entry(kind, path, _size(path), _last_used(path), _detail(path)))
    return sorted(found, key=lambda e: e.last_used)


def mark_used(folder: Path) -> None:
    """Record that `folder` was just reused (pruning keeps what is in use)."""
    atomic.write_text(Path(folder) / _USED, f"{time.time():.0f}\n")


def prune(
    root: Path | None = None,
    *,
    older_than_days: float = 30.0,
    kinds: Iterable[str] = GROWING,
    dry_run: bool = False,
) -> list[Entry]:
    """Remove the entries of `kinds` unused for `older_than_days` (0: all); returns them."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown cache kind {unknown[0]!r}; one of {', '.join(KINDS)}")
    gone = [e for e in entries(root, kinds) if e.days_unused >= older_than_days]
    if not dry_run:
        for entry in gone:
            remove(entry.path)
    return gone


def remove(folder: Path) -> None:
    """Rename `folder` into a temporary folder of ours, then delete it there."""
    with atomic.owned_temp(folder, ".scratch") as aside:
        os.rename(folder, aside / "removed")


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _last_used(folder: Path) -> float:
    try:
        return float((folder / _USED).read_text().strip())
    except (FileNotFoundError, ValueError):
        return folder.stat().st_mtime


def _detail(folder: Path) -> str:
    meta = folder / _EMULATOR_META
    if not meta.is_file():
        return ""
    try:
        info = json.loads(meta.read_text())
        plan, steps = info["plan"], info.get("alignment", {}).get("config", {}).get("steps", 0)
        layers = f"{len(info['full_layers'])}/{plan['num_layers']} layers"
        aligned = f"aligned {steps} steps" if steps else "not aligned"
        return f"{info['base_model']}: {layers}, {aligned}"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "unreadable soppu_emulator.json"
