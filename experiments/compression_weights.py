"""Does compression sacrifice small users? Uniform against norm weights at the federation's
default (energy 0.98, 8-bit codes), on finished runs' adapters, side by side.

    python -m experiments.compression_weights                       # the populations' runs
    python -m experiments.compression_weights --runs pop-defaults-fortunes-full --name quick

With uniform weights a slot's shared bases follow the users whose deltas carry the most energy,
and the energy target counts energy, so a user with small deltas can lose most of theirs; norm
weights (wᵢ = 1/‖Dᵢ‖²) count every user alike. Per run and weighting: the storage ratio, the
worst user's reconstruction error, and, on the full model, the share of each user's gain the
published adapter keeps: over the base model (every user), and over the global adapter (users
whose personal adapter beats it significantly), the median and the worst user.

Writes experiments/results/compression_weights[_<name>].json and .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from experiments.lib import RESULTS, RUNS, Judge, pct, provenance, write_results
from soppu.adapters import read_lora
from soppu.compression.compress import CompressionConfig
from soppu.server.compression_round import compress_and_publish
from soppu.server.evaluation import gain_kept
from soppu.server.store import RunFolder, snapshot

POPULATION_RUNS = ",".join(
    f"pop-defaults-{p}-{m}"
    for p in ("shakespeare", "fortunes", "sympy")
    for m in ("emulator-pool" if p == "shakespeare" else "emulator-generated", "full")
)
WEIGHTS = ("uniform", "norm")


def measure(run: Path) -> list[dict]:
    judge = Judge(run)
    scratch = run / "weights-sweep"
    shutil.rmtree(scratch, ignore_errors=True)
    paths = snapshot(RunFolder(run), scratch / "adapters")
    rows = []
    for weights in WEIGHTS:
        config = CompressionConfig(energy=0.98, bits=8, weights=weights)
        version = compress_and_publish(
            paths, scratch / weights, scratch / f"serving-{weights}", config
        )
        totals = json.loads((scratch / weights / "manifest.json").read_text())["totals"]
        over_base, over_global = {}, {}
        for user, row in judge.evaluation.items():
            ppl = judge.perplexity(user, read_lora(version / "users" / user))
            chosen = row.get(row["served"]) or row["personal"]
            over_base[user] = gain_kept(row["base"], chosen, ppl)
            personal_wins = row["gains"].get("personal_over_global", {}).get("verdict")
            if personal_wins == "better" and row["served"] == "personal":
                over_global[user] = gain_kept(row["global"], row["personal"], ppl)
        rows.append(
            {
                "run": run.name,
                "weights": weights,
                "ratio": totals["ratio"],
                "error_mean": totals["mean"],
                "error_max": totals["max"],
                "kept": _spread([v for v in over_base.values() if v is not None]),
                "kept_over_global": _spread([v for v in over_global.values() if v is not None]),
                "per_user": {"over_base": over_base, "over_global": over_global},
            }
        )
        print(
            f"{run.name} {weights}: {totals['ratio']:.1f}×, error max {totals['max']:.3f}, "
            f"kept min {rows[-1]['kept']['min']}, over global min "
            f"{rows[-1]['kept_over_global']['min']}",
            flush=True,
        )
    shutil.rmtree(scratch, ignore_errors=True)
    return rows


def _spread(values: list[float]) -> dict:
    if not values:
        return {"users": 0, "median": None, "min": None}
    return {"users": len(values), "median": statistics.median(values), "min": min(values)}


def markdown(result: dict) -> str:
    lines = [
        f"`{result['command']}` at {result['commit']} on {result['date']}",
        "",
        "Energy 0.98, 8-bit codes (the federation's default) with each weighting; kept: the "
        "share of a user's gain the published adapter keeps (over the base: every user; over "
        "the global adapter: users whose personal adapter beats it significantly).",
        "",
        "| run | weights | storage ratio | error: mean | max | kept over base: median | min "
        "| kept over global: users | median | min |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        k, g = r["kept"], r["kept_over_global"]
        lines.append(
            f"| {r['run']} | {r['weights']} | {r['ratio']:.1f}× | {r['error_mean']:.3f} "
            f"| {r['error_max']:.3f} | {pct(k['median'])} | {pct(k['min'])} | {g['users']} "
            f"| {pct(g['median'])} | {pct(g['min'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default=POPULATION_RUNS)
    parser.add_argument("--name", default="")
    args = parser.parse_args()
    stem = "compression_weights" + (f"_{args.name}" if args.name else "")
    target = RESULTS / f"{stem}.json"
    if target.is_file() and json.loads(target.read_text())["runs"] != args.runs:
        sys.exit(f"{target} holds other runs; choose another --name")
    rows = []
    for name in args.runs.split(","):
        if not (RUNS / name / "evaluation.json").is_file():
            sys.exit(f"{RUNS / name}: not a finished run")
        rows += measure(RUNS / name)
    result = {**provenance("compression_weights.py"), "runs": args.runs, "rows": rows}
    write_results(target, result, markdown(result))


if __name__ == "__main__":
    main()
