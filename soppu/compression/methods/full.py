"""Full cores: D_i ≈ U Σ_i Vᵀ, U and V orthonormal, Σ_i r_U × r_V (the factored joint
diagonalisation of `joint.py`; the default)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from torch import Tensor

    from soppu.compression.factors import CanonicalStack
    from soppu.compression.joint import Ranks, SlotFit
    from soppu.compression.project import Projected
    from soppu.compression.residuals import OrthoForm
    from soppu.compression.storage import SlotReader


class FullCores:
    name: ClassVar[str] = "full"
    help: ClassVar[str] = "full: an r×r core per user"

    def fit(self, stack, ranks: Ranks, weights, *, tol, max_iters, init=None) -> SlotFit:
        from soppu.compression.joint import fit_full

        return fit_full(stack, ranks, weights, tol=tol, max_iters=max_iters, init=init)

    def form(self, fit: SlotFit) -> OrthoForm:
        from soppu.compression.residuals import OrthoForm

        return OrthoForm(fit.U, fit.V, fit.cores)

    def stored_floats(self, fit: SlotFit) -> tuple[dict[str, Tensor], str]:
        """Each core in the cheapest exact form: its rank-k factors when they are smaller."""
        from soppu.compression.core_size import core_form

        tensors = {"U": fit.U, "V": fit.V}
        if fit.core_factors is not None:
            left, right = fit.core_factors
            if core_form(left.shape[2], *fit.ranks) == "factored":
                return {**tensors, "core_left": left, "core_right": right}, "factored"
        return {**tensors, "cores": fit.cores}, "dense"

    def core_params(self, k: int, r_u: int, r_v: int) -> int:
        from soppu.compression.core_size import cheapest_core_params

        return cheapest_core_params(k, r_u, r_v)

    def project(self, stack: CanonicalStack, reader: SlotReader, form: OrthoForm) -> Projected:
        from soppu.compression.project import project_full

        return project_full(stack, form.Qu, form.Qv)
