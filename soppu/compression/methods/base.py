"""What a compression method is: how one slot's deltas become shared bases and per-user cores.

A method fits a slot (`fit`), says how its fit reads as orthonormal bases and per-user cores
(`form`, from which every method's adapters are exported alike, `export.export_lora`), what
it stores (`stored_floats`, in one of the store's core forms) and what a core costs
(`core_params`, the count every rank choice, budget and report uses), and puts new users onto
a store's bases without a refit (`project`, for `soppu add`).

This module and the method files import no torch at import time: the command line builds its
choices and help from `METHODS` without loading it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from torch import Tensor

    from soppu.compression.factors import CanonicalStack
    from soppu.compression.joint import Ranks, SlotFit
    from soppu.compression.project import Projected
    from soppu.compression.residuals import OrthoForm
    from soppu.compression.storage import SlotReader


class CompressionMethod(Protocol):
    name: ClassVar[str]  # what `--sigma` and CompressionConfig.sigma call it
    help: ClassVar[str]  # one line for the command line's help

    def fit(
        self,
        stack: CanonicalStack,
        ranks: Ranks,
        weights: Tensor,
        *,
        tol: float,
        max_iters: int,
        init: tuple[Tensor, Tensor] | None = None,
    ) -> SlotFit:
        """Shared bases and every delta's core at (r_U, r_V); `init` = (U, V) of an earlier
        fit to start from, where the method can."""
        ...

    def form(self, fit: SlotFit) -> OrthoForm:
        """The fit as orthonormal bases and per-delta cores (what errors, export and
        serving read)."""
        ...

    def stored_floats(self, fit: SlotFit) -> tuple[dict[str, Tensor], str]:
        """The tensors a slot file keeps, in float, and their core form (one of
        `storage.FORMS`, which the store's reader knows)."""
        ...

    def core_params(self, k: int, r_u: int, r_v: int) -> int:
        """Numbers stored for one user's core at LoRA rank k and ranks (r_U, r_V)."""
        ...

    def project(self, stack: CanonicalStack, reader: SlotReader, form: OrthoForm) -> Projected:
        """New deltas' cores on a store's bases: `form` holds their orthonormal read-back;
        `reader` reads the slot file's own tensors, for a method that needs them as stored."""
        ...
