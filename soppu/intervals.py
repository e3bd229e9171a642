"""Paired bootstrap intervals for per-user comparisons of two models on the same text.

Both models are scored on the same held-out blocks (`lm.block_nll`: each block's summed NLL
and token count). The gain of `new` over `reference` is the share of perplexity it removes,

    gain = 1 − ppl_new / ppl_ref = 1 − exp((Σ nll_new − Σ nll_ref) / Σ tokens),

and its interval comes from resampling the blocks with replacement, the same blocks for both
models (paired), B times: the percentile interval of the resampled gains. A comparison is a
win or a loss only when its interval excludes 0; otherwise the two are indistinguishable on
this much text.

A share of a gain (how much of what `whole` gains over `reference` the model `part` gains,
`paired_share`) takes its interval from the same resamples, all three models paired, by test
inversion: the shares θ at which gain(part) − θ·gain(whole) is not significantly off 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
    """The share θ = gain(part over reference) / gain(whole over reference) with its paired
    bootstrap interval by test inversion (Fieller's idea): every θ at which the paired test of
    gain(part) − θ·gain(whole) does not reject 0, all three models on the same resampled
    blocks. Percentiles of the resampled ratios would divide by resamples where the whole's
    gain is near 0 and swing wildly; here a bound is where a quantile of part − θ·whole
    changes sign, so "below 80%" means gain(part) < 0.8·gain(whole), significantly. A bound
    that no θ in ±`SHARE_LIMIT` reaches is ±inf. Meaningful where the whole's own gain is
    significant."""
    if not (reference.shape == part.shape == whole.shape == counts.shape) or counts.ndim != 1:
        raise ValueError("reference, part, whole and counts must be 1-D and of one length")
    tokens = float(counts.sum())
    picks = _picks(len(counts), resamples, seed)
    points, resampled = [], []
    for model in (part, whole):
        diff = (model.double() - reference.double()).cpu()
        points.append(1.0 - math.exp(float(diff.sum()) / tokens))
        resampled.append(_resampled_gains(diff, counts, picks))
    if points[1] <= 0:  # the inversion below needs part − θ·whole to fall in θ
        raise ValueError("the whole gains nothing over the reference; no share of it")
    tail = (1.0 - level) / 2
    # A quantile of part − θ·whole over the resamples falls in θ where the whole gains: θ is
    # rejected as too small while even the lower quantile is above 0, as too large once even
    # the upper one is below it
    low = _root(lambda theta: _quantile(resampled[0] - theta * resampled[1], tail))
    high = _root(lambda theta: _quantile(resampled[0] - theta * resampled[1], 1.0 - tail))
    return Share(points[0] / points[1], low, high)


SHARE_LIMIT = 100.0  # shares beyond ±10,000% are reported as ±inf


Scored = tuple[Tensor, Tensor, Tensor, Tensor]  # one user's reference, part, whole, counts


def median_share(
    users: list[Scored], *, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0
) -> Share:
    """The median over users of each user's share (as `paired_share`: part's gain over the
    reference, of whole's), with the percentile interval of that median when every user's
    blocks are resampled, paired across the three models. The question it answers: would a
    median share of, say, 88% read above 90% on other text of these users? Users whose whole
    gains little make their resampled shares swing; the median is what tempers them."""
    if not users:
        raise ValueError("no users to take a median share over")
    points, resampled = [], []
    for i, (reference, part, whole, counts) in enumerate(users):
        if not (reference.shape == part.shape == whole.shape == counts.shape):
            raise ValueError(f"user {i}: reference, part, whole and counts differ in length")
        picks = _picks(len(counts), resamples, seed + i)
        gains = [
            _resampled_gains((m.double() - reference.double()).cpu(), counts, picks)
            for m in (part, whole)
        ]
        resampled.append(gains[0] / gains[1])
        tokens = float(counts.sum())
        gain_part, gain_whole = (
            1.0 - math.exp(float((m.double() - reference.double()).sum()) / tokens)
            for m in (part, whole)
        )
        if gain_whole <= 0:
            raise ValueError(f"user {i}: the whole gains nothing over the reference")
        points.append(gain_part / gain_whole)
    medians = torch.quantile(torch.stack(resampled), 0.5, dim=0)  # the mean of the middle two
    point = float(torch.quantile(torch.tensor(points, dtype=torch.float64), 0.5))
    low, high = _percentiles(medians, level)
    return Share(point, low, high)


def _root(falling: Callable[[float], float], steps: int = 80) -> float:
    """Where `falling` (decreasing in θ) crosses 0, by bisection within ±SHARE_LIMIT."""
    lo, hi = -SHARE_LIMIT, SHARE_LIMIT
    if falling(lo) < 0:
        return -math.inf
    if falling(hi) > 0:
        return math.inf
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if falling(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


def _quantile(values: Tensor, q: float) -> float:
    return float(torch.quantile(values, q))


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
