"""Which adapter to use, chosen by the user on their own text through the serving API.

In a deployment the server never reads a user's text, so it cannot choose for them whether
their adapter beats the base model. The user can, without sending their text anywhere it would
not go when they use the service: `soppu score` cuts their validation text into blocks, asks the
server for every token's logprob under each model (OpenAI's legacy completions with `echo`,
`logprobs: 0`, `max_tokens: 0`, which `soppu serve` and vLLM both answer), and compares each
adapter with the reference (the base model) by the paired bootstrap of `intervals.py` on
those blocks. The advice follows the rule the simulation's server applies
(`soppu/server/selection.py`): the first model named (the user's own adapter) where it is
*significantly* better than the reference, unless another is significantly better than it;
otherwise the lowest-loss model among the reference and those significantly better than it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from soppu.completions import echoed_logprobs
from soppu.errors import SoppuError
from soppu.intervals import Gain, paired_gain

BLOCK_CHARS = 1500  # ≈ 400 tokens: well under a server's input limit, enough blocks to resample


@dataclass(frozen=True)
class Scored:
    """One model on the user's blocks: each block's summed NLL and its scored tokens."""

    model: str
    nll: torch.Tensor  # float64 [blocks]
    tokens: torch.Tensor  # long [blocks]

    @property
    def perplexity(self) -> float:
        return math.exp(float(self.nll.sum()) / max(1, int(self.tokens.sum())))


def blocks_of(text: str, chars: int = BLOCK_CHARS) -> list[str]:
    """`text` in pieces of about `chars` characters, cut at whitespace where there is some."""
    if chars < 2:
        raise ValueError(f"block size {chars} is too small: at least 2 characters")
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + chars)
        if end < len(text) and (space := text.rfind(" ", start + chars // 2, end)) > start:
            end = space
        if text[start:end].strip():
            pieces.append(text[start:end])
        start = end
    return pieces


def prompt_logprobs(url: str, model: str, text: str, api_key: str | None = None) -> list[float]:
    """Each token's logprob given those before it (the first token, unpredicted, left out)."""
    logprobs = echoed_logprobs(url, model, text, api_key)
    try:
        values = [float(x) for x in logprobs["token_logprobs"][1:]]
    except (KeyError, TypeError, ValueError):
        raise SoppuError(f"{url}: model {model!r}: the reply has no prompt logprobs") from None
    if not all(math.isfinite(v) and v <= 0 for v in values):
        raise SoppuError(f"{url}: model {model!r}: the reply's logprobs are not all ≤ 0")
    return values


def score(
    url: str,
    model: str,
    blocks: list[str],
    api_key: str | None = None,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> Scored:
    sums, counts = [], []
    for i, block in enumerate(blocks):
        values = prompt_logprobs(url, model, block, api_key)
        sums.append(-sum(values))
        counts.append(len(values))
        progress(i + 1, len(blocks))
    return Scored(model, torch.tensor(sums, dtype=torch.float64), torch.tensor(counts))


def compare(reference: Scored, others: list[Scored]) -> tuple[dict[str, Gain], str]:
    """Each other model's gain over `reference` with its interval, and the advice: the first
    model (the user's own) where it is significantly better than the reference, unless others
    are significantly better than it (then the lowest of those); otherwise the lowest loss
    among the reference and the models significantly better than it."""
    for s in others:
        if not torch.equal(s.tokens, reference.tokens):
            raise SoppuError(f"model {s.model!r} was scored on other tokens than the reference")
    gains = {s.model: paired_gain(reference.nll, s.nll, reference.tokens) for s in others}
    winners = [s for s in others if gains[s.model].verdict == "better"]
    candidates = [reference, *winners]
    if others and gains[others[0].model].verdict == "better":
        mine = others[0]
        rivals = [
            s for s in winners[1:] if paired_gain(mine.nll, s.nll, mine.tokens).verdict == "better"
        ]
        candidates = rivals or [mine]
    best = min(candidates, key=lambda s: float(s.nll.sum()))
    return gains, best.model
