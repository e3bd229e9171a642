"""Which rule should choose what a user is served? Finished runs' choices replayed under other
rules, each judged on the users' held-out text.

    python -m experiments.choice_rules --name NAME --runs RUN[,RUN...]

The served choice (soppu/server/selection.py) scores, on a user's validation text, the base
model and the global and personal adapters at the strengths its walk visits. Until
2026-12-06 it served the lowest validation loss among the base model and the candidates
significantly better than it; among seven or so candidates whose validation losses differ by
tenths of a percent, the lowest is partly the luckiest (the winner's curse): sympy's
combinatorics user was served the global adapter at 1.25, 0.3% better than their personal
adapter on 1,376 validation tokens and 3.4% worse on held-out text.

This scores every candidate at every strength of the run's `--serve-scales` on both splits
(cached in runs/experiments/choice-scores/), then replays, per user:

    lowest          the rule until 2026-12-06, its walk included
    anchored        the personal adapter as trained (λ = 1) where it beats the base model
                    significantly on validation text, unless the lowest rule's choice beats
                    *it* significantly there; else that choice
    personal-first  the served choice's rule since (`soppu.server.selection.choose`): the
                    personal adapter at the strength its walk finds best, where that beats
                    the base model significantly, unless the global adapter at its own best
                    beats it significantly; else the lowest rule's choice (only the kind, not
                    the strength, must earn its place)

and judges each rule's choice on held-out text against the lowest rule's (paired 95%
intervals), and against the base model (harm).

Writes experiments/results/choice_rules_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import io
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from experiments.lib import RESULTS, RUNS, interval, pct, provenance, write_results
from soppu import atomic, basemodel, lm
from soppu.intervals import paired_gain
from soppu.personalize import scored
from soppu.server.prepare_run import choose_users, stored_config
from soppu.server.selection import choose, global_over_personal, strength_walk
from soppu.server.store import RunFolder, served_label

Scores = tuple[torch.Tensor, torch.Tensor]  # per-block NLL sums, token counts
ANCHOR = "personal"


def score_run(run: RunFolder) -> dict[str, dict]:
    """user → {"val"|"test": {label: Scores}}, every candidate at every strength (cached)."""
    cache = RUNS / "choice-scores" / f"{run.root.name}.pt"
    if cache.is_file():
        return torch.load(cache)
    config = stored_config(run)
    base = basemodel.load(config.base_model or None)
    pad, cap = base.tokenizer.pad_token_id, config.evaluation.final_eval_tokens or 2**62
    texts, grid = choose_users(config), config.evaluation.scales()
    adapters = {"global": run.global_adapter()}
    found = {}
    for i, user in enumerate(run.users()):
        print(f"  [{i + 1}/{len(run.users())}] {user}", flush=True)
        loras = {"base": None} | {
            served_label(kind, s): lora.scaled(s)
            for kind, lora in (adapters | {"personal": run.latest(user)}).items()
            for s in grid
        }
        found[user] = {}
        for split in ("val", "test"):
            text = texts[user].validation if split == "val" else texts[user].test
            blocks = lm.token_blocks(base.tokenizer, text, config.training.seq_len, cap)
            found[user][split] = {
                name: scored(base.model, lora, blocks, pad, config.training.batch_size)
                for name, lora in loras.items()
            }
    cache.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(found, buffer)
    atomic.write_bytes(cache, buffer.getvalue())  # a crash leaves no half-written cache
    return found


def mean_loss(scores: Scores) -> float:
    return float(scores[0].sum()) / float(scores[1].sum())


def lowest(val: dict[str, Scores], grid: list[float], seed: int) -> str:
    """The rule until 2026-12-06: each adapter's walk, then the lowest validation loss among
    the base model and the candidates significantly better than it (a tie: the simpler),
    which `choose` applies where the personal adapter has no claim of its own."""
    visited = visited_candidates(val, grid)
    losses = {label: mean_loss(scores) for label, scores in visited.items()}
    return choose(losses, better_than(val, "base", visited, seed), global_beats_personal=True)


def anchored(val: dict[str, Scores], grid: list[float], seed: int) -> str:
    """The personal adapter as trained where it beats the base model significantly, unless
    the lowest rule's choice beats it significantly; else that choice."""
    pick = lowest(val, grid, seed)
    if ANCHOR not in better_than(val, "base", {ANCHOR: val[ANCHOR]}, seed) or pick == ANCHOR:
        return pick
    return pick if better_than(val, ANCHOR, {pick: val[pick]}, seed) else ANCHOR


def personal_first(val: dict[str, Scores], grid: list[float], seed: int) -> str:
    """The served choice's rule from 2026-12-06, as `select_served` makes it: the walks, the
    global adapter's best against the personal one's, then `choose`."""
    return choose_among(visited_candidates(val, grid), seed)


def choose_among(visited: dict[str, Scores], seed: int) -> str:
    """`choose` on the visited candidates' validation scores, as `select_served` applies it:
    the global adapter's best against the user's own family's, significance against base."""
    losses = {label: mean_loss(scores) for label, scores in visited.items()}
    rival = global_over_personal(visited, losses, seed)
    beaten = rival is not None and rival.verdict == "better"
    return choose(losses, better_than(visited, "base", visited, seed), global_beats_personal=beaten)


def visited_candidates(val: dict[str, Scores], grid: list[float]) -> dict[str, Scores]:
    """The base model and each adapter at the strengths its walk visits."""
    visited = {"base": val["base"]}
    for kind in ("global", "personal"):
        walked = strength_walk(grid, lambda s, kind=kind: val[served_label(kind, s)])
        visited |= {served_label(kind, s): scores for s, scores in walked.items()}
    return visited


def better_than(val: dict[str, Scores], reference: str, among: dict[str, Scores], seed: int) -> set:
    counts = val[reference][1]
    return {
        name
        for name, (sums, _) in among.items()
        if name != reference
        and paired_gain(val[reference][0], sums, counts, seed=seed).verdict == "better"
    }


RULES: dict[str, Callable[[dict, list[float], int], str]] = {
    "lowest": lowest,
    "anchored": anchored,
    "personal-first": personal_first,
}


def judge(scores: dict, grid: list[float], seed: int) -> dict:
    """Each rule's choice and its held-out gains: over the base model, and over the lowest
    rule's choice."""
    test = scores["test"]
    counts = test["base"][1]
    picks = {rule: pick(scores["val"], grid, seed) for rule, pick in RULES.items()}
    return {
        "picks": picks,
        "test_tokens": int(counts.sum()),
        "val_tokens": int(scores["val"]["base"][1].sum()),
        "over_base": {
            rule: paired_gain(test["base"][0], test[p][0], counts, seed=seed).as_dict()
            for rule, p in picks.items()
        },
        "over_lowest": {
            rule: paired_gain(test[picks["lowest"]][0], test[p][0], counts, seed=seed).as_dict()
            for rule, p in picks.items()
            if rule != "lowest"
        },
    }


def summarise(users: dict[str, dict]) -> dict:
    out = {}
    for rule in RULES:
        out[rule] = rule_summary(users, rule, "lowest", "over_lowest")
    return out


def rule_summary(users: dict[str, dict], rule: str, reference: str, against: str) -> dict:
    """A rule's median served gain, users harmed, choices changed against the `reference`
    rule's and, for other rules, how many are significantly better / worse than it
    (`u[against][rule]`)."""
    gains = [u["over_base"][rule] for u in users.values()]
    row = {
        "median": statistics.median(g["point"] for g in gains),
        "harmed": sum(g["verdict"] == "worse" for g in gains),
        "changed": sum(u["picks"][rule] != u["picks"][reference] for u in users.values()),
    }
    if rule != reference:
        changes = [u[against][rule] for u in users.values()]
        verdicts = [c["verdict"] for c in changes]
        row |= {"better": verdicts.count("better"), "worse": verdicts.count("worse")}
        row["median_change"] = statistics.median(c["point"] for c in changes)
    return row


def markdown(result: dict) -> str:
    lines = [
        f"`{result['command']}` at {result['commit']} on {result['date']}.",
        "",
        "| run | users | rule | median served gain | harmed | choice changed | better / worse "
        "than lowest (95% paired interval) |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        for rule, s in run["summary"].items():
            against = f"{s['better']} / {s['worse']}" if rule != "lowest" else "–"
            lines.append(
                f"| {run['run']} | {len(run['users'])} | {rule} | {pct(s['median'])} "
                f"| {s['harmed']} | {s['changed']} | {against} |"
            )
    lines += ["", "Where a rule changes a choice:", ""]
    lines += changed_choices(result["runs"], "lowest", "over_lowest")
    return "\n".join(lines) + "\n"


def rule_rows(runs: list[dict], *extra: str) -> list[str]:
    """A row per run and rule: users, median served gain, users harmed, choices changed,
    better / worse than the reference rule with the median change, then the summary's
    `extra` fields."""
    lines = []
    for run in runs:
        for rule, s in run["summary"].items():
            vs = f"{s['better']} / {s['worse']}" if "better" in s else "–"
            change = pct(s["median_change"]) if "median_change" in s else "–"
            cells = [run["run"], len(run["users"]), rule, pct(s["median"]), s["harmed"]]
            cells += [s.get("changed", "–"), vs, change, *(s.get(f, "–") for f in extra)]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def median_table(runs: list[dict], field: str, columns: list[str]) -> list[str]:
    """A table of each run's median over its users of `u[field][column]`, per column."""
    lines = ["| run | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for run in runs:
        users = run["users"].values()
        cells = [pct(statistics.median(u[field][c] for u in users)) for c in columns]
        lines.append(f"| {run['run']} | " + " | ".join(cells) + " |")
    return lines


def changed_choices(runs: list[dict], reference: str, against: str) -> list[str]:
    """A table of every choice a rule changes against the `reference` rule's, with its
    held-out change (`u[against][rule]`)."""
    lines = [f"| run | user | rule | {reference} | the rule's | held-out change (95% interval) |"]
    lines += ["|---|---|---|---|---|---|"]
    for run in runs:
        for user, u in run["users"].items():
            for rule, pick in u["picks"].items():
                if pick != u["picks"][reference]:
                    lines.append(
                        f"| {run['run']} | {user} | {rule} | {u['picks'][reference]} | {pick} "
                        f"| {interval(u[against][rule])} |"
                    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="finished run folders, comma-separated")
    parser.add_argument("--name", default="replay")
    args = parser.parse_args()
    runs = []
    for path in args.runs.split(","):
        run = RunFolder(Path(path))
        print(f"{run.root.name}:", flush=True)
        grid = list(stored_config(run).evaluation.scales())
        scores = score_run(run)
        users = {u: judge(s, grid, seed=i) for i, (u, s) in enumerate(scores.items())}
        runs.append({"run": run.root.name, "users": users, "summary": summarise(users)})
    result = {**provenance("choice_rules"), "rules": list(RULES), "runs": runs}
    write_results(RESULTS / f"choice_rules_{args.name}.json", result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
