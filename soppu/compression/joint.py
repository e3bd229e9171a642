"""Factored joint diagonalisation of one slot: D_i ≈ U Σ_i Vᵀ with U, V shared.

For orthonormal U, V the best Σ_i is Uᵀ D_i V, so the fit maximises Σ_i w_i ‖Uᵀ D_i V‖² (GLRAM,
i.e. two-mode Tucker/HOOI). We start from the truncated HOSVD and alternate exact block
updates: each half-step does Rayleigh–Ritz over span[V, M(U)·V], which contains the current
basis, so the objective can never go down. Every product is a tall GEMM over the stacked
thin-SVD factors; no D_i is ever formed, and no m × m matrix outside the cost-bounded exact
start in spectrum.py. Cost per iteration ≈ 6·N·k·r·(m + n).

The two sides have ranks of their own, (r_U, r_V), and Σ_i is r_U × r_V: a narrow slot (16 × 64,
like a GQA v_proj) is exact at r_U = 16 while its input side still needs every direction the
users span. A requested rank never exceeds what a side spans: min(its dimension, Σ_i rank D_i).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from soppu.compression.core_size import cheapest_core_params
from soppu.compression.factors import CanonicalStack, project
from soppu.compression.residuals import OrthoForm, squared_errors
from soppu.compression.spectrum import Spectrum, top_eigen


@dataclass
class Bracket:
    """Where a fit sits between what any shared basis could do and the HOSVD guarantee.

    All values are weighted squared errors Σ_i w_i ‖D_i − D̂_i‖²; `total` is Σ_i w_i ‖D_i‖².
    lower ≤ best possible ≤ achieved (full Σ) ≤ hosvd ≤ upper.
    """

    lower: float
    hosvd: float
    upper: float
    achieved: float
    total: float
    exact: bool  # False when the spectra came from an iterative solver (accurate to its tol)

    def relative(self, value: float) -> float:
        return (value / self.total) ** 0.5 if self.total > 0 else 0.0

    def as_dict(self) -> dict[str, float | bool]:
        return {
            "lower": self.relative(self.lower),
            "hosvd": self.relative(self.hosvd),
            "upper": self.relative(self.upper),
            "achieved": self.relative(self.achieved),
            "spectra_exact": self.exact,
        }


Ranks = tuple[int, int]  # (r_U, r_V): the output side's and the input side's


@dataclass
class SlotFit:
    """Shared bases and per-delta cores for one slot."""

    U: Tensor  # m × r_U
    V: Tensor  # n × r_V
    sigma: str  # the method that made it (`methods.METHODS`): "full": cores N × r_U × r_V;
    # "diag": cores N × r (r_U = r_V = r; U, V then not orthonormal)
    cores: Tensor
    weights: Tensor  # N, float64
    bracket: Bracket
    sq_errors: Tensor  # ‖D_i − D̂_i‖² per delta, float64
    history: list[float] = field(default_factory=list)  # captured energy, nondecreasing
    converged: bool = True
    # Full cores as exact rank-k products L_i (r × k) @ R_i (k × r), when the fit has them.
    core_factors: tuple[Tensor, Tensor] | None = None

    @property
    def iterations(self) -> int:
        return len(self.history) - 1

    @property
    def ranks(self) -> Ranks:
        return (self.U.shape[1], self.V.shape[1])

    def form(self) -> OrthoForm:
        from soppu.compression.methods import method_named  # the methods call this module

        return method_named(self.sigma).form(self)


def user_weights(stack: CanonicalStack, scheme: str) -> Tensor:
    """uniform: big-norm users own the basis; norm: w_i = 1/‖D_i‖², every user counts alike."""
    norms = stack.sq_norms()
    if scheme == "uniform":
        return torch.ones_like(norms)
    if scheme == "norm":
        return torch.where(norms > 0, 1.0 / norms.clamp_min(1e-300), torch.zeros_like(norms))
    raise ValueError(f"unknown weighting {scheme!r}: use 'uniform' or 'norm'")


def hosvd_spectra(
    stack: CanonicalStack, weights: Tensor, p_u: int, p_v: int | None = None
) -> tuple[Spectrum, Spectrum]:
    coef = (weights[:, None] * stack.S.double() ** 2).to(stack.S.dtype)
    return top_eigen(stack.Et, coef, p_u), top_eigen(stack.Ft, coef, p_v or p_u)


def span(stack: CanonicalStack) -> Ranks:
    """How many directions each side can need: min(dimension, Σ_i rank D_i)."""
    S = stack.S
    floor = 1e-7 * float(S.max().clamp_min(1e-300)) if S.numel() else 0.0
    directions = int((S.abs() > floor).sum())  # Σ_i rank D_i, numerically
    m, n = stack.shape
    return (max(1, min(m, directions)), max(1, min(n, directions)))


def cap_ranks(stack: CanonicalStack, rank: int) -> Ranks:
    """`rank` on each side, capped at what that side spans."""
    span_u, span_v = span(stack)
    return (min(rank, span_u), min(rank, span_v))


def choose_ranks(stack: CanonicalStack, weights: Tensor, energy: float, max_rank: int) -> Ranks:
    """The cheapest (r_U, r_V) whose HOSVD guarantee τ_U(r_U) + τ_V(r_V) keeps `energy` of
    the weighted total; storage r_U·m + r_V·n + N·min(r_U·r_V, k·(r_U + r_V)) (a core is
    stored as its k-rank factors when they are smaller).

    The fit starts at the HOSVD and only improves, so the target is met for certain.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy target must be in (0, 1], got {energy}")
    cap_u, cap_v = (min(max_rank, side) for side in span(stack))
    p_u, p_v = min(cap_u, 64), min(cap_v, 64)
    m, n = stack.shape
    while True:
        spec_u, spec_v = hosvd_spectra(stack, weights, p_u, p_v)
        budget = (1.0 - energy) * spec_u.trace * (1 + 1e-12)
        tails_u = [spec_u.tail(r) for r in range(1, p_u + 1)]
        tails_v = [spec_v.tail(r) for r in range(1, p_v + 1)]
        best: tuple[int, Ranks] | None = None
        r_v = p_v
        for r_u in range(1, p_u + 1):  # the smallest r_V that fits falls as r_U grows
            while r_v > 1 and tails_u[r_u - 1] + tails_v[r_v - 2] <= budget:
                r_v -= 1
            if tails_u[r_u - 1] + tails_v[r_v - 1] <= budget:
                core = cheapest_core_params(stack.rank, r_u, r_v)
                cost = r_u * m + r_v * n + stack.count * core
                if best is None or cost < best[0]:
                    best = (cost, (r_u, r_v))
        if best is not None:
            return best[1]
        if p_u >= cap_u and p_v >= cap_v:
            return (cap_u, cap_v)
        p_u, p_v = min(cap_u, 2 * p_u), min(cap_v, 2 * p_v)


def fit_full(
    stack: CanonicalStack,
    ranks: Ranks,
    weights: Tensor,
    *,
    tol: float = 1e-5,
    max_iters: int = 200,
    init: tuple[Tensor, Tensor] | None = None,
) -> SlotFit:
    """Full Σ_i: alternate Rayleigh–Ritz block updates of V and U from the HOSVD start, or
    from `init` = (U, V), bases of an earlier fit (a refit after new users joined), when it
    captures more."""
    start = hosvd_start(stack, ranks, weights)
    U, V, total = start.U, start.V, start.spec_u.trace
    w = weights.to(stack.S.dtype)
    EU, FV = start.EU, start.FV
    captured = start.captured
    if init is not None:
        warm = _warm(stack, init, start, weights)
        if warm[4] > captured:
            U, V, EU, FV, captured = warm
    history = [captured]
    converged = False
    for _ in range(max_iters):
        V, FV, _ = _ritz_step(stack.Ft, stack.S[:, :, None] * EU, FV, V, w)
        U, EU, captured = _ritz_step(stack.Et, stack.S[:, :, None] * FV, EU, U, w)
        history.append(captured)
        if captured - history[-2] <= tol * max(total, 1e-300):
            converged = True
            break
    left = (stack.S[:, :, None] * EU).transpose(1, 2)  # Uᵀ E_i S_i
    cores = left @ FV
    sq_errors = squared_errors(stack, OrthoForm(U, V, cores))
    bracket = start.bracket(weights, sq_errors)
    fit = SlotFit(U, V, "full", cores, weights, bracket, sq_errors, history, converged)
    fit.core_factors = (left, FV)
    return fit


def _warm(
    stack: CanonicalStack, init: tuple[Tensor, Tensor], start: HosvdStart, weights: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """Orthonormal bases from earlier ones (their leading columns, topped up from the HOSVD
    start's when fewer than now needed)."""
    bases = []
    for old, new in zip(init, (start.U, start.V), strict=True):
        r = new.shape[1]
        Q, _ = torch.linalg.qr(old.to(new)[:, :r])
        if Q.shape[1] < r:
            Q = torch.linalg.qr(torch.cat([Q, new - Q @ (Q.T @ new)], dim=1))[0][:, :r]
        bases.append(Q)
    U, V = bases
    EU, FV = project(stack.Et, U), project(stack.Ft, V)
    return U, V, EU, FV, _captured(stack.S, EU, FV, weights)


def _hosvd_sq_error(stack: CanonicalStack, weights: Tensor, start: HosvdStart) -> float:
    """Weighted error of the truncated HOSVD with its optimal cores.

    total − captured is exact enough unless the error is tiny; then pay for the
    cancellation-free residual.
    """
    total = float((weights * stack.sq_norms()).sum())
    error = total - start.captured
    if error > 1e-3 * total:
        return error
    cores = _cores(stack.S, start.EU, start.FV)
    return float((weights * squared_errors(stack, OrthoForm(start.U, start.V, cores))).sum())


@dataclass
class HosvdStart:
    """The truncated HOSVD: where every fit starts, and the certificate's eigenvalue tails."""

    spec_u: Spectrum
    spec_v: Spectrum
    U: Tensor
    V: Tensor
    EU: Tensor  # E_iᵀ U for every user: the first iteration starts from these
    FV: Tensor  # F_iᵀ V
    captured: float  # Σ w_i ‖Uᵀ D_i V‖²
    error: float = 0.0  # weighted squared error of the HOSVD with its optimal full cores

    def bracket(self, weights: Tensor, sq_errors: Tensor) -> Bracket:
        tail_u, tail_v = self.spec_u.tail(self.U.shape[1]), self.spec_v.tail(self.V.shape[1])
        return Bracket(
            lower=max(tail_u, tail_v),
            hosvd=self.error,
            upper=tail_u + tail_v,
            achieved=float((weights * sq_errors).sum()),
            total=self.spec_u.trace,
            exact=self.spec_u.exact and self.spec_v.exact,
        )


def hosvd_start(stack: CanonicalStack, ranks: Ranks, weights: Tensor) -> HosvdStart:
    r_u, r_v = (min(r, side) for r, side in zip(ranks, span(stack), strict=True))
    spec_u, spec_v = hosvd_spectra(stack, weights, r_u, r_v)
    U, V = spec_u.vectors[:, :r_u], spec_v.vectors[:, :r_v]
    EU, FV = project(stack.Et, U), project(stack.Ft, V)
    start = HosvdStart(spec_u, spec_v, U, V, EU, FV, _captured(stack.S, EU, FV, weights))
    start.error = _hosvd_sq_error(stack, weights, start)
    return start


def _cores(S: Tensor, EU: Tensor, FV: Tensor) -> Tensor:
    """Uᵀ D_i V = (S_i ⊙ E_iᵀU)ᵀ (F_iᵀV) for every user."""
    return (S[:, :, None] * EU).transpose(1, 2) @ FV


def _captured(S: Tensor, EU: Tensor, FV: Tensor, weights: Tensor) -> float:
    cores = _cores(S, EU, FV)
    return float((weights * (cores.double() ** 2).sum(dim=(1, 2))).sum())


def _ritz_step(
    rows: Tensor, Z: Tensor, projected: Tensor, basis: Tensor, w: Tensor
) -> tuple[Tensor, Tensor, float]:
    """Best r-dim basis within span[basis, M·basis], M = Σ w_i X_i Z_i Z_iᵀ X_iᵀ.

    rows: X_iᵀ stacked (N × k × d); Z: N × k × r (the other side's projection, scaled by S);
    projected: X_iᵀ basis (N × k × r). Returns the new basis, X_iᵀ·new basis, and the
    captured energy Σ w_i ‖Z_iᵀ X_iᵀ new‖².
    """
    count, k, d = rows.shape
    r = basis.shape[1]
    flat = rows.reshape(count * k, d)
    cores = Z.transpose(1, 2) @ projected  # N × r × r
    grown = flat.T @ (w[:, None, None] * (Z @ cores)).reshape(count * k, r)
    Q, _ = torch.linalg.qr(torch.cat([basis, grown], dim=1)[:, : min(2 * r, d)])
    XQ = (flat @ Q).view(count, k, -1)
    J = (w.sqrt()[:, None, None] * (Z.transpose(1, 2) @ XQ)).reshape(-1, Q.shape[1])
    H = (J.T @ J).double()
    values, W = torch.linalg.eigh((H + H.T) / 2)
    top = W[:, -r:].flip(1).to(Q.dtype)
    return Q @ top, XQ @ top, float(values[-r:].sum())
