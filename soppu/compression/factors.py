"""LoRA factors and their canonical (thin-SVD) form.

Everything downstream works on D_i = s_i·B_i·A_i without ever forming it. Each delta is put once
into thin-SVD form D_i = E_i·diag(S_i)·F_iᵀ (E_i, F_i with orthonormal columns) from two small
QRs. That form is gauge-free — (B·G, G⁻¹·A) gives the same E, S, F — and makes norms, Gram
products and residuals cheap and free of cancellation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass(frozen=True)
class LoRAFactors:
    """One LoRA delta in PEFT convention: D = scale · B @ A."""

    A: Tensor  # k × n  (lora_A.weight)
    B: Tensor  # m × k  (lora_B.weight)
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> Tensor:
        """The dense delta; for tests and small checks only."""
        return self.scale * (self.B.double() @ self.A.double())


@dataclass
class CanonicalStack:
    """N deltas of one shape in thin-SVD form, zero-padded to a common rank k.

    The singular vectors are stored as rows (Et[i] = E_iᵀ), so that products with every
    user at once are one tall GEMM on the (N·k) × m view.
    """

    Et: Tensor  # N × k × m, orthonormal rows
    S: Tensor  # N × k, singular values (0 on padding)
    Ft: Tensor  # N × k × n, orthonormal rows

    @property
    def count(self) -> int:
        return self.Et.shape[0]

    @property
    def rank(self) -> int:
        return self.Et.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.Et.shape[2], self.Ft.shape[2])

    def sq_norms(self) -> Tensor:
        """‖D_i‖²_F for every delta, in float64."""
        return (self.S.double() ** 2).sum(dim=1)


@runtime_checkable
class KnownItems(Protocol):
    """A lazy sequence of LoRA deltas that already knows, from file headers, what reading every
    item would tell: the slot's shape and each item's LoRA rank (so nothing is read for them)."""

    shape: tuple[int, int]
    ranks: Sequence[int]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> LoRAFactors: ...


def item_ranks(items: Sequence[LoRAFactors]) -> list[int]:
    """Each item's LoRA rank, from the headers when the items know them."""
    if isinstance(items, KnownItems):
        return list(items.ranks)
    return [item.rank for item in items]


def canonicalize(
    items: Sequence[LoRAFactors],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    chunk: int = 64,
) -> CanonicalStack:
    """Thin SVD of every s_i·B_i·A_i, reading the items a chunk at a time.

    `items` may be lazy (a sequence that loads on indexing), so a whole slot's raw factors
    never need to be in memory at once.
    """
    if len(items) == 0:
        raise ValueError("canonicalize needs at least one LoRA delta")
    m, n = items.shape if isinstance(items, KnownItems) else items[0].shape
    k = max(item_ranks(items))
    count = len(items)
    Et = torch.zeros(count, k, m, device=device, dtype=dtype)
    Ft = torch.zeros(count, k, n, device=device, dtype=dtype)
    S = torch.zeros(count, k, device=device, dtype=dtype)
    for start in range(0, count, chunk):
        batch = [items[i] for i in range(start, min(start + chunk, count))]
        e, s, f = _thin_svd_batch(batch, k, m, n, device)
        stop = start + len(batch)
        Et[start:stop] = e.transpose(1, 2).to(dtype)
        S[start:stop] = s.to(dtype)
        Ft[start:stop] = f.transpose(1, 2).to(dtype)
    return CanonicalStack(Et=Et, S=S, Ft=Ft)


def _thin_svd_batch(
    batch: list[LoRAFactors], k: int, m: int, n: int, device: torch.device | str
) -> tuple[Tensor, Tensor, Tensor]:
    # Tall QRs in float32 (as precise as the stored factors); the k × k SVD in float64.
    for j, item in enumerate(batch):
        if item.shape != (m, n):
            raise ValueError(f"delta {j} has shape {item.shape}, expected {(m, n)}")
    scale = torch.tensor([item.scale for item in batch], dtype=torch.float64, device=device)
    if all(item.rank == k for item in batch):  # the usual case: one stack, no padding
        B = torch.stack([item.B for item in batch]).to(device=device, dtype=torch.float32)
        At = torch.stack([item.A for item in batch]).to(device=device, dtype=torch.float32)
        At = At.transpose(1, 2)
    else:
        B = torch.zeros(len(batch), m, k, device=device)
        At = torch.zeros(len(batch), n, k, device=device)
        for j, item in enumerate(batch):
            B[j, :, : item.rank] = item.B.to(device=device, dtype=torch.float32)
            At[j, :, : item.rank] = item.A.to(device=device, dtype=torch.float32).T
    P, T = torch.linalg.qr(B)
    Q, R = torch.linalg.qr(At)
    core = scale[:, None, None] * (T.double() @ R.double().transpose(1, 2))
    X, s, Yh = torch.linalg.svd(core)
    return P @ X.float(), s, Q @ Yh.transpose(1, 2).float()


def project(rows: Tensor, basis: Tensor) -> Tensor:
    """X_iᵀ·basis for every user at once: rows (N × k × d) → (N × k × r), one tall GEMM."""
    count, k, d = rows.shape
    return (rows.reshape(count * k, d) @ basis).view(count, k, -1)
