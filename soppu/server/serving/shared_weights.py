"""A published version's shared bases and cores, read into the dense per-module tensors the
serving layer multiplies by (`shared_lora.py` is the layer; this is its loading, as PEFT keeps
`layer.py` apart from `model.py`).

Per module: U (clusters × m × r_U) and V (clusters × n × r_V), zero-padded to one width across
a slot's clusters, and every user's core at a fixed row (row 0: zeros, "no adapter").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from soppu.server.compressed_store import CompressedStore, StoredSlot
from soppu.server.versions import ServingVersion


@dataclass
class SlotWeights:
    """One module's bases (per cluster) and the cores of every user (row 0: zeros, for users
    without one)."""

    module: str
    U: Tensor  # clusters × m × r_U
    V: Tensor  # clusters × n × r_V
    cores: Tensor  # (1 + users) × r_U × r_V
    cluster: Tensor  # (1 + users): the cluster whose bases each row's core is on


@dataclass
class SharedAdapters:
    """A serving version's adapters, ready for the model: user → core row, slots by module."""

    version: str
    users: dict[str, int]  # user id → row in every slot's cores (1-based)
    slots: dict[str, SlotWeights]  # module name → weights
    base_model: str | None = None  # what the adapters were trained on, as the store says


def load_shared(version_dir: Path, dtype: torch.dtype = torch.float32) -> SharedAdapters:
    """Read `VERSION/shared/` (checksums verified) into dense per-module tensors."""
    shared = CompressedStore(ServingVersion(version_dir).shared)
    manifest = shared.verified()
    users = {user: row for row, user in enumerate(sorted(manifest["users"]), start=1)}
    parts: dict[str, list[tuple[StoredSlot, list[tuple[int, str]]]]] = {}
    for entry in manifest["slots"]:
        slot = shared.slot(entry)
        by_module: dict[str, list[tuple[int, str]]] = {}
        for i, (user, module) in enumerate(entry["items"]):
            by_module.setdefault(module, []).append((i, user))
        for module, items in by_module.items():
            parts.setdefault(module, []).append((slot, items))
    slots = {m: _module_weights(m, p, len(users), users, dtype) for m, p in sorted(parts.items())}
    return SharedAdapters(Path(version_dir).name, users, slots, manifest.get("base_model"))


def _module_weights(
    module: str,
    parts: list[tuple[StoredSlot, list[tuple[int, str]]]],
    count: int,
    users: dict[str, int],
    dtype: torch.dtype,
) -> SlotWeights:
    r_u = max(slot.form.Qu.shape[1] for slot, _ in parts)
    r_v = max(slot.form.Qv.shape[1] for slot, _ in parts)
    m, n = parts[0][0].form.Qu.shape[0], parts[0][0].form.Qv.shape[0]
    U = torch.zeros(len(parts), m, r_u, dtype=dtype)
    V = torch.zeros(len(parts), n, r_v, dtype=dtype)
    cores = torch.zeros(count + 1, r_u, r_v, dtype=dtype)
    cluster = torch.zeros(count + 1, dtype=torch.long)
    for j, (slot, items) in enumerate(parts):
        a, b = slot.form.Qu.shape[1], slot.form.Qv.shape[1]
        U[j, :, :a], V[j, :, :b] = slot.form.Qu.to(dtype), slot.form.Qv.to(dtype)
        for i, user in items:
            cores[users[user], :a, :b] = slot.core(i).to(dtype)
            cluster[users[user]] = j
    return SlotWeights(module, U, V, cores, cluster)
