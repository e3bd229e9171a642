"""The compressed store on disk: shared bases and per-user cores, one safetensors file per slot.

    <store>/manifest.json              config, users, slots (file, sha256, items), totals
    <store>/slots/<slot>.safetensors   U, V and the cores of every (user, module) item
    <store>/report/                    the reconstruction-error report

Cores are kept in their cheapest exact form (`compression.engine.core_form`): `cores`
(N × r_U × r_V), or `core_left` (N × r_U × k) with `core_right` (N × k × r_V) when
k·(r_U + r_V) < r_U·r_V, or `sigma` (N × r) for diagonal cores.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from compression.engine import SlotResult, core_form
from compression.errors import OrthoForm
from soppu.atomic import sha256

FORMAT = "soppu-compressed/1"
MANIFEST = "manifest.json"
_SAFE_SLOT = re.compile(r"^[\w.\-]+$")


class StoreError(ValueError):
    """A store that is missing, corrupt, or not a store; the message names the file."""


def slot_tensors(result: SlotResult) -> tuple[dict[str, Tensor], str]:
    """Tensors to save for one slot and the core form used."""
    fit = result.fit
    tensors = {"U": fit.U, "V": fit.V}
    if fit.sigma == "diag":
        return {**tensors, "sigma": fit.cores}, "diag"
    if fit.core_factors is not None:
        left, right = fit.core_factors
        if core_form(left.shape[2], *fit.ranks) == "factored":
            return {**tensors, "core_left": left, "core_right": right}, "factored"
    return {**tensors, "cores": fit.cores}, "dense"


def write_slot(directory: Path, name: str, result: SlotResult) -> dict[str, Any]:
    """Save one slot's tensors; returns its manifest entry (file, checksum, form)."""
    if not _SAFE_SLOT.match(name):
        raise StoreError(f"slot name {name!r} is not safe as a file name")
    tensors, form = slot_tensors(result)
    path = Path(directory) / "slots" / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, path)
    return {"file": f"slots/{path.name}", "sha256": sha256(path), "core_form": form}


def read_manifest(store: Path) -> dict[str, Any]:
    path = Path(store) / MANIFEST
    if not path.is_file():
        raise StoreError(f"{path}: missing (is {store} a compressed store?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StoreError(f"{path}: not valid JSON ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def verify(store: Path, manifest: dict[str, Any]) -> None:
    """Every slot file present and matching its checksum."""
    for slot in manifest["slots"]:
        path = Path(store) / slot["file"]
        if not path.is_file():
            raise StoreError(f"{path}: missing")
        if sha256(path) != slot["sha256"]:
            raise StoreError(f"{path}: checksum mismatch (the file changed or is corrupt)")


@dataclass
class StoredSlot:
    """One slot read back: orthonormal bases once, each item's core on demand."""

    entry: dict[str, Any]
    path: Path
    form: OrthoForm  # Qu, Qv ready; cores read per item with `core`
    handle: Any  # an open safe_open: items are memory-mapped, read one at a time
    _R: tuple[Tensor, Tensor] | None  # (Ru, Rv) for diagonal cores

    @staticmethod
    def open(store: Path, entry: dict[str, Any]) -> StoredSlot:
        path = Path(store) / entry["file"]
        try:
            handle = safe_open(path, framework="pt")
            U, V = handle.get_tensor("U"), handle.get_tensor("V")
        except (SafetensorError, OSError) as exc:
            raise StoreError(f"{path}: cannot read ({exc})") from exc
        if entry["core_form"] == "diag":
            Qu, Ru = torch.linalg.qr(U)
            Qv, Rv = torch.linalg.qr(V)
            return StoredSlot(entry, path, OrthoForm(Qu, Qv, torch.empty(0)), handle, (Ru, Rv))
        return StoredSlot(entry, path, OrthoForm(U, V, torch.empty(0)), handle, None)

    def core(self, index: int) -> Tensor:
        """Item `index`'s r × r core in the orthonormal bases (Qu, Qv)."""
        form, h = self.entry["core_form"], self.handle
        if form == "dense":
            return h.get_slice("cores")[index : index + 1][0]
        if form == "factored":
            left = h.get_slice("core_left")[index : index + 1][0]
            return left @ h.get_slice("core_right")[index : index + 1][0]
        sigma = h.get_slice("sigma")[index : index + 1][0]
        Ru, Rv = self._R
        return (Ru * sigma[None, :]) @ Rv.T
