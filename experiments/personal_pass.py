"""What one more local pass buys: every user fine-tunes the federation's final global adapter.

    python -m experiments.personal_pass                 # on gains.py's emulator-mode run (≈ 15 min)
    python -m experiments.personal_pass --run runs/experiments/gains-main-full
    python -m experiments.personal_pass --lr 3e-4                # a gentler pass
    python -m experiments.personal_pass --users 2 --steps 2      # a quick look

In the default scheme a user's personal adapter is their last round's fine-tune of the
previous global adapter, and the global adapter it is judged against is the average of those
fine-tunes, so it also carries the last round's shared progress. The usual "FedAvg + fine-tune"
protocol ends instead with one more local pass from the final global adapter. This measures
that protocol on a finished run without building it into the federation: for every user,
`--steps` steps from RUN/global on the next batches of their text (the data order continues
after the run's rounds), with the gradient correction measured at RUN/global as a round's
server measures it; then held-out perplexity on the full model against the run's own base,
global and personal adapters (the run's evaluation blocks).

Writes experiments/results/personal_pass_<run name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from experiments.lib import RESULTS, RUNS, Judge
from soppu import atomic
from soppu import emulator as E
from soppu.personalize import personalize
from soppu.server.evaluation import relative_gain
from soppu.server.prepare_run import public_for, round_correction
from soppu.server.store import RunFolder


def measure(run: Path, steps: int, lr: float | None = None, users: int | None = None) -> dict:
    folder = RunFolder(run)
    judge = Judge(run)
    emulator, info = E.load(folder.emulator)
    start = folder.global_adapter()
    if start is None:
        sys.exit(f"{run} has no global adapter (scheme local?)")
    began = time.perf_counter()
    public = public_for(judge.config, print, judge.base)
    measure_at = round_correction(judge.config, judge.base, emulator, info, public)
    correction = measure_at(
        start, judge.config.schedule.rounds + 1
    )  # as a next round's server would
    correction_s = time.perf_counter() - began
    next_round = judge.config.train(judge.config.schedule.rounds + 1)
    train = replace(next_round, steps=steps, lr=lr or next_round.lr)
    rows = []
    chosen = list(judge.evaluation.items())[:users]
    for i, (user, row) in enumerate(chosen, start=1):
        result = personalize(
            judge.texts[user],
            emulator,
            info,
            judge.base.tokenizer,
            train,
            start=start,
            correction=correction or None,
        )
        passed = judge.perplexity(user, result.lora)
        rows.append(
            {
                "user": user,
                "base": row["base"],
                "global": row["global"],
                "personal": row["personal"],
                "pass": passed,
                "seconds": result.seconds,
            }
        )
        print(
            f"[{i}/{len(chosen)}] {user}: global {row['global']:.2f}, "
            f"personal {row['personal']:.2f}, one more pass {passed:.2f} "
            f"({result.seconds:.0f} s)",
            flush=True,
        )
    return {
        "run": str(run),
        "steps": steps,
        "lr": train.lr,
        "correction_seconds": correction_s,
        "users": rows,
        "summary": summarise(rows),
    }


def summarise(rows: list[dict]) -> dict:
    def median(values):
        return statistics.median(values) if values else None

    out = {"users": len(rows)}
    for name in ("global", "personal", "pass"):
        out[f"gain_{name}"] = median([relative_gain(r["base"], r[name]) for r in rows])
    for name in ("personal", "pass"):
        out[f"beats_global_{name}"] = sum(r[name] < r["global"] for r in rows)
        out[f"over_global_{name}"] = median([relative_gain(r["global"], r[name]) for r in rows])
    out["pass_beats_personal"] = sum(r["pass"] < r["personal"] for r in rows)
    return out


def markdown(result: dict) -> str:
    s = result["summary"]
    n = s["users"]
    lines = [
        f"Run `{result['run']}`; one more pass of {result['steps']} steps at lr "
        f"{result['lr']:g} from its global "
        f"adapter (gradient correction {result['correction_seconds']:.0f} s, once).",
        "",
        "| | the run's personal adapter | after one more pass |",
        "|---|---|---|",
        f"| median gain over the base model | {s['gain_personal']:.1%} | {s['gain_pass']:.1%} |",
        f"| beats the global adapter | {s['beats_global_personal']}/{n} | "
        f"{s['beats_global_pass']}/{n} |",
        f"| median gain over the global adapter | {s['over_global_personal']:.1%} | "
        f"{s['over_global_pass']:.1%} |",
        "",
        f"The global adapter's median gain: {s['gain_global']:.1%}. One more pass beats the "
        f"run's personal adapter for {s['pass_beats_personal']}/{n} users.",
        "",
        "| user | base | global | personal | one more pass | pass over global |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["users"]:
        lines.append(
            f"| {r['user']} | {r['base']:.2f} | {r['global']:.2f} | {r['personal']:.2f} | "
            f"{r['pass']:.2f} | {relative_gain(r['global'], r['pass']):.1%} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=RUNS / "gains-main-emulator")
    parser.add_argument("--steps", type=int, default=15, help="steps of the extra pass")
    parser.add_argument("--lr", type=float, help="the pass's learning rate (default: the run's)")
    parser.add_argument("--users", type=int, help="only the first N users (a quick look)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = measure(args.run, args.steps, args.lr, args.users)
    RESULTS.mkdir(exist_ok=True)
    name = f"personal_pass_{args.run.name}" + (f"_lr{args.lr:g}" if args.lr else "")
    name += f"_{args.users}users" if args.users else ""  # a quick look keeps the full results
    atomic.write_text(RESULTS / f"{name}.json", json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    atomic.write_text(RESULTS / f"{name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
