"""A folder of numbered versions, `v0001`, `v0002`, …, and (for serving) `current` → one of
them: the one place that numbers versions and finds the current one, for RUN/compressed/ and
every serving dir; and `ServingVersion`, the one owner of a published version's layout.

    ROOT/vNNNN/          complete versions (each built under a temporary name, then renamed)
    ROOT/current         a relative symlink to the newest published one, switched atomically
    ROOT/.current.lock   held while a writer takes the next number and moves `current`

    vNNNN/manifest.json  users (each with its files' sha256), base model, export rank, source
    vNNNN/users/<user>/  adapter_config.json + adapter_model.safetensors, a plain PEFT dir
    vNNNN/shared/        the compressed store's bases and cores, for the shared-basis server
    vNNNN/report/        the reconstruction-error report
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

from soppu import atomic
from soppu.server.compressed_store import StoreError
from soppu.userids import check_user_id

CURRENT = "current"
MANIFEST = "manifest.json"
REPORT = "report"  # a folder of report.json, .csv, .md and plots, in stores and versions
_VERSION = re.compile(r"^v(\d{4,})$")


class Versions:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.current_link = self.root / CURRENT

    def names(self) -> list[str]:
        """Complete versions, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir() if p.is_dir() and _VERSION.match(p.name)]
        return sorted(found, key=lambda name: int(name[1:]))

    def newest(self) -> Path | None:
        names = self.names()
        return self.root / names[-1] if names else None

    def next(self) -> Path:
        """One past the newest; take it under `lock()` when others may write here too."""
        names = self.names()
        return self.root / f"v{(int(names[-1][1:]) + 1) if names else 1:04d}"

    def current(self) -> Path | None:
        """The version `current` points at, if it points at one."""
        link = self.current_link
        return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None

    def require_current(self) -> Path:
        found = self.current()
        if found is None:
            raise FileNotFoundError(
                f"{self.current_link}: no current serving version (run `soppu publish`)"
            )
        return found

    def point_current(self, version: Path) -> None:
        atomic.point_symlink(self.current_link, Path(version).name)

    def check(self) -> None:
        """Refuse, before any work, a root that is not a folder of versions."""
        if self.root.exists() and not self.root.is_dir():
            raise atomic.WriteRefused(f"{self.root} is a file, not a folder of versions")
        if (self.root / MANIFEST).exists():
            what = atomic.with_article(atomic.folder_kind(self.root) or "version")
            raise atomic.WriteRefused(
                f"{self.root} is {what} (it has a manifest.json), not a folder of versions"
            )
        link = self.current_link
        if link.exists() and not link.is_symlink():
            raise atomic.WriteRefused(
                f"{link} is a real folder or file, not the symlink to a version SOPPU keeps there"
            )

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One writer at a time takes the next number (and moves `current`)."""
        with atomic.lock(self.current_link, f"the versions in {self.root}"):
            yield


class ServingVersion:
    """One published version, read: its manifest, users, their PEFT dirs, the shared bases."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.manifest_path = self.root / MANIFEST
        self.shared = self.root / "shared"
        self.report = self.root / REPORT
        self.users_dir = self.root / "users"

    @cached_property
    def manifest(self) -> dict[str, Any]:
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise StoreError(f"{self.manifest_path}: missing (is {self.root} a version?)") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise StoreError(f"{self.manifest_path}: not a version manifest ({exc})") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("users"), dict):
            raise StoreError(f"{self.manifest_path}: 'users' missing or not a mapping")
        return manifest

    @property
    def base_model(self) -> str:
        return self.manifest["base_model"]

    def users(self) -> list[str]:
        return [check_user_id(u, source=str(self.manifest_path)) for u in self.manifest["users"]]

    def user_dir(self, user: str) -> Path:
        """Where `user`'s published PEFT dir is (whether or not the version has them)."""
        return self.users_dir / check_user_id(user, source=str(self.root))

    def checksums(self) -> Iterator[tuple[Path, str]]:
        """Every published user file with the sha256 the manifest records for it."""
        for user, entry in self.manifest["users"].items():
            for name, digest in entry.get("sha256", {}).items():
                yield self.user_dir(user) / Path(name).name, digest
