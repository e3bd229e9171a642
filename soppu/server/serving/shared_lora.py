"""Many users' adapters in one forward pass, from the shared bases.

A published version's `shared/` holds, per slot (one weight matrix), orthonormal bases U
(m × r_U) and V (n × r_V) and every user's core Σ_i (r_U × r_V), with D̂_i = U Σ_i Vᵀ (scale
folded in).
For a batch whose rows belong to different users, the adapted layer computes

    y = W x + U (Σ_{u(row)} (Vᵀ x))

so Vᵀx and U(·) are one matrix product each for the whole batch, and the per-user part is a
batched r × r product. Row users are indices into the cores; index 0 is "no adapter" (a zero
core), so base-model requests share the batch. A slot compressed with clusters has bases per
cluster (zero-padded to one width): each row then gathers its cluster's U and V, which costs
the same multiply-adds as one basis.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from soppu.server.serving.shared_weights import SharedAdapters, SlotWeights


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
        self.cluster = weights.cluster.to(device)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.rows is None:
            return y
        x = x.to(self.V.dtype)
        cores = self.cores[self.rows].transpose(1, 2)  # each row's own Σ_iᵀ
        if self.U.shape[0] == 1:  # one basis: Vᵀx and U(·) once for the whole batch
            h = torch.bmm(x @ self.V[0], cores)
            return y + (h @ self.U[0].T).to(y.dtype)
        clusters = self.cluster[self.rows]  # each row on its cluster's bases
        h = torch.bmm(torch.bmm(x, self.V[clusters]), cores)
        return y + torch.bmm(h, self.U[clusters].transpose(1, 2)).to(y.dtype)


def misfits(model: nn.Module, adapters: SharedAdapters) -> list[str]:
    """What in `adapters` does not fit `model` (a module it lacks, of another kind or shape);
    empty when every slot fits. Only reads the model, so any thread may ask."""
    problems = []
    for name, weights in adapters.slots.items():
        try:
            base = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: the base model has no such module")
            continue
        if isinstance(base, SharedLoRALinear):
            base = base.base
        if not isinstance(base, nn.Linear):
            problems.append(f"{name}: expected a Linear to adapt, found {type(base).__name__}")
            continue
        expected = (base.out_features, base.in_features)
        shape = (weights.U.shape[1], weights.V.shape[1])
        if shape != expected:
            problems.append(f"{name}: adapter shape {shape}, the base model's is {expected}")
    return problems


def install(model: nn.Module, adapters: SharedAdapters) -> dict[str, SharedLoRALinear]:
    """Wrap every adapted linear of `model` (in place); returns module name → wrapper.
    Everything is checked first, so a misfit changes nothing."""
    if problems := misfits(model, adapters):
        raise ValueError("; ".join(problems))
    wrapped = {}
    for name, weights in adapters.slots.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if isinstance(base, SharedLoRALinear):
            base.set_weights(weights)
        else:
            base = SharedLoRALinear(base, weights)
            setattr(parent, child, base)
        wrapped[name] = base
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
