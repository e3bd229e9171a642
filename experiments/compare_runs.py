"""Two runs of the same users, user by user: is what one serves significantly better?

    python -m experiments.compare_runs --baseline RUN --runs RUN[,RUN...] --name NAME

For every user both runs hold, each run's published adapter (what that user is served now,
`RUN/serving/current`) and the base model are scored on the user's held-out text on the full
model in fp32, exactly as the final evaluation scores it (`final_eval_tokens` of it); the
gain of each run over the base model, and of each run over the baseline with its paired 95%
bootstrap interval over the held-out blocks: a user counts as better or worse only where the
interval excludes 0. For a lever measured against the defaults on the same users and seed.

Writes experiments/results/compare_runs_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from experiments.lib import RESULTS, interval, pct, provenance, write_results
from soppu import basemodel, lm
from soppu.adapters import read_lora
from soppu.intervals import paired_gain
from soppu.personalize import scored
from soppu.server.prepare_run import choose_users, stored_config
from soppu.server.store import RunFolder
from soppu.server.versions import ServingVersion, Versions


def served(run: RunFolder, user: str):
    """What `user` is served now: their PEFT dir in the run's current serving version."""
    return read_lora(ServingVersion(Versions(run.serving).require_current()).user_dir(user))


def compare(baseline: RunFolder, other: RunFolder, base, texts: dict, config) -> list[dict]:
    pad = base.tokenizer.pad_token_id
    rows = []
    users = [u for u in baseline.users() if u in set(other.users())]
    for seed, user in enumerate(users):
        print(f"{other.root.name} [{seed + 1}/{len(users)}] {user}", flush=True)
        blocks = lm.token_blocks(
            base.tokenizer,
            texts[user].test,
            config.training.seq_len,
            config.evaluation.final_eval_tokens or 2**62,
        )
        none, counts = scored(base.model, None, blocks, pad, config.training.batch_size)
        a, _ = scored(base.model, served(baseline, user), blocks, pad, config.training.batch_size)
        b, _ = scored(base.model, served(other, user), blocks, pad, config.training.batch_size)
        change = paired_gain(a, b, counts, seed=seed)
        rows.append(
            {
                "run": other.root.name,
                "user": user,
                "tokens": int(counts.sum()),
                "baseline_gain": paired_gain(none, a, counts, seed=seed).point,
                "gain": paired_gain(none, b, counts, seed=seed).point,
                "over_baseline": change.as_dict(),
            }
        )
    return rows


def summarise(rows: list[dict]) -> dict:
    by_run: dict[str, dict] = {}
    for run in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == run]
        verdicts = [r["over_baseline"]["verdict"] for r in mine]
        by_run[run] = {
            "users": len(mine),
            "better": verdicts.count("better"),
            "worse": verdicts.count("worse"),
            "baseline_median": statistics.median(r["baseline_gain"] for r in mine),
            "median": statistics.median(r["gain"] for r in mine),
        }
    return by_run


def markdown(result: dict) -> str:
    lines = [
        f"`{result['command']}` at {result['commit']} on {result['date']}; baseline "
        f"`{result['baseline']}`.",
        "",
        "| run | user | baseline's gain over base | this run's | this run over the baseline "
        "(95% interval) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["users"]:
        c = r["over_baseline"]
        lines.append(
            f"| {r['run']} | {r['user']} | {pct(r['baseline_gain'])} | {pct(r['gain'])} "
            f"| {interval(c)} | {c['verdict']} |"
        )
    lines += ["", "| run | users | median served gain: baseline | this run | better | worse |"]
    lines.append("|---|---|---|---|---|---|")
    for run, s in result["summary"].items():
        lines.append(
            f"| {run} | {s['users']} | {pct(s['baseline_median'])} | **{pct(s['median'])}** "
            f"| {s['better']} | {s['worse']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, type=Path, help="the run compared against")
    parser.add_argument("--runs", required=True, help="runs of the same users, comma-separated")
    parser.add_argument("--name", required=True, help="results file suffix")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: all cores")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    baseline = RunFolder(args.baseline)
    config = stored_config(baseline)
    base = basemodel.load(config.base_model or None)
    texts = choose_users(config)
    rows = [
        row
        for path in args.runs.split(",")
        for row in compare(baseline, RunFolder(Path(path)), base, texts, config)
    ]
    result = {
        **provenance("compare_runs"),
        "baseline": str(args.baseline),
        "summary": summarise(rows),
        "users": rows,
    }
    write_results(RESULTS / f"compare_runs_{args.name}.json", result, markdown(result))


if __name__ == "__main__":
    main()
