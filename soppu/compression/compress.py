"""One call per slot: canonical form → rank → fit → errors.

This is the entry point a stranger uses on adapters from anywhere:

    result = compress_slot([LoRAFactors(A, B, scale), ...], CompressionConfig(rank=32))
    result.errors            # relative product error per delta
    result.export(i, 16)     # (A', B') PEFT factors at serving rank 16, scale 1
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor

from soppu.compression.clusters import MAX_AUTO_CLUSTERS, Clustering, fit_clusters, rank_for_budget
from soppu.compression.export import core_ranks, export_lora
from soppu.compression.factors import CanonicalStack, LoRAFactors, canonicalize, item_ranks
from soppu.compression.joint import SlotFit, cap_ranks, choose_ranks, user_weights
from soppu.compression.methods import method_named
from soppu.compression.residuals import OrthoForm, personal_errors, relative, squared_errors
from soppu.compression.slots import GROUPINGS
from soppu.compression.storage import BITS, SlotStorage

WEIGHTINGS = ("uniform", "norm")


@dataclass(frozen=True)
class CompressionConfig:
    """How to compress. Exactly one of `rank` and `energy` decides r (rank wins if both)."""

    rank: int | None = None  # fixed shared rank r per slot (may exceed the LoRA rank k)
    energy: float | None = None  # else: smallest r keeping this share of the weighted energy
    sigma: str = "full"  # methods.METHODS: "full" (r × r core per user), "diag" (r numbers)
    weights: str = "uniform"  # "uniform" or "norm" (w_i = 1/‖D_i‖²: every user counts alike)
    group: str = "slot"  # "slot": per (layer, module); "shape": one basis per tensor shape
    tol: float = (
        1e-5  # stop when an iteration gains less than tol × total energy (fp32 noise ≈ 1e-7)
    )
    max_iters: int = 200
    max_rank: int = 1024  # ceiling for energy-chosen ranks
    device: str = "cpu"
    personal_error: bool = True  # costs one dense m × n mean per module
    bits: int = 32  # 8 or 4: bases and cores stored as integer codes, a scale per column
    clusters: int = 1  # bases per slot; 0: choose 1–4 per slot at the one-basis budget

    def __post_init__(self) -> None:
        if self.rank is None and self.energy is None:
            raise ValueError("give a shared rank (rank=R) or an energy target (energy=E)")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be ≥ 1, got {self.rank}")
        method_named(self.sigma)  # one of methods.METHODS, or a ValueError naming them
        if self.group not in GROUPINGS:
            raise ValueError(f"group must be one of {GROUPINGS}, got {self.group!r}")
        if self.weights not in WEIGHTINGS:
            raise ValueError(f"weights must be one of {WEIGHTINGS}, got {self.weights!r}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if self.clusters < 0:
            raise ValueError(f"clusters must be ≥ 1, or 0 to choose, got {self.clusters}")
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits}")
        if not 0.0 < self.tol <= 1.0:  # NaN fails too
            raise ValueError(f"tol must be in (0, 1], got {self.tol}")
        if self.max_iters < 1 or self.max_rank < 1:
            raise ValueError(
                f"max_iters and max_rank must be ≥ 1, got {self.max_iters}, {self.max_rank}"
            )
        known = ("cpu", "cuda", "mps")
        if self.device.split(":")[0] not in known:
            raise ValueError(f"device must be one of {known} (cuda:N too), got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but torch sees no CUDA device")

    @classmethod
    def from_target(
        cls,
        *,
        rank: int | None = None,
        energy: float | None = None,
        max_error: float | None = None,
        **rest: Any,
    ) -> CompressionConfig:
        """From what a user asks for: a shared rank, or the energy to keep, or the relative
        error allowed (energy = 1 − e², the HOSVD guarantee); neither: keep 90% of the energy."""
        if max_error is not None and energy is None:
            energy = 1.0 - max_error**2
        if rank is None and energy is None:
            energy = 0.9
        return cls(rank=rank, energy=energy, **rest)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class SlotResult:
    """A fitted slot and its honest per-delta accounting."""

    fit: SlotFit
    form: OrthoForm  # what is stored, as read back (quantised values, if any)
    stored: SlotStorage
    sq_norms: Tensor  # ‖D_i‖²
    sq_errors: Tensor  # ‖D_i − D̂_i‖² of what is stored
    sq_errors_float: Tensor  # the same before quantisation (= sq_errors at 32 bits)
    personal_sq_errors: Tensor  # ‖(D_i − D̄) − (D̂_i − D̄̂)‖² (NaN when not measured)
    personal_sq_norms: Tensor  # ‖D_i − D̄‖²
    lora_ranks: Tensor  # k_i of the inputs
    shape: tuple[int, int]

    @property
    def errors(self) -> Tensor:
        """Relative product error ‖D_i − D̂_i‖ / ‖D_i‖ (0 for an all-zero delta)."""
        return relative(self.sq_errors, self.sq_norms)

    @property
    def personal_errors(self) -> Tensor:
        return relative(self.personal_sq_errors, self.personal_sq_norms)

    def core_ranks(self) -> Tensor:
        return core_ranks(self.form.cores)

    def max_core_rank(self) -> int:
        """max(core_ranks()), which cannot pass min(k, r_U, r_V): the first cores usually
        reach that bound, and then the others need no decomposition (1,000 batched SVDs per
        slot were 8% of a whole-model run)."""
        cores = self.form.cores
        if not len(cores):
            return 0
        bound = min(int(self.lora_ranks.max()), *cores.shape[1:])
        if int(core_ranks(cores[:8]).max()) >= bound:
            return bound
        return min(bound, int(core_ranks(cores).max()))

    def reconstruct(self, i: int) -> Tensor:
        """D̂_i dense (float64); for tests and small checks only."""
        f = self.form
        return f.Qu.double() @ f.cores[i].double() @ f.Qv.double().T

    def export(self, i: int, rank: int) -> tuple[Tensor, Tensor]:
        return export_lora(self.form.Qu, self.form.cores[i], self.form.Qv, rank)

    def params_before(self) -> int:
        m, n = self.shape
        return int(self.lora_ranks.sum()) * (m + n)

    def params_after(self) -> int:
        """Shared bases plus every core in its cheapest exact stored form."""
        m, n = self.shape
        r_u, r_v = self.fit.ranks
        return r_u * m + r_v * n + core_storage(self.fit, self.lora_ranks)

    def bytes_before(self) -> int:
        """The users' LoRA factors as float32, as the federation stores them."""
        return 4 * self.params_before()

    def bytes_after(self) -> int:
        """What the slot's file holds: floats, or codes and their scales."""
        return self.stored.nbytes


def core_storage(fit: SlotFit, lora_ranks: Tensor) -> int:
    """Numbers stored for the cores, as the fit's method counts one; k is the padded width
    actually written (the slot's largest)."""
    count, (r_u, r_v) = fit.cores.shape[0], fit.ranks
    k = int(lora_ranks.max()) if len(lora_ranks) else 0
    return count * method_named(fit.sigma).core_params(k, r_u, r_v)


def compress_slot(
    items: Sequence[LoRAFactors],
    config: CompressionConfig,
    module_groups: Sequence[Sequence[int]] | None = None,
) -> SlotResult:
    """Jointly compress the deltas of one slot (all of one shape).

    `module_groups` lists item indices per module (for the personal-part error); by default
    all items form one group.
    """
    stack = canonicalize(items, device=config.device)
    return fit_stack(stack, _ranks(items), config, module_groups)


def fit_stack(
    stack: CanonicalStack,
    lora_ranks: Tensor,
    config: CompressionConfig,
    module_groups: Sequence[Sequence[int]] | None = None,
    init: tuple[Tensor, Tensor] | None = None,
) -> SlotResult:
    """Fit one slot's canonical stack with `config.sigma`'s method; `init` = (U, V)
    warm-starts a refit where the method can."""
    weights = user_weights(stack, config.weights)
    if config.rank:
        ranks = cap_ranks(stack, config.rank)
    else:
        ranks = choose_ranks(stack, weights, config.energy or 1.0, config.max_rank)
    method = method_named(config.sigma)
    fit = method.fit(stack, ranks, weights, tol=config.tol, max_iters=config.max_iters, init=init)
    stored = SlotStorage.of(fit, config.bits)
    form = fit.form() if config.bits == 32 else stored.form_read_back(stack.S.device)
    sq_errors = fit.sq_errors if config.bits == 32 else squared_errors(stack, form)
    groups = module_groups if module_groups is not None else [list(range(stack.count))]
    if config.personal_error:
        pnum, pden = personal_errors(stack, form, groups)
    else:
        pnum = pden = torch.full((stack.count,), float("nan"), dtype=torch.float64)
    return SlotResult(
        fit=fit,
        form=form,
        stored=stored,
        sq_norms=stack.sq_norms().cpu(),
        sq_errors=sq_errors.cpu(),
        sq_errors_float=fit.sq_errors.cpu(),
        personal_sq_errors=pnum.cpu(),
        personal_sq_norms=pden.cpu(),
        lora_ranks=lora_ranks.cpu(),
        shape=stack.shape,
    )


def cluster_slot(
    items: Sequence[LoRAFactors],
    config: CompressionConfig,
    module_groups: Sequence[Sequence[int]] | None = None,
) -> Clustering:
    """`compress_slot` with `config.clusters` bases (0: the count, 1 to 4, that does best at
    the storage one basis takes at the requested rank; with an energy target, the count that
    meets it most cheaply)."""
    stack = canonicalize(items, device=config.device)
    lora_ranks = _ranks(items)
    groups = module_groups if module_groups is not None else [list(range(stack.count))]
    if config.clusters:  # no more clusters than items
        counts = [min(config.clusters, stack.count)]
    else:
        counts = range(1, MAX_AUTO_CLUSTERS + 1)
    total = float((user_weights(stack, config.weights) * stack.sq_norms()).sum())
    best: Clustering | None = None
    budget = None
    for count in counts:
        if count > stack.count:
            break
        single = replace(config, clusters=1)
        if config.rank and not config.clusters and count > 1:
            rank = rank_for_budget(
                budget, count, stack.count, stack.shape, stack.rank, method_named(config.sigma)
            )
            if rank < 1:
                break
            single = replace(single, rank=rank)
        clustering = fit_clusters(
            stack,
            count,
            single.rank or 8,
            lambda sub, members, cfg=single: fit_stack(
                sub, lora_ranks[members], cfg, _local_groups(groups, members)
            ),
        )
        if budget is None:
            budget = sum(r.params_after() for r in clustering.results)
        if best is None or _better(clustering, best, by_error=bool(config.rank), total=total):
            best = clustering
    return best


def _better(new: Clustering, old: Clustering, *, by_error: bool, total: float) -> bool:
    """Fewer clusters win ties: more must lower the error by more than rounding does."""
    if by_error:  # the same storage budget: the lower weighted error wins
        return new.sq_error() < old.sq_error() - 1e-6 * total
    return new.bytes_after() < old.bytes_after()  # the same guarantee: the cheaper wins


def _local_groups(groups: Sequence[Sequence[int]], members: list[int]) -> list[list[int]]:
    position = {item: i for i, item in enumerate(members)}
    return [[position[i] for i in group if i in position] for group in groups]


def _ranks(items: Sequence[LoRAFactors]) -> Tensor:
    return torch.as_tensor(item_ranks(items))
