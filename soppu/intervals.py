"""Paired bootstrap intervals for per-user comparisons of two models on the same text.

Both models are scored on the same held-out blocks (`lm.block_nll`: each block's summed NLL
and token count). The gain of `new` over `reference` is the share of perplexity it removes,

    gain = 1 − ppl_new / ppl_ref = 1 − exp((Σ nll_new − Σ nll_ref) / Σ tokens),

and its interval comes from resampling the blocks with replacement, the same blocks for both
models (paired), B times: the percentile interval of the resampled gains. A comparison is a
win or a loss only when its interval excludes 0; otherwise the two are indistinguishable on
this much text.
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
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(diff), (resamples, len(diff)), generator=generator)
    resampled = diff[picks].sum(1) / counts.double().cpu()[picks].sum(1).clamp_min(1)
    gains = 1.0 - torch.exp(resampled)
    tail = (1.0 - level) / 2
    low, high = torch.quantile(gains, torch.tensor([tail, 1.0 - tail], dtype=gains.dtype))
    return Gain(point, float(low), float(high))
