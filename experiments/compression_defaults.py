"""The federation's default compression, chosen by measurement: the share of the personal
gain over the global adapter that each candidate keeps, and at what storage, on the adapters
`gains.py` trained (emulator and full mode, 16 users).

    python -m experiments.compression_defaults          # ≈ 12 minutes, after gains.py
    python -m experiments.compression_defaults --runs lr16 --name lr16   # another run's adapters
    python -m experiments.compression_defaults --name lall --candidates 0.98:8,0.97:8,0.98:4 \
        --runs main-lall,pop-lall-code-emulator-generated      # other candidates, other runs

Candidates (`--candidates ENERGY:BITS,...`): by default energy 0.9 in float32 (the first
default), and energy 0.97, 0.98 and 0.99 in 8-bit codes; every other compression setting is
the federation's default (since 2026-12-07; before, the library's: uniform user weights).
An energy target, not a fixed rank, because the rank a population needs grows with it. The
share of the personal gain over the global adapter is given over every user whose personal
adapter beats the global one, and over those whose personal gain is significant in the
run's evaluation (issue 23's measure), that median with its paired bootstrap interval
(`intervals.median_share`). Every adapter is scored on the blocks the run's own evaluation
used (until 2026-12-08 on each user's first 2,048 tokens, against global and personal
perplexities over all of them: shares of users with more text mixed two texts). Writes
experiments/results/compression_defaults[_NAME].json and .md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from experiments.lib import (
    RESULTS,
    RUNS,
    provenance,
    refuse_other_settings,
    sweep_configs,
    write_results,
)
from soppu.server.config import FederationConfig
from soppu.server.prepare_run import stored_config
from soppu.server.store import RunFolder

CANDIDATES = "0.9:32,0.97:8,0.98:8,0.99:8"


def candidates(text: str) -> list[tuple[float, int]]:
    """ "0.98:8,0.97:4" → [(0.98, 8), (0.97, 4)]."""
    pairs = [item.split(":") for item in text.split(",")]
    if any(len(pair) != 2 for pair in pairs):
        sys.exit(f"--candidates: give ENERGY:BITS pairs, got {text!r}")
    return [(float(energy), int(bits)) for energy, bits in pairs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="gains-main-emulator,gains-main-full")
    parser.add_argument("--name", default="", help="Suffix of the result files.")
    parser.add_argument("--candidates", default=CANDIDATES, help="ENERGY:BITS,...")
    args = parser.parse_args()
    stem = "compression_defaults" + (f"_{args.name}" if args.name else "")
    settings = {"runs": args.runs, "candidates": args.candidates}
    target = RESULTS / f"{stem}.json"
    refuse_other_settings(target, settings)
    default = FederationConfig()
    # The federation's own compression settings (user weights, cores, clusters) but for
    # each candidate's energy and bits.
    federation = default.compression.to_config("cpu")
    configs = [replace(federation, energy=e, bits=b) for e, b in candidates(args.candidates)]
    results = {}
    for name in args.runs.split(","):
        run = RUNS / name
        if not (run / "evaluation.json").is_file():
            sys.exit(f"{run}: run experiments/gains.py first")
        mode = stored_config(RunFolder(run)).client_mode
        results[f"{mode} ({name})"] = sweep_configs(run, configs, intervals=True)
    lines = [
        f"The federation's default: energy {default.compression.energy}, "
        f"{default.compression.bits} bits. Adapters from {args.runs}.",
        "",
        "| run | energy | bits | storage ratio | kept of the gain over base: median "
        "| kept of the personal gain over global: median | p25 | min "
        "| users with a significant personal gain: median kept [95% interval] (users) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, rows in results.items():
        for r in rows:
            span = r["kept_over_global_significant_interval"]
            bounds = f" [{span['low']:.1%}, {span['high']:.1%}]" if span else ""
            lines.append(
                f"| {mode} | {r['energy']} | {r['bits']} | {r['ratio']:.1f}× "
                f"| {r['kept_median']:.1%} | **{r['kept_over_global_median']:.1%}** "
                f"| {r['kept_over_global_p25']:.1%} | {r['kept_over_global_min']:.1%} "
                f"| **{r['kept_over_global_significant_median']:.1%}**{bounds} "
                f"({r['kept_over_global_significant_users']}) |"
            )
    result = {**provenance(__file__), "settings": settings, "results": results}
    write_results(target, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
