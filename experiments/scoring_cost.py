"""Where the server's scoring goes at the end of a run: the served choice and the final evaluation.

    python -m experiments.scoring_cost --run runs/experiments/main-default   # ≈ 6 minutes

On a copy of a finished run (its emulator's weights left out; nothing of the run is touched),
the served choice (`select_served`, every candidate on each user's validation text) and the
final evaluation (`evaluate_run`, each user's held-out text) run again on the full model in
fp32, as the run's own did, every scoring timed: how many, over how many tokens, at what rate.
Both are forward passes of the full model and nothing else, so their time is the tokens they
score over the machine's rate (bf16 would be faster and was measured to change choices:
`experiments/choice_precision.py`). Writes experiments/results/scoring_cost_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import soppu.server.evaluation as evaluation
import soppu.server.selection as selection
from experiments.lib import RESULTS, provenance, refuse_other_settings, write_results
from soppu.basemodel import set_threads
from soppu.server.prepare_run import choose_users, load_base, served_choice, stored_config
from soppu.server.store import RunFolder


class TimedScoring:
    """`scored` with every call's seconds and tokens kept."""

    def __init__(self, scored):
        self.scored, self.calls = scored, []

    def __call__(self, model, lora, blocks, *args, **kwargs):
        start = time.perf_counter()
        sums, counts = self.scored(model, lora, blocks, *args, **kwargs)
        self.calls.append((time.perf_counter() - start, int(counts.sum())))
        return sums, counts

    def phase(self, name: str, seconds: float) -> dict:
        scoring = sum(s for s, _ in self.calls)
        tokens = sum(t for _, t in self.calls)
        row = {
            "phase": name,
            "seconds": seconds,
            "scorings": len(self.calls),
            "scoring_seconds": scoring,
            "tokens": tokens,
            "tokens_per_s": tokens / scoring if scoring else None,
        }
        self.calls = []
        return row


def measure(source: Path, into: Path) -> list[dict]:
    shutil.copytree(source, into, symlinks=True, ignore=shutil.ignore_patterns("model.safetensors"))
    run = RunFolder(into)
    config = stored_config(run)
    base, users = load_base(config), choose_users(config)
    timed = TimedScoring(evaluation.scored)
    evaluation.scored = selection.scored = timed  # both modules call it by this name
    rows = []
    start = time.perf_counter()
    choose = served_choice(run, config, base, users, print)  # the run's own, its settings
    if choose is None:
        sys.exit(f"{source}: no served choice to time (its log says why above)")
    choose()
    rows.append(timed.phase("served choice (validation text)", time.perf_counter() - start))
    start = time.perf_counter()
    evaluation.evaluate_run(run, base.model, base.tokenizer, users, config.judge())
    rows.append(timed.phase("final evaluation (held-out text)", time.perf_counter() - start))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--name", default="main")
    args = parser.parse_args()
    target = RESULTS / f"scoring_cost_{args.name}.json"
    refuse_other_settings(target, {"run": str(args.run)})
    threads = set_threads(None)
    with tempfile.TemporaryDirectory() as scratch:
        rows = measure(args.run, Path(scratch) / "run")
    result = {
        **provenance(__file__),
        "settings": {"run": str(args.run)},
        "run": str(args.run),
        "users": len(RunFolder(args.run).users()),
        "threads": threads,
        "torch": torch.__version__,
        "rows": rows,
    }
    write_results(target, result, markdown(result))


def markdown(result: dict) -> str:
    lines = [
        f"`{result['command']}` at {result['commit']} on {result['date']}: {result['users']} "
        f"users of `{result['run']}`, fp32 on {result['threads']} threads ({result['torch']}).",
        "",
        "| phase | wall | scorings | their seconds | tokens scored | tokens / s |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['phase']} | {r['seconds']:.1f} s | {r['scorings']} | "
            f"{r['scoring_seconds']:.1f} s | {r['tokens']:,} | {r['tokens_per_s']:.0f} |"
            for r in result["rows"]
        ),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
