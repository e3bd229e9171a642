"""Diagonal cores: D_i ≈ U diag(σ_i) Vᵀ, r numbers per user (the CP/PARAFAC model of
`diagonal.py`; U and V not orthonormal, r_U = r_V)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from torch import Tensor

    from soppu.compression.factors import CanonicalStack
    from soppu.compression.joint import Ranks, SlotFit
    from soppu.compression.project import Projected
    from soppu.compression.residuals import OrthoForm
    from soppu.compression.storage import SlotReader


class DiagonalCores:
    name: ClassVar[str] = "diag"
    help: ClassVar[str] = "diag: r numbers per user"

    def fit(self, stack, ranks: Ranks, weights, *, tol, max_iters, init=None) -> SlotFit:
        """One rank for both sides, the smaller; no warm start (`init` is not used)."""
        from soppu.compression.diagonal import fit_diag

        return fit_diag(stack, min(ranks), weights, tol=tol, max_iters=max_iters)

    def form(self, fit: SlotFit) -> OrthoForm:
        from soppu.compression.residuals import OrthoForm

        return OrthoForm.from_diag(fit.U, fit.V, fit.cores)

    def stored_floats(self, fit: SlotFit) -> tuple[dict[str, Tensor], str]:
        return {"U": fit.U, "V": fit.V, "sigma": fit.cores}, "diag"

    def core_params(self, k: int, r_u: int, r_v: int) -> int:
        return r_u

    def project(self, stack: CanonicalStack, reader: SlotReader, form: OrthoForm) -> Projected:
        """Least squares on U and V as stored (not orthonormal), read only here."""
        from soppu.compression.project import project_diag

        return project_diag(stack, *reader.bases())
