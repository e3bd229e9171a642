"""What each user is served, chosen on their own validation text so that nobody is served harm.

An adapter trained on the emulator can make the full model worse on a user's text (where the
emulator cannot carry the gain for their kind of text), and a personal adapter can fall behind
the global one. So before every compression round the server scores, on the full model and on
each user's validation split (the text just before their held-out part, which judges nothing
else), the candidates:

    base       no adapter: the base model itself (published as an all-zero LoRA)
    global     the federated-average adapter
    personal   the user's own adapter
    blend      the global adapter plus μ times the user's own difference from it,
               ΔW_global + μ·(ΔW_personal − ΔW_global) ("blend@0.5"; one plain LoRA of
               twice the rank, `soppu.adapters.blend`)

each adapter at the strengths λ of `--serve-scales` (λ·ΔW, "personal×0.75"; below 1 in
emulator mode on the layers the emulator stands in for only) that a walk
from λ = 1 towards a lower validation loss visits (`strength_walk`), and the blends at the
weights μ of `--serve-blends` that the same walk visits from the personal adapter (μ = 1)
towards the global one. The personal adapter and the blends are the user's own family, and
the choice serves:

- the family's best (the personal adapter at its best strength, or a blend), where it beats
  the base model *significantly* on that text (the paired 95% bootstrap interval of the gain
  excludes 0, `soppu/intervals.py`), unless the global adapter at its own best beats
  *it* significantly there;
- otherwise, among the base model and the adapters significantly better than it, the one with
  the lowest validation loss; a tie goes to the simpler: base, global, personal, blend, and
  the strength (the blend's weight) nearest 1.

A point estimate alone is not enough. On sympy's docstrings an adapter 1.7% better than the
base model on 1,567 validation tokens was 18% worse on the held-out text; and among seven
candidates a few tenths of a percent apart the lowest is partly the luckiest: a user served
the global adapter at 1.25, 0.3% better than their own on 1,376 validation tokens, was 3.4%
worse off on held-out text. Replayed on 46 users of seven finished runs of three populations,
requiring the global adapter to beat the personal one significantly changed 3 choices, 2 to
the user's significant gain on held-out text, 1 within noise, none to a loss
(experiments/choice_rules.py, docs/benchmarks.md). The choice, the
validation perplexities and gains go to RUN/selection.json and into the compressed store's
manifest; compression then compresses what each user is served: the chosen adapter as it is
then, at the chosen strength or blend (`RunFolder.served_sources`).

Why strengths: an adapter trained on the emulator moves the full model by another amount than
it moved the emulator. On the embedded Shakespeare users every adapter overshoots: at λ = 0.75
all six were significantly better on held-out text (median served gain 16.9% → 19.4%); on the
fortune files two of six were better at 1.25, and on sympy's docstrings a user served the base
model at λ = 1 gained 3.9% at 0.5; no user of 18 was worse
(experiments/adapter_scale.py, docs/benchmarks.md). In emulator mode, where the adapter has a
part on the layers the emulator stands in for (`--lora-layers all`), a strength below 1
scales only that part (`RunFolder.strength_modules`): it overshoots on the full model, the
part on the exact top layers does not (experiments/layer_transfer.py); replayed on 58 users
of nine runs of five populations, 19 were served significantly better on held-out text and 1
worse (−0.6 points), nobody harmed (experiments/strength_layers.py); on today's layout (8
exact layers, 8 stand-ins) most users' choice is 0.5 or 0.75. An adapter on the exact layers
only (`--lora-layers adapter`) is scaled as a whole. Above 1 a strength makes up for too few
steps, on every layer.

Why blends, and why off by default (`--serve-blends`): a user's own adapter is the global one
plus what 15 steps on their text added, and part of that is noise (on an emulator far from
the full model, mostly the emulator's repair); a point between the two keeps the user's
direction at less of its noise. Replayed on 58 users of nine finished runs of four
populations, both client modes, the walk over 0.25, 0.5, 0.75 changed 19 choices, 5 to the
user's significant gain on held-out text and 1 to a significant loss (−1.6 points), medians
up by at most 0.3 points, for 29% more of the choice's time (experiments/blend_choice.py,
docs/benchmarks.md).

The server can score only where it can read the users' text (a simulation); elsewhere every
user is served their personal adapter, and the log says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from soppu import atomic, lm
from soppu.adapters import LoraState, blend, write_lora
from soppu.data import UserText
from soppu.intervals import Gain, paired_gain
from soppu.personalize import scored
from soppu.server.store import RunFolder, parse_served, served_label
from soppu.train_config import TrainConfig

CANDIDATES = ("base", "global", "personal", "blend")  # a tie goes to the earlier one
OWN = ("personal", "blend")  # the user's own family: their adapter, and blends towards global


def choose(
    losses: dict[str, float],
    beat_base: set[str] | None = None,
    global_beats_personal: bool = False,
) -> str:
    """What to serve, from each candidate's validation loss: the best of the user's own
    family (the personal adapter's strengths and the blends) where it is significantly better
    than the base model (in `beat_base`; None: every candidate below the base model's loss
    is) and the global adapter's best is not significantly better than it
    (`global_beats_personal`); otherwise the lowest loss among the base model and the
    candidates in `beat_base`, a tie going to the simpler: base, global, personal, blend, and
    the strength (the blend's weight) nearest 1."""
    base = math.inf if losses.get("base") is None else losses["base"]
    present = [
        c
        for c in losses
        if losses[c] is not None
        and (c == "base" or (losses[c] < base if beat_base is None else c in beat_base))
    ]
    mine = best_of(losses, *OWN)
    if mine in present and not global_beats_personal:
        return mine

    return min(present, key=lambda c: (losses[c], *_simplicity(c)))


def best_of(losses: dict[str, float], *kinds: str) -> str | None:
    """The label of one of `kinds` ("global", "personal", "blend") with the lowest validation
    loss (a tie: the simpler kind, then the strength or weight nearest 1); None where none
    was scored."""
    labels = [c for c in losses if losses[c] is not None and parse_served(c)[0] in kinds]
    return min(labels, key=lambda c: (losses[c], *_simplicity(c)), default=None)


def _simplicity(label: str) -> tuple[int, float]:
    kind, value = parse_served(label)
    return CANDIDATES.index(kind), abs(math.log(value))


def select_served(
    run: RunFolder,
    model: nn.Module,
    tokenizer,
    users: dict[str, UserText],
    config: TrainConfig,
    progress: Callable[[str, int, int], None] = lambda user, done, total: None,
    scales: Sequence[float] = (1.0,),
    weights: Sequence[float] = (),
) -> dict[str, dict[str, Any]]:
    """Score every stored user's candidates (each adapter at the strengths of `scales` its
    walk visits, the blends at the weights of `weights` theirs visits) on their validation
    text, choose, write RUN/selection.json and, if anyone is served the base model, the
    all-zero adapter."""
    global_lora = run.global_adapter()
    stored = run.users()
    chosen: dict[str, dict[str, Any]] = {}
    for done, user in enumerate(stored):
        progress(user, done, len(stored))
        text = users[user].validation if user in users else ""
        blocks = lm.token_blocks(tokenizer, text, config.seq_len, config.max_eval_tokens)
        if not blocks:
            chosen[user] = {"served": "personal", "why": "no validation text", "validation": {}}
            continue
        scores = _candidate_scores(
            lambda lora, blocks=blocks: scored(
                model, lora, blocks, tokenizer.pad_token_id, config.batch_size
            ),
            {"global": global_lora, "personal": run.latest(user)},
            scales,
            weights,
            run.strength_modules,
        )
        counts = scores["base"][1]
        losses = {name: _loss(found) for name, found in scores.items()}
        gains = {
            name: paired_gain(scores["base"][0], s, counts, seed=done)
            for name, (s, _) in scores.items()
            if name != "base"
        }
        beat_base = {name for name, gain in gains.items() if gain.verdict == "better"}
        rival = global_over_personal(scores, losses, seed=done)
        beaten = rival is not None and rival.verdict == "better"
        served = choose(losses, beat_base, global_beats_personal=beaten)
        chosen[user] = {
            "served": served,
            "why": _why(served, beaten),
            "validation": {name: math.exp(loss) for name, loss in losses.items()},
            "validation_gains": {name: gain.as_dict() for name, gain in gains.items()},
            "validation_tokens": int(counts.sum()),
        }
        if rival is not None:
            chosen[user]["global_over_personal"] = rival.as_dict()
    if any(c["served"] == "base" for c in chosen.values()):
        write_no_adapter(run)
    atomic.write_json(run.selection, {"users": chosen})
    return chosen


Scores = tuple[Tensor, Tensor]  # per-block NLL sums and token counts (`lm.block_nll`)


def global_over_personal(
    scores: dict[str, Scores], losses: dict[str, float], seed: int = 0
) -> Gain | None:
    """The gain of the global adapter's best strength over the best of the user's own family
    (`OWN`), with its paired interval on the validation blocks; None where either was not
    scored."""
    mine, shared = best_of(losses, *OWN), best_of(losses, "global")
    if mine is None or shared is None:
        return None
    return paired_gain(scores[mine][0], scores[shared][0], scores[mine][1], seed=seed)


def _why(served: str, global_beats_personal: bool) -> str:
    kind = parse_served(served)[0]
    if kind == "personal":
        return "own adapter: significantly better than base, the global one not better than it"
    if kind == "blend":
        return (
            "own adapter blended with the global one: significantly better than base, the "
            "global one not better than it"
        )
    if kind == "global" and global_beats_personal:
        return "global adapter: significantly better than the user's own on validation"
    if kind == "global":
        return "global adapter: the user's own is not significantly better than base"
    return "base model: no adapter significantly better than it on validation"


def _candidate_scores(
    score: Callable[[LoraState | None], Scores],
    adapters: dict[str, LoraState | None],
    scales: Sequence[float],
    weights: Sequence[float] = (),
    modules: Callable[[float], Sequence[str] | None] = lambda scale: None,
) -> dict[str, Scores]:
    """label → validation scores: the base model, each adapter there is at the strengths its
    walk visits (a strength λ on the modules `modules(λ)` names, `LoraState.scaled`), and the
    blends of the two at the weights the walk from the personal adapter (μ = 1) visits."""
    grid = sorted(set(scales) | {1.0})
    found = {"base": score(None)}
    for kind, lora in adapters.items():
        if lora is not None:
            walked = strength_walk(grid, lambda s, lora=lora: score(lora.scaled(s, modules(s))))
            found |= {served_label(kind, s): scores for s, scores in walked.items()}
    shared, own = adapters.get("global"), adapters.get("personal")
    if weights and shared is not None and own is not None:
        walked = strength_walk(
            sorted(set(weights) | {1.0}),
            lambda w: found["personal"] if w == 1.0 else score(blend(shared, own, w)),
        )
        found |= {served_label("blend", w): scores for w, scores in walked.items() if w != 1.0}
    return found


def strength_walk(grid: Sequence[float], score: Callable[[float], Scores]) -> dict[float, Scores]:
    """Score an adapter along the ascending strength `grid` (1 among it; for blends, the
    weights μ, 1 being the personal adapter), walking downhill from 1: down while the
    validation loss falls, else up while it falls. The loss is about
    unimodal in λ, so this finds the grid's lowest while scoring 3 of 4 strengths: replayed
    on the 60 recorded choices of 9 runs of three populations it chose as scoring every
    strength did, and ended at the grid's lowest on 117 of 120 curves
    (experiments/strength_walk.py). A tie stops the walk: the strength nearer 1 is kept, as
    `choose` prefers."""
    at = grid.index(1.0)
    seen = {grid[at]: score(grid[at])}
    for step in (-1, 1):
        here = at
        while 0 <= here + step < len(grid):
            seen[grid[here + step]] = score(grid[here + step])
            if _loss(seen[grid[here + step]]) >= _loss(seen[grid[here]]):
                break
            here += step
        if here != at:  # it went downhill this way; the other way is uphill
            break
    return seen


def _loss(scores: Scores) -> float:
    sums, counts = scores
    return float(sums.sum()) / int(counts.sum())


def write_no_adapter(run: RunFolder) -> Path:
    """RUN/no-adapter/: a LoRA of the run's shapes and config with every factor zero, so the
    base model is served through the same path (and loads in PEFT, LoRAX and vLLM) as any
    adapter."""
    template = next(run.latest(u) for u in run.users())
    zero = LoraState({k: torch.zeros_like(v) for k, v in template.tensors.items()}, template.config)
    return write_lora(zero, run.no_adapter, {"served": "base"}, replace=True, cache=True)
