"""Reconstruction errors in factored form, free of cancellation.

Any fit can be written D̂_i = Q_u C_i Q_vᵀ with orthonormal Q_u, Q_v. The residual then splits
into three mutually orthogonal pieces,

    D_i − D̂_i = (I−P_u) D_i  +  P_u D_i (I−P_v)  +  Q_u (Q_uᵀ D_i Q_v − C_i) Q_vᵀ,

each computed from explicitly projected factors rather than as ‖D‖² − ‖UᵀDV‖², which would lose
every digit once the error is small. The personal-part error (D_i − D̄) − (D̂_i − D̄̂) splits the
same way; only its first piece needs one dense m × n mean per module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from soppu.compression.factors import CanonicalStack, project

_CHUNK_FLOATS = 1 << 24


@dataclass
class OrthoForm:
    """D̂_i = Qu · cores[i] · Qvᵀ with orthonormal Qu (m × r) and Qv (n × r)."""

    Qu: Tensor
    Qv: Tensor
    cores: Tensor  # N × r × r

    @staticmethod
    def from_diag(U: Tensor, V: Tensor, sigma: Tensor) -> OrthoForm:
        """U diag(σ_i) Vᵀ = Qu (Ru diag(σ_i) Rvᵀ) Qvᵀ."""
        Qu, Ru = torch.linalg.qr(U)
        Qv, Rv = torch.linalg.qr(V)
        return OrthoForm(Qu, Qv, (Ru * sigma[:, None, :]) @ Rv.T)


@dataclass
class _Pieces:
    """Per-delta residual pieces for a chunk of users (rows = users)."""

    Et_perp: Tensor  # (I−P_u) E_i, as rows: c × k × m
    Ft_perp: Tensor  # (I−P_v) F_i, as rows: c × k × n
    X: Tensor  # (S ⊙ E_iᵀQ_u): c × k × r, so Q_uᵀ E_i S_i = X_iᵀ
    inner: Tensor  # Q_uᵀ D_i Q_v: c × r × r


def _pieces(stack: CanonicalStack, form: OrthoForm, idx: Tensor) -> _Pieces:
    Et, Ft, S = stack.Et[idx], stack.Ft[idx], stack.S[idx]
    a, b = project(Et, form.Qu), project(Ft, form.Qv)
    X = S[:, :, None] * a
    return _Pieces(Et - a @ form.Qu.T, Ft - b @ form.Qv.T, X, X.transpose(1, 2) @ b)


def _chunks(stack: CanonicalStack, members: Tensor) -> list[Tensor]:
    width = stack.rank * max(stack.shape)
    size = max(1, _CHUNK_FLOATS // max(width, 1))
    return list(members.split(size))


def relative(sq_errors: Tensor, sq_norms: Tensor) -> Tensor:
    """‖D − D̂‖ / ‖D‖ from the squares: 0 for a zero delta, NaN where the norm is unknown."""
    safe = torch.where(sq_norms > 0, sq_norms, torch.ones_like(sq_norms))
    out = (sq_errors.clamp_min(0) / safe).sqrt()
    zero_or_nan = torch.where(sq_norms.isnan(), sq_norms, torch.zeros_like(sq_norms))
    return torch.where(sq_norms > 0, out, zero_or_nan)


def squared_errors(stack: CanonicalStack, form: OrthoForm) -> Tensor:
    """‖D_i − D̂_i‖²_F for every delta (float64)."""
    device = stack.S.device
    out = torch.zeros(stack.count, dtype=torch.float64, device=device)
    for idx in _chunks(stack, torch.arange(stack.count, device=device)):
        p = _pieces(stack, form, idx)
        S = stack.S[idx].double()
        first = (S**2 * (p.Et_perp.double() ** 2).sum(dim=2)).sum(dim=1)
        second = _cross_gram(p.X, p.Ft_perp)
        third = ((p.inner - form.cores[idx]).double() ** 2).sum(dim=(1, 2))
        out[idx] = first + second + third
    return out


def _cross_gram(X: Tensor, Ft_perp: Tensor) -> Tensor:
    """‖X_iᵀ F̃_iᵀ‖² = ⟨X_i X_iᵀ, F̃t_i F̃t_iᵀ⟩ via k × k Grams."""
    gx = (X @ X.transpose(1, 2)).double()
    gf = (Ft_perp @ Ft_perp.transpose(1, 2)).double()
    return (gx * gf).sum(dim=(1, 2))


def personal_errors(
    stack: CanonicalStack, form: OrthoForm, groups: Sequence[Sequence[int]]
) -> tuple[Tensor, Tensor]:
    """‖(D_i − D̄) − (D̂_i − D̄̂)‖² and ‖D_i − D̄‖² per delta, means taken within each group.

    A group is the set of users' deltas for one module; groups of one get NaN (no personal part).
    """
    device = stack.S.device
    num = torch.full((stack.count,), float("nan"), dtype=torch.float64, device=device)
    den = torch.full((stack.count,), float("nan"), dtype=torch.float64, device=device)
    for group in groups:
        if len(group) < 2:
            continue
        members = torch.as_tensor(list(group), dtype=torch.long, device=device)
        dev_perp, dev_mid, inner, delta = _group_terms(stack, form, members)
        inner_dev = ((inner - inner.mean(0)) ** 2).sum(dim=(1, 2))
        delta_dev = ((delta - delta.mean(0)) ** 2).sum(dim=(1, 2))
        num[members] = (dev_perp + dev_mid + delta_dev).clamp_min(0)
        den[members] = (dev_perp + dev_mid + inner_dev).clamp_min(0)
    return num, den


def _group_terms(
    stack: CanonicalStack, form: OrthoForm, members: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    m, n = stack.shape
    r = form.Qu.shape[1]
    count = len(members)
    chunks = _chunks(stack, members)
    # Pass 1: the group means of the two outer pieces (dense m × n and r × n).
    mean_perp = torch.zeros(m, n, dtype=stack.Et.dtype, device=stack.Et.device)
    mean_mid = torch.zeros(r, n, dtype=stack.Et.dtype, device=stack.Et.device)
    for idx in chunks:
        p = _pieces(stack, form, idx)
        S = stack.S[idx]
        mean_perp += p.Et_perp.reshape(-1, m).T @ (S[:, :, None] * stack.Ft[idx]).reshape(-1, n)
        mean_mid += p.X.reshape(-1, r).T @ p.Ft_perp.reshape(-1, n)
    mean_perp /= count
    mean_mid /= count
    # Pass 2: ‖p_i − p̄‖² = ‖p_i‖² − 2⟨p_i, p̄⟩ + ‖p̄‖² for both pieces.
    dev_perp, dev_mid, inner, delta = [], [], [], []
    sq_perp, sq_mid = float((mean_perp.double() ** 2).sum()), float((mean_mid.double() ** 2).sum())
    for idx in chunks:
        p = _pieces(stack, form, idx)
        S = stack.S[idx].double()
        own_perp = (S**2 * (p.Et_perp.double() ** 2).sum(dim=2)).sum(dim=1)
        proj = (p.Et_perp @ mean_perp).double()  # c × k × n
        dot_perp = (S * (proj * stack.Ft[idx].double()).sum(dim=2)).sum(dim=1)
        dev_perp.append(own_perp - 2 * dot_perp + sq_perp)
        own_mid = _cross_gram(p.X, p.Ft_perp)
        dot_mid = (p.X.double() * (p.Ft_perp @ mean_mid.T).double()).sum(dim=(1, 2))
        dev_mid.append(own_mid - 2 * dot_mid + sq_mid)
        inner.append(p.inner.double())
        delta.append((p.inner - form.cores[idx]).double())
    return torch.cat(dev_perp), torch.cat(dev_mid), torch.cat(inner), torch.cat(delta)
