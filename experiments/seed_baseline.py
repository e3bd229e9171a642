"""The seed's compression loop, re-implemented only here as the benchmark's baseline.

The project's predecessor (the seed) compressed every user's delta D_i = s_i·B_i·A_i as
U Σ_i Vᵀ like SOPPU does, but with a plain dense loop:

* one U, V per tensor *shape* (all layers and modules of that shape share it), or per
  module with ``group="slot"`` so it can be compared slot for slot;
* every D_i formed densely (m × n, float32);
* U, V started from a random orthonormal matrix, r capped at the LoRA rank k;
* a fixed 100 iterations, each one power step per side with the dense m × m (n × n) matrix:
  U ← orth(Σ_i (D_i V)(D_i V)ᵀ U), then V ← orth(Σ_i (D_iᵀ U)(D_iᵀ U)ᵀ V);
* full cores Σ_i = Uᵀ D_i V.

Nothing here is clever on purpose: it is the yardstick, not a method to use.
Stored parameters: r(m + n) per group plus r² per (user, module) item.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from torch import Tensor

Factors = tuple[Tensor, Tensor, float]
User = dict[str, Factors]
Item = tuple[int, str]  # (user index, module)

SEED_ITERATIONS = 100
GROUPINGS = ("shape", "slot")


def seed_compress(
    users: list[User],
    rank: int,
    *,
    group: str = "shape",
    iterations: int = SEED_ITERATIONS,
    seed: int = 0,
) -> tuple[list[User], int, float]:
    """Run the seed's loop; return (reconstructions, stored params, seconds).

    Reconstructions use the peers' format: per user {module: (Â, B̂, 1.0)} with Â = Vᵀ and
    B̂ = U Σ_i, so one product-error function serves every method. ``seconds`` covers forming
    the dense deltas, the iterations and the cores (the whole seed pipeline), not the
    conversion to factors afterwards.
    """
    if group not in GROUPINGS:
        raise ValueError(f"group must be one of {GROUPINGS}, got {group!r}")
    gen = torch.Generator().manual_seed(seed)
    fits = []
    seconds = 0.0
    for items in _groups(users, group).values():
        start = time.perf_counter()
        deltas = [_dense(*users[i][module]) for i, module in items]
        r = min(rank, max(users[i][module][0].shape[0] for i, module in items))
        U, V = _seed_loop(deltas, r, iterations, gen)
        cores = [U.T @ D @ V for D in deltas]
        seconds += time.perf_counter() - start
        fits.append((items, U, V, cores))
        del deltas
    return _unpack(users, fits), _stored(fits), seconds


def _groups(users: list[User], group: str) -> dict[object, list[Item]]:
    """Items per group key: the module name (slot) or the (m, n) of its delta (shape)."""
    out: dict[object, list[Item]] = defaultdict(list)
    for i, user in enumerate(users):
        for module, (a, b, _) in sorted(user.items()):
            key = module if group == "slot" else (b.shape[0], a.shape[1])
            out[key].append((i, module))
    return dict(out)


def _dense(a: Tensor, b: Tensor, scale: float) -> Tensor:
    return float(scale) * (b.float() @ a.float())


def _orth(x: Tensor) -> Tensor:
    return torch.linalg.qr(x).Q


def _seed_loop(
    deltas: list[Tensor], r: int, iterations: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    m, n = deltas[0].shape
    U = _orth(torch.randn(m, r, generator=gen))
    V = _orth(torch.randn(n, r, generator=gen))
    for _ in range(iterations):
        # The seed formed the dense m × m (then n × n) matrix and applied it once.
        M_U = torch.zeros(m, m)
        for D in deltas:
            DV = D @ V
            M_U += DV @ DV.T
        U = _orth(M_U @ U)
        M_V = torch.zeros(n, n)
        for D in deltas:
            DtU = D.T @ U
            M_V += DtU @ DtU.T
        V = _orth(M_V @ V)
    return U, V


def _unpack(users: list[User], fits: list) -> list[User]:
    recon: list[User] = [{} for _ in users]
    for items, U, V, cores in fits:
        a_hat = V.T.contiguous()
        for (i, module), core in zip(items, cores, strict=True):
            recon[i][module] = (a_hat, U @ core, 1.0)
    return recon


def _stored(fits: list) -> int:
    total = 0
    for items, U, V, _ in fits:
        r = U.shape[1]
        total += r * (U.shape[0] + V.shape[0]) + len(items) * r * r
    return total
