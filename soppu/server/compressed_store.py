"""The compressed store on disk: shared bases and per-user cores, one safetensors file per slot.

    <store>/manifest.json              config, users, slots (file, sha256, items), totals
    <store>/slots/<slot>.safetensors   U, V and the cores of every (user, module) item
    <store>/report/                    the reconstruction-error report

Cores are kept in their cheapest exact form (`compression.storage.core_form`): `cores`
(N × r_U × r_V), or `core_left` (N × r_U × k) with `core_right` (N × k × r_V) when
k·(r_U + r_V) < r_U·r_V, or `sigma` (N × r) for diagonal cores. With `bits` 8 or 4 each
tensor NAME is stored as `NAME.codes` and `NAME.scales` (the manifest entry says the bits, the
tensors' shapes and the codec: format 2 deflates 4-bit codes, format 1 wrote them raw and is
still read); reading dequantises. `CompressedStore` is the one reader and writer
of this layout; every other module goes through it.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from soppu import atomic
from soppu.atomic import sha256
from soppu.compression.residuals import OrthoForm
from soppu.compression.storage import BITS, CODECS, SlotReader, SlotStorage
from soppu.errors import SoppuError

FORMAT = "soppu-compressed/2"  # what is written; 2: 4-bit codes deflated
READS = ("soppu-compressed/1", FORMAT)
MANIFEST = "manifest.json"
_SAFE_SLOT = re.compile(r"^[\w.\-]+$")


class StoreError(SoppuError, ValueError):
    """A store that is missing, corrupt, or not a store; the message names the file."""


class CompressedStore:
    """A compressed store folder, read and written only through here: its manifest (checked
    on every read, held to the same rules on every write), its slot files (checksums
    verified), and each slot read back as a `StoredSlot`."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.manifest_path = self.root / MANIFEST

    def __repr__(self) -> str:
        return f"CompressedStore({str(self.root)!r})"

    def manifest(self) -> dict[str, Any]:
        """The manifest, checked: a clear `StoreError` naming the file if it is not one."""
        path = self.manifest_path
        if not path.is_file():
            raise StoreError(f"{path}: missing (is {self.root} a compressed store?)")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise StoreError(f"{path}: not valid JSON ({exc})") from exc
        except RecursionError:
            raise StoreError(f"{path}: nested too deeply to be a store manifest") from None
        _check_manifest(path, manifest)
        return manifest

    def verified(self) -> dict[str, Any]:
        """The manifest, with every slot file present and matching its checksum."""
        manifest = self.manifest()
        self.verify(manifest)
        return manifest

    def verify(self, manifest: dict[str, Any]) -> None:
        """Every slot file of `manifest` present and matching its checksum."""
        for slot in manifest["slots"]:
            path = self.root / slot["file"]
            if not path.is_file():
                raise StoreError(f"{path}: missing")
            if sha256(path) != slot["sha256"]:
                raise StoreError(f"{path}: checksum mismatch (the file changed or is corrupt)")

    def users(self) -> list[str]:
        return list(self.manifest()["users"])

    def slot(self, entry: dict[str, Any]) -> StoredSlot:
        """The slot a manifest entry names, opened for reading."""
        return StoredSlot.open(self.root, entry)

    def write_slot(self, name: str, stored: SlotStorage) -> dict[str, Any]:
        """Save one slot's tensors; returns its manifest entry (file, checksum, form, bits)."""
        if not _SAFE_SLOT.match(name):
            raise StoreError(f"slot name {name!r} is not safe as a file name")
        path = self.root / "slots" / f"{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(stored.tensors(), path)
        entry = {"file": f"slots/{path.name}", "sha256": sha256(path), "core_form": stored.form}
        if stored.bits != 32:
            entry |= {"bits": stored.bits, "shapes": stored.shapes(), "codec": stored.codec}
        return entry

    def copy_to(self, out: Path) -> CompressedStore:
        """The slot files and the manifest, copied into a new folder `out` (the shared bases a
        serving version carries); the report stays behind."""
        out = Path(out)
        out.mkdir(parents=True)
        shutil.copytree(self.root / "slots", out / "slots")
        shutil.copy2(self.manifest_path, out / MANIFEST)
        return CompressedStore(out)

    def write_manifest(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Write the manifest (atomically) in this version's format, held to what
        `manifest()` requires; returns it as written."""
        written = {**manifest, "format": FORMAT}
        _check_manifest(self.manifest_path, written)
        atomic.write_json(self.manifest_path, written)
        return written


def _check_manifest(path: Path, manifest: Any) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") not in READS:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise StoreError(f"{path}: format {found!r}, expected one of {READS}")
    for key, kind in _MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind):
            raise StoreError(f"{path}: {key!r} missing or not a {kind.__name__}")
    for i, slot in enumerate(manifest["slots"]):
        missing = [k for k in _SLOT_KEYS if not isinstance(slot, dict) or k not in slot]
        if missing:
            raise StoreError(f"{path}: slots[{i}] lacks {', '.join(missing)}")
        if slot.get("bits", 32) not in BITS:
            raise StoreError(f"{path}: slots[{i}] has bits {slot['bits']!r}, not one of {BITS}")
        if slot.get("codec", "raw") not in CODECS:
            raise StoreError(f"{path}: slots[{i}] has codec {slot['codec']!r}, not one of {CODECS}")


_MANIFEST_KEYS = {"slots": list, "users": list, "config": dict}
_SLOT_KEYS = ("name", "file", "sha256", "items", "shape", "core_form", "max_core_rank")


@dataclass
class StoredSlot:
    """One slot read back: orthonormal bases once, each item's core on demand."""

    entry: dict[str, Any]
    path: Path
    form: OrthoForm  # Qu, Qv ready; cores read per item with `core`
    reader: SlotReader  # items are memory-mapped, read (and dequantised) one at a time

    @staticmethod
    def open(store: Path, entry: dict[str, Any]) -> StoredSlot:
        path = Path(store) / entry["file"]
        try:
            handle = safe_open(path, framework="pt")
            reader = SlotReader(
                entry["core_form"],
                int(entry.get("bits", 32)),
                handle.get_tensor,
                entry.get("shapes", {}),
                lambda name, i: handle.get_slice(name)[i : i + 1][0],
                codec=entry.get("codec", "raw"),
            )
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            raise StoreError(f"{path}: cannot read ({exc})") from exc
        return StoredSlot(entry, path, OrthoForm(reader.Qu, reader.Qv, torch.empty(0)), reader)

    def core(self, index: int) -> Tensor:
        """Item `index`'s r_U × r_V core in the orthonormal bases (Qu, Qv)."""
        try:  # cores decode on first use: a bad one is found here, not on opening
            return self.reader.core(index)
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            raise StoreError(f"{self.path}: cannot read item {index}'s core ({exc})") from exc
