"""Top eigenpairs of Σ_i w_i D_i D_iᵀ from the factored form, never as an m × m matrix.

With D_i = E_i S_i F_iᵀ, Σ w_i D_i D_iᵀ = G Gᵀ where G = [√w_i E_i S_i] (m × N·k). Its
eigenvectors start the joint diagonalisation (truncated HOSVD) and its eigenvalue tail gives
the certificate. Where it is cheap (and cheaper than iterating) the leading eigenpairs come
from a direct float64 solver on the smaller Gram of G: N·k × N·k, or d × d when N·k > d — the
only place a d × d matrix is ever formed, bounded by that cost test. Otherwise a block
subspace iteration whose every product is two tall GEMMs over the stacked factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# The exact path is taken when its flops are below this, or below ~20 subspace iterations.
EXACT_FLOPS = 4e9
_TYPICAL_ITERATIONS = 20


@dataclass
class Spectrum:
    vectors: Tensor  # d × p, orthonormal, eigenvalues descending
    values: Tensor  # float64, descending: the leading p (or all of them)
    trace: float  # Σ of all eigenvalues = Σ w_i ‖D_i‖²
    exact: bool  # from a direct float64 solver (else: subspace iteration, accurate to its tol)

    def tail(self, r: int) -> float:
        """Sum of eigenvalues beyond the first r: trace − leading sum, in float64."""
        if r > len(self.values):
            raise ValueError(f"tail({r}) needs {r} leading eigenvalues, have {len(self.values)}")
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
    small = min(d, width)
    exact_flops = 4.0 * d * width * small + 10.0 * small**3  # float64 Gram + eigh
    iterative_flops = _TYPICAL_ITERATIONS * 4.0 * width * d * _work_width(p, d)
    if p >= small or exact_flops <= max(EXACT_FLOPS, iterative_flops):
        return _exact(rows, coef, p, trace)
    return _subspace_iteration(rows, coef, p, trace, tol=tol, max_iters=max_iters, seed=seed)


def _exact(rows: Tensor, coef: Tensor, p: int, trace: float) -> Spectrum:
    """The leading p eigenpairs from the smaller of the two Grams of G, in float64.

    Far faster on CPU than an SVD of G with vectors. The eigenvalues (hence trace − leading
    sum) are those of the Gram of G as rounded to float32 once, to ~1e-15 of its trace, and
    so within ~1e-9 of the exact one's: ample for the certificate.
    """
    count, k, d = rows.shape
    # G is formed at the precision of its inputs (float32 rows and coef), its products in
    # float64; the trace is that of the Gram actually decomposed, so that trace − leading sum
    # is consistent (a dot product: no m × N·k temporary).
    G32 = (rows.float() * coef.float().clamp_min(0).sqrt()[:, :, None]).reshape(count * k, d)
    Gt = G32.double()
    trace = float(Gt.view(-1) @ Gt.view(-1))
    if count * k < d:
        values, W = _leading_pairs(Gt @ Gt.T, p)
        keep = values > 1e-12 * float(values[0].clamp_min(1e-300))
        vectors = (Gt.T @ W[:, keep]) / values[keep].sqrt()
        vectors, _ = torch.linalg.qr(vectors)  # re-orthonormalise what rounding bent
    else:
        values, vectors = _leading_pairs_of_factor(G32, Gt, p)
    if vectors.shape[1] < p:  # fewer nonzero directions than asked: pad with a complement
        vectors = _complete_basis(vectors, p)
    return Spectrum(vectors.to(rows.dtype), values, trace, exact=True)


def _leading_pairs(gram: Tensor, p: int) -> tuple[Tensor, Tensor]:
    """The p largest eigenpairs of a symmetric PSD float64 matrix, descending.

    A float32 eigh (about twice as fast on CPU) finds the subspace; one float64 Rayleigh–Ritz
    step on it restores the values, whose error is quadratic in the vectors' (~1e-14).
    """
    n = gram.shape[0]
    if gram.is_cuda or 4 * p >= n:
        values, vectors = torch.linalg.eigh(gram)
        return values.flip(0)[:p].clamp_min(0), vectors.flip(1)[:, :p]
    _, rough = torch.linalg.eigh(gram.float())
    Q, _ = torch.linalg.qr(rough[:, -p:].double())
    H = Q.T @ gram @ Q
    values, W = torch.linalg.eigh((H + H.T) / 2)
    return values.flip(0).clamp_min(0), Q @ W.flip(1)


def _leading_pairs_of_factor(G32: Tensor, Gt: Tensor, p: int) -> tuple[Tensor, Tensor]:
    """`_leading_pairs(GtᵀGt, p)` for a tall Gt (and G32, the same in float32) without its
    float64 Gram, the costliest product of a whole-model run: the subspace from the float32
    Gram (as precise as the float32 eigh that reads it), the values from one float64
    Rayleigh–Ritz step through Gt itself."""
    d = Gt.shape[1]
    if Gt.is_cuda or 4 * p >= d:
        return _leading_pairs(Gt.T @ Gt, p)
    _, rough = torch.linalg.eigh(G32.T @ G32)
    Q, _ = torch.linalg.qr(rough[:, -p:].double())
    Z = Gt @ Q
    values, W = torch.linalg.eigh(Z.T @ Z)
    return values.flip(0).clamp_min(0), Q @ W.flip(1)


def _subspace_iteration(
    rows: Tensor, coef: Tensor, p: int, trace: float, *, tol: float, max_iters: int, seed: int
) -> Spectrum:
    d = rows.shape[2]
    width = _work_width(p, d)
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
    return Spectrum(vectors, ritz[:p].clamp_min(0), trace, exact=False)


def _work_width(p: int, d: int) -> int:
    # Oversampling makes the leading p Ritz values converge at the rate of λ_{p+q}/λ_p. The
    # stopping test is on the captured sum Σθ_j, which is what the tails and the start need.
    return min(d, p + max(16, p // 2))


def _complete_basis(Q: Tensor, p: int) -> Tensor:
    """Extend orthonormal columns Q (d × q) to p columns with an orthonormal complement."""
    d, q = Q.shape
    gen = torch.Generator(device="cpu").manual_seed(1)
    R = torch.randn(d, p - q, generator=gen, dtype=Q.dtype).to(Q.device)
    R = R - Q @ (Q.T @ R)
    R, _ = torch.linalg.qr(R - Q @ (Q.T @ R))
    return torch.cat([Q, R], dim=1)
