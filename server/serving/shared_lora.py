"""Many users' adapters in one forward pass, from the shared bases.

A published version's `shared/` holds, per slot (one weight matrix), orthonormal bases U
(m × r_U) and V (n × r_V) and every user's core Σ_i (r_U × r_V), with D̂_i = U Σ_i Vᵀ (scale
folded in).
For a batch whose rows belong to different users, the adapted layer computes

    y = W x + U (Σ_{u(row)} (Vᵀ x))

so Vᵀx and U(·) are one matrix product each for the whole batch, and the per-user part is a
batched r × r product. Row users are indices into the cores; index 0 is "no adapter" (a zero
core), so base-model requests share the batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from server.compressed_store import StoredSlot, read_manifest, verify


@dataclass
class SlotWeights:
    """One slot's bases and the cores of every user (row 0: zeros, for users without one)."""

    module: str
    U: Tensor  # m × r_U
    V: Tensor  # n × r_V
    cores: Tensor  # (1 + users) × r_U × r_V


@dataclass
class SharedAdapters:
    """A serving version's adapters, ready for the model: user → core row, slots by module."""

    version: str
    users: dict[str, int]  # user id → row in every slot's cores (1-based)
    slots: dict[str, SlotWeights]  # module name → weights

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for s in self.slots.values() for t in (s.U, s.V, s.cores)
        )


def load_shared(version_dir: Path, dtype: torch.dtype = torch.float32) -> SharedAdapters:
    """Read `VERSION/shared/` (checksums verified) into dense per-slot tensors."""
    shared = Path(version_dir) / "shared"
    manifest = read_manifest(shared)
    verify(shared, manifest)
    users = {user: row for row, user in enumerate(sorted(manifest["users"]), start=1)}
    slots = {}
    for entry in manifest["slots"]:
        slot = StoredSlot.open(shared, entry)
        modules = {module for _, module in entry["items"]}
        for module in sorted(modules):
            ranks = (slot.form.Qu.shape[1], slot.form.Qv.shape[1])
            cores = torch.zeros(len(users) + 1, *ranks, dtype=dtype)
            for i, (user, item_module) in enumerate(entry["items"]):
                if item_module == module:
                    cores[users[user]] = slot.core(i).to(dtype)
            slots[module] = SlotWeights(
                module,
                slot.form.Qu.to(dtype).contiguous(),
                slot.form.Qv.to(dtype).contiguous(),
                cores,
            )
    return SharedAdapters(Path(version_dir).name, users, slots)


class SharedLoRALinear(nn.Module):
    """A frozen base linear plus U Σ_{user} Vᵀ for each row of the batch."""

    def __init__(self, base: nn.Linear, weights: SlotWeights):
        super().__init__()
        self.base = base
        self.set_weights(weights)
        self.rows: Tensor | None = None  # [batch] core rows, set by `batch_users`

    def set_weights(self, weights: SlotWeights) -> None:
        device = self.base.weight.device
        self.U = weights.U.to(device)
        self.V = weights.V.to(device)
        self.cores = weights.cores.to(device)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.rows is None:
            return y
        h = x.to(self.V.dtype) @ self.V  # [b, t, r]: once for the whole batch
        h = torch.bmm(h, self.cores[self.rows].transpose(1, 2))  # each row's own Σ_i
        return y + (h @ self.U.T).to(y.dtype)


def install(model: nn.Module, adapters: SharedAdapters) -> dict[str, SharedLoRALinear]:
    """Wrap every adapted linear of `model` (in place); returns module name → wrapper."""
    wrapped = {}
    for name, weights in adapters.slots.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if isinstance(base, SharedLoRALinear):
            base.set_weights(weights)
            wrapped[name] = base
            continue
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{name}: expected a Linear to adapt, found {type(base).__name__}")
        expected = (base.out_features, base.in_features)
        if (weights.U.shape[0], weights.V.shape[0]) != expected:
            raise ValueError(
                f"{name}: adapter shape {(weights.U.shape[0], weights.V.shape[0])}"
                f" does not fit the base model's {expected}"
            )
        wrapper = SharedLoRALinear(base, weights)
        setattr(parent, child, wrapper)
        wrapped[name] = wrapper
    return wrapped


@contextmanager
def batch_users(layers: dict[str, SharedLoRALinear], rows: Tensor) -> Iterator[None]:
    """Within the block, row b of the batch uses core row `rows[b]` in every adapted layer."""
    for layer in layers.values():
        layer.rows = rows.to(layer.cores.device)
    try:
        yield
    finally:
        for layer in layers.values():
            layer.rows = None
