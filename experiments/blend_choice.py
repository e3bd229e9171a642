"""Would serving a blend of the global and personal adapters serve users more? Finished runs'
choices replayed with blends as extra candidates, each judged on the users' held-out text.

    python -m experiments.blend_choice --name NAME --runs RUN[,RUN...] [--weights 0.25,0.5,0.75]

Issue 22 names the blend G + μ·(P − G) = (1 − μ)·G + μ·P as a served candidate: on
populations where a user's own adapter falls behind the global one (the translators in
emulator mode) or where both help differently, a point between them may beat both. A blend is
still one plain PEFT adapter: the two LoRAs side by side, rank 2r, lora_alpha doubled so each
keeps its scaling.

For every user of each run this scores the blends at each μ on both splits (cached in
runs/experiments/choice-scores/<run>.blends.pt, beside the candidates `choice_rules` cached),
then replays:

    personal-first  today's served choice (`soppu.server.selection.choose`, as
                    experiments/choice_rules.py replays it)
    blend-gated     the blend with the lowest validation loss where it beats today's choice
                    significantly on validation text (and the base model too); else
                    today's choice
    blend-walk      the blends as part of the user's own family: from the personal adapter
                    (μ = 1) towards the global one while the validation loss falls, then
                    today's rule with that family's best in place of the personal adapter's
    blend-contested the same, but blends are tried only where the user's own adapter is not
                    significantly ahead of the global one on validation
    oracle          the lowest *held-out* loss among today's candidates and the blends: what
                    no rule can reach, the most the blends could add

and judges each against today's choice on held-out text (paired 95% intervals) and against the
base model (harm).

Writes experiments/results/blend_choice_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import torch

from experiments.choice_rules import (
    changed_choices,
    choose_among,
    mean_loss,
    median_table,
    personal_first,
    rule_rows,
    rule_summary,
    score_run,
    visited_candidates,
)
from experiments.lib import RESULTS, RUNS, provenance, write_results
from soppu import atomic, basemodel, lm
from soppu.adapters import blend
from soppu.intervals import paired_gain
from soppu.personalize import scored
from soppu.server.prepare_run import choose_users, stored_config
from soppu.server.selection import global_over_personal, strength_walk
from soppu.server.store import RunFolder, served_label

Scores = tuple[torch.Tensor, torch.Tensor]


def blend_label(weight: float) -> str:
    """The blend's key in the score caches (the product labels it "blend@μ")."""
    return f"blend{weight:g}"


def score_blends(run: RunFolder, weights: list[float]) -> dict[str, dict]:
    """user → {"val"|"test": {blend label: Scores}} (cached, extended where weights are new)."""
    cache = RUNS / "choice-scores" / f"{run.root.name}.blends.pt"
    found = torch.load(cache) if cache.is_file() else {}
    wanted = [blend_label(w) for w in weights]
    if all(all(lab in found.get(u, {}).get("val", {}) for lab in wanted) for u in run.users()):
        return found
    config = stored_config(run)
    base = basemodel.load(config.base_model or None)
    pad, cap = base.tokenizer.pad_token_id, config.evaluation.final_eval_tokens or 2**62
    texts, shared = choose_users(config), run.global_adapter()
    for i, user in enumerate(run.users()):
        print(f"  [{i + 1}/{len(run.users())}] {user} blends", flush=True)
        own = run.latest(user)
        entry = found.setdefault(user, {"val": {}, "test": {}})
        for split in ("val", "test"):
            text = texts[user].validation if split == "val" else texts[user].test
            blocks = lm.token_blocks(base.tokenizer, text, config.training.seq_len, cap)
            for w in weights:
                if blend_label(w) not in entry[split]:
                    entry[split][blend_label(w)] = scored(
                        base.model,
                        blend(shared, own, w),
                        blocks,
                        pad,
                        config.training.batch_size,
                    )
    buffer = io.BytesIO()
    torch.save(found, buffer)
    atomic.write_bytes(cache, buffer.getvalue())
    return found


def blend_walk(
    val: dict, blends: dict, grid: list[float], seed: int, contested: bool = False
) -> tuple[str, int]:
    """The served choice's rule with blends (`soppu.server.selection`, `--serve-blends`):
    the blends the walk from the personal adapter (μ = 1) towards the global one visits join
    the user's own family, then `choose`."""
    visited = visited_candidates(val, grid)
    if contested:  # blends only where the user's own adapter is not significantly ahead
        losses = {label: mean_loss(s) for label, s in visited.items()}
        ahead = global_over_personal(visited, losses, seed)
        if ahead is not None and ahead.verdict == "worse":
            return personal_first(val, grid, seed), 0
    weights = sorted({float(lab.removeprefix("blend")) for lab in blends} | {1.0})
    walked = strength_walk(
        weights, lambda w: val["personal"] if w == 1.0 else blends[blend_label(w)]
    )
    visited |= {served_label("blend", w): s for w, s in walked.items() if w != 1.0}
    pick = choose_among(visited, seed)
    return pick.replace("blend@", "blend"), len(walked) - 1  # the cache's label; blends scored


def judge(scores: dict, blends: dict, grid: list[float], seed: int) -> dict:
    val, test = scores["val"] | blends["val"], scores["test"] | blends["test"]
    today = personal_first(scores["val"], grid, seed)
    best_blend = min(blends["val"], key=lambda lab: mean_loss(val[lab]))
    counts_val = val["base"][1]
    beats_today = paired_gain(val[today][0], val[best_blend][0], counts_val, seed=seed)
    beats_base = paired_gain(val["base"][0], val[best_blend][0], counts_val, seed=seed)
    gated = (
        best_blend if beats_today.verdict == "better" and beats_base.verdict == "better" else today
    )
    oracle = min(test, key=lambda lab: mean_loss(test[lab]))
    walked, walk_cost = blend_walk(scores["val"], blends["val"], grid, seed)
    contested, contested_cost = blend_walk(scores["val"], blends["val"], grid, seed, True)
    picks = {
        "personal-first": today,
        "blend-gated": gated,
        "blend-walk": walked,
        "blend-contested": contested,
        "oracle": oracle,
    }
    counts = test["base"][1]
    return {
        "picks": picks,
        "blends_scored": {"blend-walk": walk_cost, "blend-contested": contested_cost},
        "over_base": {
            rule: paired_gain(test["base"][0], test[p][0], counts, seed=seed).as_dict()
            for rule, p in picks.items()
        },
        "over_today": {
            rule: paired_gain(test[today][0], test[p][0], counts, seed=seed).as_dict()
            for rule, p in picks.items()
            if rule != "personal-first"
        },
        "blends_test": {
            lab: paired_gain(test["base"][0], test[lab][0], counts, seed=seed).point
            for lab in blends["test"]
        },
    }


def summarise(users: dict[str, dict]) -> dict:
    out = {}
    for rule in ("personal-first", "blend-gated", "blend-walk", "blend-contested", "oracle"):
        row = rule_summary(users, rule, "personal-first", "over_today")
        if rule in ("blend-walk", "blend-contested"):
            row["blends_scored"] = sum(u["blends_scored"][rule] for u in users.values())
        out[rule] = row
    return out


def markdown(result: dict) -> str:
    lines = [
        f"`{result['command']}` at {result['commit']} on {result['date']}.",
        "",
        "| run | users | rule | median served gain | harmed | changed | better / worse than "
        "today's (95% paired interval) | median change | blends scored |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += rule_rows(result["runs"], "blends_scored")
    lines += ["", "Median held-out gain over the base model of each blend, no choice made:", ""]
    lines += median_table(
        result["runs"], "blends_test", [blend_label(w) for w in result["weights"]]
    )
    lines += ["", "Where a rule changes today's choice (personal-first):", ""]
    lines += changed_choices(result["runs"], "personal-first", "over_today")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="finished run folders, comma-separated")
    parser.add_argument("--weights", default="0.25,0.5,0.75", help="the blends' μ")
    parser.add_argument("--name", default="replay")
    args = parser.parse_args()
    weights = [float(w) for w in args.weights.split(",")]
    torch.set_num_threads(2)
    runs = []
    for path in args.runs.split(","):
        run = RunFolder(Path(path))
        print(f"{run.root.name}:", flush=True)
        grid = list(stored_config(run).evaluation.scales())
        scores, blends = score_run(run), score_blends(run, weights)
        labels = [blend_label(w) for w in weights]
        users = {
            u: judge(
                s, {split: {lab: blends[u][split][lab] for lab in labels} for split in s}, grid, i
            )
            for i, (u, s) in enumerate(scores.items())
        }
        runs.append({"run": run.root.name, "users": users, "summary": summarise(users)})
    result = {**provenance("blend_choice"), "weights": weights, "runs": runs}
    write_results(RESULTS / f"blend_choice_{args.name}.json", result, markdown(result))


if __name__ == "__main__":
    main()
