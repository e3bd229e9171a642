"""Should the served strength scale only the layers the emulator stands in for? Finished
emulator-mode runs' choices replayed with another kind of strength, judged on held-out text.

    python -m experiments.strength_layers --name NAME --runs RUN[,RUN...]

The served choice tries each adapter at strengths λ (λ·ΔW on every layer the LoRA is on) and
out of the alignment text's domain often serves 0.75. A probe of which layers' part transfers
(experiments/layer_transfer.py) found, on five populations, that the part on the emulator's
aligned middle layers overshoots on the full model (× 0.5 better, × 1.5 worse) while the part
on the exact top layers, which the emulator holds unchanged, does not (× 0.5 worse on all
five). So a strength that scales only the aligned layers' part, the exact top layers kept as
trained, might serve more than the uniform one at the same number of candidates.

For every user of each run this scores the global and personal adapters with only the
aligned layers' part at each λ of the run's `--serve-scales` (λ ≠ 1) on both splits (cached
in runs/experiments/choice-scores/<run>.emulated.pt, beside the uniform candidates that
`choice_rules` cached), then replays the served choice (`choose_among`: the walks, their
own adapter first, significance against the base model) three times: over the uniform
strengths (the rule until 2026-12-06), over the aligned-layers-only ones, and over
aligned-layers-only strengths below 1 with uniform ones above (scaling down undoes the
stand-in layers' overshoot, scaling up makes up for too few steps on every layer: the rule
since, `RunFolder.strength_modules`); each choice judged on held-out text against the uniform
strengths' (paired 95% intervals) and against the base model (harm).

Writes experiments/results/strength_layers_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import torch

from experiments.choice_rules import (
    changed_choices,
    median_table,
    personal_first,
    rule_rows,
    rule_summary,
)
from experiments.choice_rules import score_run as score_uniform
from experiments.lib import RESULTS, RUNS, provenance, write_results
from soppu import atomic, basemodel, lm
from soppu.emulator import read_info
from soppu.intervals import paired_gain
from soppu.personalize import scored
from soppu.server.prepare_run import choose_users, stored_config
from soppu.server.store import RunFolder, served_label

KINDS = ("global", "personal")


def aligned_label(kind: str, scale: float) -> str:
    """The cache's key of `kind` with only its aligned layers' part at `scale`."""
    return f"{kind}~{scale:g}"


def score_aligned(run: RunFolder, grid: list[float]) -> dict[str, dict]:
    """user → {"val"|"test": {aligned label: Scores}} (cached)."""
    cache = RUNS / "choice-scores" / f"{run.root.name}.emulated.pt"
    if cache.is_file():
        return torch.load(cache)
    info = read_info(run.emulator)
    if info.exact:
        raise SystemExit(f"{run.root}: a full-mode run; no layer is emulated")
    config = stored_config(run)
    base = basemodel.load(config.base_model or None)
    pad, cap = base.tokenizer.pad_token_id, config.evaluation.final_eval_tokens or 2**62
    texts = choose_users(config)
    found: dict[str, dict] = {}
    for i, user in enumerate(run.users()):
        print(f"  [{i + 1}/{len(run.users())}] {user} aligned-layer strengths", flush=True)
        adapters = {"global": run.global_adapter(), "personal": run.latest(user)}
        found[user] = {}
        for split in ("val", "test"):
            text = texts[user].validation if split == "val" else texts[user].test
            blocks = lm.token_blocks(base.tokenizer, text, config.training.seq_len, cap)
            found[user][split] = {
                aligned_label(kind, s): scored(
                    base.model,
                    lora.scaled(s, info.strength_modules),  # what the product serves
                    blocks,
                    pad,
                    config.training.batch_size,
                )
                for kind, lora in adapters.items()
                for s in grid
                if s != 1.0
            }
    buffer = io.BytesIO()
    torch.save(found, buffer)
    atomic.write_bytes(cache, buffer.getvalue())  # a crash leaves no half-written cache
    return found


# How a strength λ ≠ 1 scales: which candidates become their aligned-layers-only twins.
RULES = {
    "uniform": lambda s: False,  # today: every layer
    "aligned-only": lambda s: True,
    "aligned-below-1": lambda s: s < 1.0,  # down on the aligned layers, up on every layer
}


def swapped(scores: dict, aligned: dict, grid: list[float], rule: str) -> dict:
    """`scores` with the scaled candidates `rule` takes replaced by their aligned-layers-only
    twins, under the uniform label, so that today's rule runs on it unchanged."""
    out = dict(scores)
    for kind in KINDS:
        for s in grid:
            if s != 1.0 and RULES[rule](s):
                out[served_label(kind, s)] = aligned[aligned_label(kind, s)]
    return out


def judge(scores: dict, aligned: dict, grid: list[float], seed: int) -> dict:
    splits = {
        rule: {split: swapped(scores[split], aligned[split], grid, rule) for split in scores}
        for rule in RULES
    }
    picks = {rule: personal_first(splits[rule]["val"], grid, seed) for rule in RULES}
    counts = scores["test"]["base"][1]
    served = {rule: splits[rule]["test"][pick][0] for rule, pick in picks.items()}
    return {
        "picks": picks,
        "over_base": {
            rule: paired_gain(scores["test"]["base"][0], nll, counts, seed=seed).as_dict()
            for rule, nll in served.items()
        },
        "over_uniform": {
            rule: paired_gain(served["uniform"], nll, counts, seed=seed).as_dict()
            for rule, nll in served.items()
            if rule != "uniform"
        },
        "no_choice": {
            f"{kind} {how} ×{s:g}": paired_gain(
                scores["test"]["base"][0],
                splits[how]["test"][served_label(kind, s)][0],
                counts,
                seed=seed,
            ).point
            for kind in KINDS
            for how in ("uniform", "aligned-only")
            for s in grid
        },
    }


def summarise(users: dict[str, dict]) -> dict:
    return {rule: rule_summary(users, rule, "uniform", "over_uniform") for rule in RULES}


def markdown(result: dict) -> str:
    lines = [
        f"`{result['command']}` at {result['commit']} on {result['date']}.",
        "",
        "| run | users | strengths scale | median served gain | harmed | changed | better / "
        "worse than uniform (95% paired interval) | median change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += rule_rows(result["runs"])
    lines += ["", "Median held-out gain over the base model of each candidate, no choice made:", ""]
    columns = list(next(iter(result["runs"][0]["users"].values()))["no_choice"])
    lines += median_table(result["runs"], "no_choice", columns)
    lines += ["", "Where another rule changes today's (uniform) choice:", ""]
    lines += changed_choices(result["runs"], "uniform", "over_uniform")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="finished emulator-mode runs")
    parser.add_argument("--name", default="replay")
    args = parser.parse_args()
    torch.set_num_threads(2)
    runs = []
    for path in args.runs.split(","):
        run = RunFolder(Path(path))
        print(f"{run.root.name}:", flush=True)
        grid = list(stored_config(run).evaluation.scales())
        scores, aligned = score_uniform(run), score_aligned(run, grid)
        users = {u: judge(s, aligned[u], grid, i) for i, (u, s) in enumerate(scores.items())}
        runs.append({"run": run.root.name, "users": users, "summary": summarise(users)})
    result = {**provenance("strength_layers"), "runs": runs}
    write_results(RESULTS / f"strength_layers_{args.name}.json", result, markdown(result))


if __name__ == "__main__":
    main()
