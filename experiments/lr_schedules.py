"""The client's learning-rate schedule within each round, measured: what a warm-up (and a
higher peak lr) does to each user's gain against the constant lr 1e-3 the rounds used before.

    python -m experiments.lr_schedules              # the benchmarks' table (≈ 12 min a schedule)
    python -m experiments.lr_schedules --schedules constant,warmup3

Why: every round's client starts a fresh AdamW from the global adapter, and AdamW's first
step moves every parameter by ±lr whatever its gradient; one more pass at the rounds' lr from a
trained global adapter ended worse than it for 12 of 16 users (experiments/personal_pass.py).
transformers' warm-up starts at lr 0, so the first step only gathers the moments.

Runs the main job's federation (`soppu simulate`, emulator mode, --users roles, --rounds
rounds of the default local steps) once per schedule into runs/experiments/lr-<schedule>
(a finished run there is read again, not re-run), then per schedule: the median gain over the
base model on the full model (personal and global adapters), how many users' personal adapter
beats the global one, and the median personal gain over it. Writes
experiments/results/lr_schedules.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys

from experiments.lib import RESULTS, RUNS, launch_unless_finished
from soppu import atomic
from soppu.server.store import RunFolder

# name: (lr, schedule, warm-up steps), each round; every run passes all three
SCHEDULES = {
    "constant": (1e-3, "constant", 0),  # the default before this comparison
    "warmup3": (1e-3, "constant_with_warmup", 3),
    # the warm-up's lost progress (a step at lr 0, two below it) given back by a higher peak:
    # the federation's default since
    "warmup3_lr1.5e-3": (1.5e-3, "constant_with_warmup", 3),
    "cosine_warmup3": (1e-3, "cosine", 3),
}


def flags(name: str) -> list[str]:
    lr, schedule, warmup = SCHEDULES[name]
    return ["--lr", str(lr), "--lr-scheduler-type", schedule, "--warmup-steps", str(warmup)]


def measure(args: argparse.Namespace, name: str) -> dict:
    run = RUNS / f"lr-{name}"
    launch_unless_finished(args, run, flags(name))
    summary = json.loads(RunFolder(run).evaluation.read_text())["summary"]
    keys = ("gain_median", "global_gain_median", "beats_global", "personal_over_global_median")
    return {"schedule": name, "flags": flags(name), **{k: summary[k] for k in keys}}


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"{args.users} Shakespeare roles, {args.rounds} rounds, emulator mode, the default "
        "recipe; held-out perplexity on the full model.",
        "",
        "| schedule (each round) | median gain, personal | median gain, global | personal "
        "beats global | median personal gain over global |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        command = " ".join(r["flags"])
        lines.append(
            f"| `{command}` | **{r['gain_median']:.1%}** | {r['global_gain_median']:.1%} | "
            f"{r['beats_global']}/{args.users} | {r['personal_over_global_median']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schedules", default="constant,warmup3,warmup3_lr1.5e-3")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--client-cpus", type=float, default=1.0)
    args = parser.parse_args()
    args.cold = False  # the emulator is built once and shared by every schedule's run
    names = [s for s in args.schedules.split(",") if s]
    unknown = set(names) - set(SCHEDULES)
    if unknown:
        sys.exit(f"unknown schedules {sorted(unknown)}: choose from {list(SCHEDULES)}")
    rows = [measure(args, name) for name in names]
    RESULTS.mkdir(exist_ok=True)
    atomic.write_text(RESULTS / "lr_schedules.json", json.dumps(rows, indent=2) + "\n")
    text = markdown(rows, args)
    atomic.write_text(RESULTS / "lr_schedules.md", text)
    print(text)


if __name__ == "__main__":
    main()
