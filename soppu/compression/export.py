"""Turn a compressed delta back into a plain LoRA that any PEFT/LoRAX/vLLM server loads.

Σ_i = P S Qᵀ (SVD of the r × r core in orthonormal bases) gives B' = Q_u P S^½ and
A' = S^½ Qᵀ Q_vᵀ, truncated to the serving rank k'. With lora_alpha = k' the scale is 1, so
B'A' = D̂_i exactly whenever rank Σ_i ≤ k'; otherwise it is the best rank-k' approximation of D̂_i.
"""

from __future__ import annotations

import torch
from torch import Tensor

# LoRAX pads other ranks (which can mis-scale); vLLM caps at max_lora_rank.
SERVING_RANKS = (8, 16, 32, 64, 128)


def core_ranks(cores: Tensor, rtol: float = 1e-6) -> Tensor:
    """Numerical rank of every core (N × r × r), relative to its largest singular value."""
    sv = torch.linalg.svdvals(cores.double())
    return (sv > rtol * sv[:, :1].clamp_min(1e-300)).sum(dim=1)


def serving_rank(needed: int) -> int:
    """Smallest safe serving rank ≥ needed, capped at the largest one."""
    for rank in SERVING_RANKS:
        if rank >= needed:
            return rank
    return SERVING_RANKS[-1]


def export_lora(Qu: Tensor, core: Tensor, Qv: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """PEFT factors (A [rank × n], B [m × rank]) with B @ A ≈ Qu · core · Qvᵀ, scale 1.

    Columns past the core's rank are zero, so the adapter has exactly `rank` as PEFT expects.
    """
    P, S, Qh = torch.linalg.svd(core.double())
    keep = min(rank, S.shape[0])
    root = S[:keep].sqrt()
    B = torch.zeros(Qu.shape[0], rank, dtype=torch.float64, device=Qu.device)
    A = torch.zeros(rank, Qv.shape[0], dtype=torch.float64, device=Qv.device)
    B[:, :keep] = Qu.double() @ (P[:, :keep] * root)
    A[:keep] = (root[:, None] * Qh[:keep]) @ Qv.double().T
    return A.float(), B.float()
