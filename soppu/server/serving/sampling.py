"""Choosing each row's next token, and when a row is done.

Sampling is computed in float64 on logits shifted so that their maximum is 0: divided by any
positive finite temperature they are then 0 or negative (at worst -inf, whose probability is
0), so even a temperature of 1e-45 or 5e-324 gives a valid distribution (greedy in effect)
rather than inf/inf = NaN for the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 20
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    do_sample: bool = False
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


class NumericalFailure(FloatingPointError):
    """A row's logits are not numbers: that row fails, the batch goes on."""


def broken_rows(logits: Tensor) -> Tensor:
    """[batch] True where a row has NaN or +inf logits (-inf is a legal "never")."""
    return torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1)


def choose(logits: Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token for one row from its [vocab] logits."""
    if not sampling.do_sample or not sampling.temperature > 0:  # greedy (NaN too)
        return int(logits.argmax())
    shifted = logits.double() - logits.max().double()
    scaled = shifted / float(sampling.temperature)
    if sampling.top_k is not None and sampling.top_k < scaled.numel():
        cutoff = scaled.topk(sampling.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < cutoff, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < sampling.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        raise NumericalFailure("sampling found no finite token probabilities")
    return int(torch.multinomial(probs, 1, generator=generator))


def finish_reason(text: str, generated: int, eos: bool, sampling: Sampling) -> str | None:
    """Why a row stops after its latest token, or None to go on."""
    if eos and not sampling.ignore_eos:
        return "eos_token"
    if any(stop and text.endswith(stop) for stop in sampling.stop):
        return "stop_sequence"
    if generated >= sampling.max_new_tokens:
        return "length"
    return None
