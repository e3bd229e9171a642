"""New users onto existing bases: their cores alone, no refit, and how far they drift.

For orthonormal bases Qu, Qv the best full core of a new delta is Quᵀ D Qv, kept as the exact
r_U × k times k × r_V product (Quᵀ E S)(Fᵀ Qv) that `storage` stores factored. For diagonal
stores (U, V not orthonormal) the best σ is the least-squares solution given U and V. The
drift of a delta is the share of its energy outside span(Qu) ⊗ span(Qv),
1 − ‖Quᵀ D Qv‖² / ‖D‖²: what no core on these bases can hold, so a drift far above the old
users' error says the bases no longer fit the population, and a refit (warm-started from these
bases) is due.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from soppu.compression.diagonal import _solve_sigma
from soppu.compression.factors import CanonicalStack, project
from soppu.compression.residuals import OrthoForm, relative, squared_errors


@dataclass
class Projected:
    """New deltas' cores on existing bases, with their errors."""

    cores: Tensor  # N × r_U × r_V in the orthonormal bases (what serving reconstructs)
    core_factors: tuple[Tensor, Tensor] | None  # full: (N × r_U × k, N × k × r_V)
    sigma: Tensor | None  # diag: N × r, on the stored (non-orthonormal) U, V
    sq_norms: Tensor  # ‖D_i‖²
    sq_errors: Tensor  # ‖D_i − D̂_i‖²
    drift: Tensor  # per delta: share of its energy outside the bases

    @property
    def errors(self) -> Tensor:
        return relative(self.sq_errors, self.sq_norms)


def project_full(stack: CanonicalStack, Qu: Tensor, Qv: Tensor) -> Projected:
    """Optimal full cores Quᵀ D_i Qv for orthonormal Qu, Qv."""
    left = (stack.S[:, :, None] * project(stack.Et, Qu)).transpose(1, 2)  # Quᵀ E_i S_i
    right = project(stack.Ft, Qv)  # F_iᵀ Qv
    cores = left @ right
    sq_errors = squared_errors(stack, OrthoForm(Qu, Qv, cores))
    norms = stack.sq_norms()
    drift = _share(sq_errors, norms)  # with the optimal core, the error is all drift
    return Projected(cores, (left, right), None, norms, sq_errors, drift)


def project_diag(stack: CanonicalStack, U: Tensor, V: Tensor) -> Projected:
    """Least-squares σ_i for stored diagonal-core bases U, V (not orthonormal)."""
    sigma = _solve_sigma(stack, U, V)
    form = OrthoForm.from_diag(U, V, sigma)
    sq_errors = squared_errors(stack, form)
    norms = stack.sq_norms()
    inside = project_full(stack, form.Qu, form.Qv).sq_errors  # outside span(U) ⊗ span(V)
    return Projected(form.cores, None, sigma, norms, sq_errors, _share(inside, norms))


def _share(part: Tensor, whole: Tensor) -> Tensor:
    safe = whole.clamp_min(1e-300)
    return torch.where(whole > 0, part.clamp_min(0) / safe, torch.zeros_like(whole))
