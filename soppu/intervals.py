"""Paired bootstrap intervals for per-user comparisons of two models on the same text.

Both models are scored on the same held-out blocks (`lm.block_nll`: each block's summed NLL
and token count). The gain of `new` over `reference` is the share of perplexity it removes,

    gain = 1 − ppl_new / ppl_ref = 1 − exp((Σ nll_new − Σ nll_ref) / Σ tokens),

and its interval comes from resampling the blocks with replacement, the same blocks for both
models (paired), B times: the percentile interval of the resampled gains. A comparison is a
win or a loss only when its interval excludes 0; otherwise the two are indistinguishable on
this much text.

A share of a gain (how much of what `whole` gains over `reference` the model `part` gains,
`paired_share`) takes its interval from the same resamples, all three models paired.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Gain:
    point: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        """better / worse when the interval excludes 0, else same."""
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "same"

    def as_dict(self) -> dict[str, float | str]:
        return {**asdict(self), "verdict": self.verdict}


def paired_gain(
    reference: Tensor,
    new: Tensor,
    counts: Tensor,
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> Gain:
    """The gain of `new` over `reference` (per-block NLL sums on the same blocks, `counts`
    tokens each) with its paired percentile-bootstrap interval."""
    if not (reference.shape == new.shape == counts.shape) or reference.ndim != 1:
        raise ValueError("reference, new and counts must be 1-D and of one length (the blocks)")
    tokens = float(counts.sum())
    if tokens <= 0:
        raise ValueError("no tokens to compare on")
    diff = (new.double() - reference.double()).cpu()
    point = 1.0 - math.exp(float(diff.sum()) / tokens)
    picks = _picks(len(diff), resamples, seed)
    low, high = _percentiles(_resampled_gains(diff, counts, picks), level)
    return Gain(point, low, high)


@dataclass(frozen=True)
class Share:
    point: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def paired_share(
    reference: Tensor,
    part: Tensor,
    whole: Tensor,
    counts: Tensor,
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> Share:
    """The share gain(part over reference) / gain(whole over reference) with its paired
    percentile-bootstrap interval: every resample takes the same blocks for all three.
    Meaningful only where `whole`'s own gain is significant (a resample near 0 there
    divides by about nothing)."""
    if not (reference.shape == part.shape == whole.shape == counts.shape) or counts.ndim != 1:
        raise ValueError("reference, part, whole and counts must be 1-D and of one length")
    tokens = float(counts.sum())
    picks = _picks(len(counts), resamples, seed)
    points, resampled = [], []
    for model in (part, whole):
        diff = (model.double() - reference.double()).cpu()
        points.append(1.0 - math.exp(float(diff.sum()) / tokens))
        resampled.append(_resampled_gains(diff, counts, picks))
    if points[1] == 0:
        raise ValueError("the whole gains nothing over the reference; no share of it")
    low, high = _percentiles(resampled[0] / resampled[1], level)
    return Share(points[0] / points[1], low, high)


def _picks(blocks: int, resamples: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(blocks, (resamples, blocks), generator=generator)


def _resampled_gains(diff: Tensor, counts: Tensor, picks: Tensor) -> Tensor:
    resampled = diff[picks].sum(1) / counts.double().cpu()[picks].sum(1).clamp_min(1)
    return 1.0 - torch.exp(resampled)


def _percentiles(values: Tensor, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1.0 - tail], dtype=values.dtype))
    return float(low), float(high)
