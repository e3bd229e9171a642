"""A client repairing its emulator on its own text, towards what scoring that text answers.

Out of the public text's domain, an emulator aligned by the server is wrong in ways that depend
on the user's text, and a LoRA trained on it learns mostly to repair those errors, which the
full model does not have. The server never reads a user's text, but a user may score it
through the serving API (OpenAI's legacy completions with `echo`, `max_tokens: 0`,
`logprobs: 5`), and that answer, the full model's logprob of every token with its 5 likeliest
alternatives, is a teacher on exactly the user's text. Before it first trains on an emulator
version, the client tunes the emulator's kept middle layers (the alignment's parameters:
embeddings, head and adapter layers stay the full model's, so the LoRA still plugs back in)
towards that teacher on its training text. Measured in whole federations (docs/benchmarks.md,
"The repair in the federation"): out of domain the emulator's loss on the users' held-out
text falls by 0.6–0.7 nats and they are served a point more; on the roles, whose emulator
the pool already fits, 2.3 points less. So the federation's `--repair-steps` is off unless
asked for.

A repair is kept only where it makes the emulator a better model of the user's next text
the way the full model is: the client scores its validation text (never trained on), the
emulator's next-token loss there against the full model's (the teacher's logprobs of the
text's own tokens), and keeps the repaired layers only where the repair closes at least
`MIN_CLOSED` of that gap, with the paired 95% interval of the emulator's gain over the
validation blocks excluding no change (`soppu.intervals`); looks every `CHECK_EVERY` steps
stop one that has closed less than half of that, and otherwise the emulator stays as the
server sent it. The partition loss itself is no guide: on the roles the repair lowers it on
the validation text by 7–13% while the emulator's KL to the full model on held-out text rises
(0.969 → 1.015 after 10 steps for one user, 3 of 3 alike) and its loss on the text does not
move; out of domain it closes 32–89% of the gap (6 networkx code and 6 sympy users), on the
roles −6% to 23% (8 users; 40 unchecked steps, on held-out text). The check sees one user's
emulator, not the average: on Django's translators every repair closes 62–84% and is kept,
and the users are served less (13.9% → 12.4%), so the repair stays off unless asked for.

The loss is the cross-entropy over the partition {each listed token, everything else}: the KL
between the two distributions coarsened to what the answer gives, up to the teacher's entropy.
Pure tensors and one training loop; where the answer comes from is `soppu.teachers`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soppu import lm
from soppu.alignment import middle_parameters
from soppu.emulator import EmulatorInfo
from soppu.intervals import Gain, paired_gain

TOP_K = 5  # the most alternatives OpenAI's legacy completions (and vLLM's, and ours) return
# Steps between looks at the validation text: a repair that will not carry shows it at once,
# and is stopped after a quarter of the default 40 steps rather than paid for in whole.
CHECK_EVERY = 10
# The share of the emulator's loss gap to the full model on the validation text a kept repair
# closes: between the roles' largest (0.23, served 1.0 points less) and the out-of-domain
# users' smallest (0.32, served more) of 22 users' unchecked repairs (the module's docstring).
MIN_CLOSED = 0.25


class TeacherError(ValueError):
    """A teacher's answer that cannot be used as one."""


@dataclass(frozen=True)
class TeacherAnswer:
    """The full model on one piece of text, as a scoring call answers it: the piece's token ids
    [L] and, for every token after the first, the k likeliest next tokens' ids and logprobs
    [L-1, k] and the logprob of the token the text has [L-1]."""

    ids: Tensor
    top_ids: Tensor
    top_logprobs: Tensor
    token_logprobs: Tensor

    def __post_init__(self) -> None:
        n = self.ids.numel() - 1
        if self.ids.dim() != 1 or n < 1:
            raise TeacherError(f"an answer needs at least 2 tokens, got {self.ids.numel()}")
        k = self.top_ids.shape[-1] if self.top_ids.dim() == 2 else -1
        if self.top_ids.shape != (n, k) or self.top_logprobs.shape != (n, k) or k < 1:
            raise TeacherError(
                f"alternatives of shape {tuple(self.top_ids.shape)} and "
                f"{tuple(self.top_logprobs.shape)} for {n} predicted tokens"
            )
        if self.token_logprobs.shape != (n,):
            raise TeacherError(f"{self.token_logprobs.numel()} token logprobs for {n} tokens")
        for name in ("top_logprobs", "token_logprobs"):
            values = getattr(self, name)
            if not (torch.isfinite(values).all() and (values <= 1e-4).all()):
                raise TeacherError(f"{name} are not all finite logprobs ≤ 0")
        # The listed tokens are disjoint events: their probabilities cannot sum past 1.
        _, logprobs, weight = _listed(self)
        if (logprobs.exp() * weight).sum(1).max() > 1 + 1e-3:
            raise TeacherError("the listed tokens' probabilities sum past 1")

    def check_vocabulary(self, size: int) -> None:
        for name in ("ids", "top_ids"):
            values = getattr(self, name)
            if values.min() < 0 or values.max() >= size:
                raise TeacherError(f"{name} outside the model's vocabulary of {size}")


def answer_from_logits(ids: Tensor, logits: Tensor, k: int = TOP_K) -> TeacherAnswer:
    """What a scoring call answers for `ids` [L], given the full model's logits on it [L, V]."""
    log_p = F.log_softmax(logits.float()[:-1], dim=-1)
    top_logprobs, top_ids = log_p.topk(k, dim=-1)
    token = log_p.gather(1, ids[1:, None]).squeeze(1)
    return TeacherAnswer(ids.cpu(), top_ids.cpu(), top_logprobs.cpu(), token.cpu())


def _listed(answer: TeacherAnswer) -> tuple[Tensor, Tensor, Tensor]:
    """Per predicted token: the listed ids [n, k+1] (the k alternatives, then the text's own
    token), their logprobs, and a weight that drops the text's token where it is among the k."""
    target = answer.ids[1:, None]
    ids = torch.cat([answer.top_ids, target], dim=1)
    logprobs = torch.cat([answer.top_logprobs, answer.token_logprobs[:, None]], dim=1)
    weight = torch.ones_like(logprobs)
    weight[:, -1] = (answer.top_ids != target).all(dim=1).float()
    return ids, logprobs, weight


def partition_ce(logits: Tensor, answers: list[TeacherAnswer]) -> Tensor:
    """Mean over predicted tokens of the cross-entropy of the student (`logits` [b, t, V] on
    the answers' ids, right-padded) against the teacher over {each listed token, the rest}."""
    return _partition_terms(logits, answers).mean()


def _partition_terms(logits: Tensor, answers: list[TeacherAnswer]) -> Tensor:
    """partition_ce of each predicted token, the answers' tokens one after the other."""
    log_q_rows, p_rows, weights = [], [], []
    for row, answer in enumerate(answers):
        ids, logprobs, weight = _listed(answer)
        student = F.log_softmax(logits[row, : ids.shape[0]].float(), dim=-1)
        log_q_rows.append(student.gather(1, ids.to(student.device)))
        p_rows.append(logprobs.exp().to(student.device) * weight.to(student.device))
        weights.append(weight.to(student.device))
    log_q, p, weight = torch.cat(log_q_rows), torch.cat(p_rows), torch.cat(weights)
    rest_p = (1 - p.sum(1)).clamp_min(0)
    rest_q = torch.log1p(-(log_q.exp() * weight).sum(1).clamp_max(1 - 1e-6))
    return -((p * log_q).sum(1) + rest_p * rest_q)


@dataclass(frozen=True)
class RepairConfig:
    """The client's repair of its emulator, as the server asks for it (`repair-steps`,
    `repair-lr`) with the round's batch size, seed and precision."""

    steps: int
    lr: float = 3e-4  # experiments/local_repair.py --curve-lrs: the lowest held-out KL
    batch_size: int = 4
    seed: int = 0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= 100_000:
            raise ValueError(f"repair steps must be in [1, 100000], got {self.steps}")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 1):
            raise ValueError(f"repair lr must be in (0, 1], got {self.lr}")
        if not 1 <= self.batch_size <= 4096:
            raise ValueError(f"repair batch size must be in [1, 4096], got {self.batch_size}")

    @property
    def pieces(self) -> int:
        """Pieces of text the teacher answers: one per block the repair's steps can visit."""
        return self.steps * self.batch_size

    def chosen(self, blocks: list) -> list:
        """The blocks the teacher is asked about: all of them, or a seeded choice of `pieces`
        in their order where there are more."""
        if len(blocks) <= self.pieces:
            return list(blocks)
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(self.seed))
        return [blocks[i] for i in sorted(order[: self.pieces].tolist())]

    def key(self) -> str:
        """Names a repair made with these settings (its file on the node)."""
        named = {**asdict(self), "check": [CHECK_EVERY, MIN_CLOSED]}  # the check's rule too
        return hashlib.sha256(json.dumps(named, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class RepairCheck:
    """A repair judged on the user's validation text: the next-token loss per token there of
    the emulator before and after and of the full model (the teacher's), and the emulator's
    gain (the share of perplexity the repair removes) with its paired 95% interval."""

    before: float
    after: float
    full: float
    gain: Gain
    steps: int  # the steps taken: fewer than asked where a look stopped the repair

    @property
    def closed(self) -> float:
        """The share of the emulator's gap to the full model the repair closed."""
        return gap_closed(self.before, self.after, self.full)

    @property
    def kept(self) -> bool:
        return self.gain.verdict == "better" and self.closed >= MIN_CLOSED


def gap_closed(before: float, after: float, full: float) -> float:
    """The share of the emulator's loss gap to the full model (per-token losses) a repair
    closed; an emulator within 1% of the full model's perplexity has nothing to close."""
    return (before - after) / (before - full) if before - full > 0.01 else 0.0


@dataclass(frozen=True)
class RepairReport:
    loss_first: float
    loss_last: float
    seconds: float
    pieces: int
    check: RepairCheck | None = None  # None: made without a check (a probe's repair)

    @property
    def kept(self) -> bool:
        return self.check is None or self.check.kept


def repair(
    emulator: nn.Module,
    info: EmulatorInfo,
    answers: list[TeacherAnswer],
    pad_id: int,
    config: RepairConfig,
    params: list[nn.Parameter] | None = None,
    after_step: Callable[[int], None] = lambda step: None,
    check: list[TeacherAnswer] | None = None,
) -> RepairReport:
    """Tune the emulator's middle layers (or `params`, a probe's other choice) in place towards
    `answers`; AdamW, no weight decay, batches drawn epoch by epoch from a seeded shuffle
    (`lm.epoch_order`); `after_step(step)` after each step. With `check` (the teacher's
    answers on the user's validation text) the repair is stopped at the first look where it
    has closed less than half of `MIN_CLOSED` of the emulator's gap there, and undone unless
    it ends significantly better having closed `MIN_CLOSED`."""
    if not answers:
        raise TeacherError("no teacher answers to repair on")
    began = time.perf_counter()
    vocabulary = emulator.get_output_embeddings().weight.shape[0]
    for answer in [*answers, *(check or [])]:
        answer.check_vocabulary(vocabulary)
    params = middle_parameters(emulator, info) if params is None else params
    look = _Look(emulator, check, pad_id, config, params) if check else None
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    order = lm.epoch_order(len(answers), config.batch_size, config.steps, config.seed)
    device = next(emulator.parameters()).device
    losses = []
    try:
        for indices in order:
            emulator.train()
            picked = [answers[i] for i in indices]
            batch = lm.collate([a.ids for a in picked], pad_id)
            batch = lm.Batch(batch.ids.to(device), batch.mask.to(device))
            loss = partition_ce(lm.logits(emulator, batch, config.precision), picked)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step = len(losses)
            after_step(step)
            looking = look and step % CHECK_EVERY == 0 and step < config.steps
            if looking and not look.on_course(step):
                break
    finally:
        emulator.eval().requires_grad_(False)
    verdict = look.verdict(len(losses)) if look else None
    return RepairReport(losses[0], losses[-1], time.perf_counter() - began, len(answers), verdict)


class _Look:
    """The repair's looks at the validation text, and its undoing where they find it wanting."""

    def __init__(self, emulator, check, pad_id: int, config: RepairConfig, params) -> None:
        blocks = [answer.ids for answer in check]
        self.score = partial(
            lm.block_nll, emulator, blocks, pad_id, config.batch_size, config.precision
        )
        self.params = params
        self.before = [p.detach().clone() for p in params]
        self.first, self.counts = self.score()
        self.tokens = float(self.counts.sum())
        self.full = -float(sum(answer.token_logprobs.double().sum() for answer in check))
        self.seen: tuple[int, Tensor] | None = None  # (step, its scores): the latest look

    def per_token(self, sums: Tensor) -> float:
        return float(sums.sum()) / self.tokens

    def on_course(self, step: int) -> bool:
        """Has the repair closed at least half the bar by this look?"""
        self.seen = step, self.score()[0]
        first, now = self.per_token(self.first), self.per_token(self.seen[1])
        return gap_closed(first, now, self.full / self.tokens) >= MIN_CLOSED / 2

    def verdict(self, steps: int) -> RepairCheck:
        last = self.seen[1] if self.seen and self.seen[0] == steps else self.score()[0]
        check = RepairCheck(
            self.per_token(self.first),
            self.per_token(last),
            self.full / self.tokens,
            paired_gain(self.first, last, self.counts),
            steps,
        )
        if not check.kept:
            with torch.no_grad():
                for param, value in zip(self.params, self.before, strict=True):
                    param.copy_(value)
        return check


def middle_state(emulator: nn.Module, info: EmulatorInfo) -> dict[str, Tensor]:
    """The weights a repair changes: the kept middle layers' (the emulator's own keys)."""
    layers = emulator.get_submodule(info.layers_path)
    adapter = set(info.emulator_adapter_layers)
    return {
        f"{info.layers_path}.{j}.{name}": value.detach().cpu().contiguous()
        for j, layer in enumerate(layers)
        if j not in adapter
        for name, value in layer.state_dict().items()
    }
