"""Diagonal cores: D_i ≈ U diag(σ_i) Vᵀ (a CP/PARAFAC model, U and V not orthonormal).

Alternating least squares, each block solved exactly (σ for every user, then U, then V), so the
weighted error can only go down. All products use the factored form: the U update needs
Σ_i w_i D_i V diag(σ_i) = Σ_i w_i E_i (S_i ⊙ F_iᵀV) diag(σ_i), one tall GEMM.
"""

from __future__ import annotations

import torch
from torch import Tensor

from soppu.compression.factors import CanonicalStack, project
from soppu.compression.joint import SlotFit, hosvd_start
from soppu.compression.residuals import OrthoForm, squared_errors


def fit_diag(
    stack: CanonicalStack,
    rank: int,
    weights: Tensor,
    *,
    tol: float = 1e-5,
    max_iters: int = 500,
) -> SlotFit:
    start = hosvd_start(stack, (rank, rank), weights)
    U, V, total = start.U.clone(), start.V.clone(), start.spec_u.trace
    w = weights.to(stack.S.dtype)
    sigma = _solve_sigma(stack, U, V)
    error = _error(stack, U, V, sigma, weights, total)
    history = [total - error]
    converged = False
    for _ in range(max_iters):
        U = _solve_basis(stack.Et, stack.S, project(stack.Ft, V), V, sigma, w)
        V = _solve_basis(stack.Ft, stack.S, project(stack.Et, U), U, sigma, w)
        U, V, sigma = _normalise(U, V, _solve_sigma(stack, U, V))
        error = _error(stack, U, V, sigma, weights, total)
        history.append(total - error)
        if history[-1] - history[-2] <= tol * max(total, 1e-300):
            converged = True
            break
    sq_errors = squared_errors(stack, OrthoForm.from_diag(U, V, sigma))
    bracket = start.bracket(weights, sq_errors)
    return SlotFit(U, V, "diag", sigma, weights, bracket, sq_errors, history, converged)


def diag_of_projection(stack: CanonicalStack, U: Tensor, V: Tensor) -> Tensor:
    """diag(Uᵀ D_i V) for every user: N × r."""
    EU, FV = project(stack.Et, U), project(stack.Ft, V)
    return (stack.S[:, :, None] * EU * FV).sum(dim=1)


def _solve_sigma(stack: CanonicalStack, U: Tensor, V: Tensor) -> Tensor:
    gram = ((U.T @ U) * (V.T @ V)).double()
    rhs = diag_of_projection(stack, U, V).double().T
    return _ridge_solve(gram, rhs).T.to(U.dtype)


def _solve_basis(
    rows: Tensor, S: Tensor, other_proj: Tensor, other: Tensor, sigma: Tensor, w: Tensor
) -> Tensor:
    """argmin_X Σ w_i ‖D_i − X diag(σ_i) Yᵀ‖² for the side whose stacked rows are `rows`."""
    count, k, d = rows.shape
    coeff = w[:, None, None] * S[:, :, None] * other_proj * sigma[:, None, :]
    rhs = rows.reshape(count * k, d).T @ coeff.reshape(count * k, -1)
    weighted_outer = (w.double()[:, None] * sigma.double()).T @ sigma.double()
    lhs = (other.T @ other).double() * weighted_outer
    return _ridge_solve(lhs, rhs.double().T).T.to(rows.dtype)


def _ridge_solve(A: Tensor, B: Tensor) -> Tensor:
    """Solve A X = B for symmetric PSD A; a tiny ridge keeps dead components finite."""
    ridge = 1e-12 * float(A.diagonal().abs().max().clamp_min(1e-300))
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return torch.linalg.solve(A + ridge * eye, B)


def _normalise(U: Tensor, V: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unit-norm columns, the scale moved into σ, so stored bases are comparable."""
    nu, nv = U.norm(dim=0).clamp_min(1e-30), V.norm(dim=0).clamp_min(1e-30)
    return U / nu, V / nv, sigma * (nu * nv)


def _error(
    stack: CanonicalStack, U: Tensor, V: Tensor, sigma: Tensor, weights: Tensor, total: float
) -> float:
    """Σ w ‖D_i − U Σ_i Vᵀ‖² = Σ w (‖D_i‖² − 2⟨σ_i, diag UᵀD_iV⟩ + σ_iᵀ (UᵀU∘VᵀV) σ_i)."""
    proj = diag_of_projection(stack, U, V).double()
    s = sigma.double()
    gram = ((U.T @ U) * (V.T @ V)).double()
    cross = (proj * s).sum(dim=1)
    model = ((s @ gram) * s).sum(dim=1)
    return total + float((weights * (model - 2 * cross)).sum())
