"""Top eigenpairs of Σ_i w_i D_i D_iᵀ from the factored form, never as an m × m matrix.

With D_i = E_i S_i F_iᵀ, Σ w_i D_i D_iᵀ = G Gᵀ where G = [√w_i E_i S_i] (m × N·k). Its
eigenvectors start the joint diagonalisation (truncated HOSVD) and its eigenvalue tail gives
the certificate. Small problems take an exact SVD of G; large ones a block subspace iteration
whose every product is two tall GEMMs over the stacked factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Above this many flops for an exact SVD of G, iterate instead (≈ 1 s on two CPU cores).
EXACT_SVD_FLOPS = 2e9


@dataclass
class Spectrum:
    vectors: Tensor  # d × p, orthonormal, eigenvalues descending
    values: Tensor  # float64, descending: all of them when complete, else the leading p
    trace: float  # Σ of all eigenvalues = Σ w_i ‖D_i‖²
    complete: bool  # True when `values` hold every nonzero eigenvalue

    def tail(self, r: int) -> float:
        """Sum of eigenvalues beyond the first r (exact to the solver's tolerance)."""
        if self.complete:  # summing the tail itself keeps tiny tails accurate
            return float(self.values[r:].sum())
        return max(self.trace - float(self.values[:r].sum()), 0.0)


def gram_apply(rows: Tensor, coef: Tensor, X: Tensor) -> Tensor:
    """Σ_i E_i diag(coef_i) E_iᵀ X, with rows = stacked E_iᵀ (N × k × d)."""
    count, k, d = rows.shape
    flat = rows.reshape(count * k, d)
    inner = (flat @ X).view(count, k, -1) * coef[:, :, None]
    return flat.T @ inner.reshape(count * k, -1)


def top_eigen(
    rows: Tensor,
    coef: Tensor,
    p: int,
    *,
    tol: float = 1e-5,
    max_iters: int = 30,
    seed: int = 0,
) -> Spectrum:
    """The p leading eigenpairs of Σ_i E_i diag(coef_i) E_iᵀ (coef = w_i·S_i²)."""
    count, k, d = rows.shape
    width = count * k
    trace = float((coef.double().sum(dim=1)).sum())
    p = max(1, min(p, d))
    if min(d, width) ** 2 * max(d, width) <= EXACT_SVD_FLOPS or p >= min(d, width):
        return _exact(rows, coef, p, trace)
    return _subspace_iteration(rows, coef, p, trace, tol=tol, max_iters=max_iters, seed=seed)


def _exact(rows: Tensor, coef: Tensor, p: int, trace: float) -> Spectrum:
    count, k, d = rows.shape
    G = (rows * coef.clamp_min(0).sqrt()[:, :, None]).reshape(count * k, d).T
    U, sv, _ = torch.linalg.svd(G.double(), full_matrices=False)
    vectors = U[:, :p]
    if vectors.shape[1] < p:  # fewer nonzero directions than asked: pad with a complement
        vectors = _complete_basis(vectors, p)
    return Spectrum(vectors.to(rows.dtype), sv**2, trace, complete=True)


def _subspace_iteration(
    rows: Tensor, coef: Tensor, p: int, trace: float, *, tol: float, max_iters: int, seed: int
) -> Spectrum:
    d = rows.shape[2]
    # Oversampling makes the leading p Ritz values converge at the rate of λ_{p+q}/λ_p. The
    # stopping test is on the captured sum Σθ_j, which is what the tails and the start need.
    width = min(d, p + max(16, p // 2))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    Q = torch.randn(d, width, generator=gen, dtype=torch.float64).to(rows)
    Q, _ = torch.linalg.qr(gram_apply(rows, coef, Q))
    previous = -1.0
    for _ in range(max_iters):
        Z = gram_apply(rows, coef, Q)
        H = (Q.T @ Z).double()
        ritz, W = torch.linalg.eigh((H + H.T) / 2)
        ritz, W = ritz.flip(0), W.flip(1)
        captured = float(ritz[:p].sum())
        if abs(captured - previous) <= tol * max(trace, 1e-300):
            break
        previous = captured
        Q, _ = torch.linalg.qr(Z)
    vectors = Q @ W[:, :p].to(Q.dtype)
    return Spectrum(vectors, ritz[:p].clamp_min(0), trace, complete=False)


def _complete_basis(Q: Tensor, p: int) -> Tensor:
    """Extend orthonormal columns Q (d × q) to p columns with an orthonormal complement."""
    d, q = Q.shape
    gen = torch.Generator(device="cpu").manual_seed(1)
    R = torch.randn(d, p - q, generator=gen, dtype=Q.dtype).to(Q.device)
    R = R - Q @ (Q.T @ R)
    R, _ = torch.linalg.qr(R - Q @ (Q.T @ R))
    return torch.cat([Q, R], dim=1)
