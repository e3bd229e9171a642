"""The federation's default compression, chosen by measurement: the share of the personal
gain over the global adapter that each candidate keeps, and at what storage, on the adapters
`gains.py` trained (emulator and full mode, 16 users).

    python -m experiments.compression_defaults          # ≈ 12 minutes, after gains.py
    python -m experiments.compression_defaults --runs lr16 --name lr16   # another run's adapters

Candidates: energy 0.9 in float32 (the first default), and energy 0.97, 0.98 and 0.99 in 8-bit
codes. An energy target, not a fixed rank, because the rank a population needs grows with it.
Writes experiments/results/compression_defaults.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys

from experiments.lib import RESULTS, RUNS, sweep_configs
from soppu import atomic
from soppu.compression.compress import CompressionConfig
from soppu.server.config import FederationConfig
from soppu.server.prepare_run import stored_config
from soppu.server.store import RunFolder

CANDIDATES = [(0.9, 32), (0.97, 8), (0.98, 8), (0.99, 8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="gains-main-emulator,gains-main-full")
    parser.add_argument("--name", default="", help="Suffix of the result files.")
    args = parser.parse_args()
    default = FederationConfig()
    configs = [CompressionConfig(energy=e, bits=b) for e, b in CANDIDATES]
    results = {}
    for name in args.runs.split(","):
        run = RUNS / name
        if not (run / "evaluation.json").is_file():
            sys.exit(f"{run}: run experiments/gains.py first")
        mode = stored_config(RunFolder(run)).client_mode
        results[f"{mode} ({name})"] = sweep_configs(run, configs, max_eval_tokens=2048)
        users = len(json.loads((run / "evaluation.json").read_text())["users"])
    lines = [
        f"The federation's default: energy {default.compression.energy}, "
        f"{default.compression.bits} bits. {users} users' adapters from {args.runs}.",
        "",
        "| mode | energy | bits | storage ratio | kept of the gain over base: median "
        "| kept of the personal gain over global: median | p25 | min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, rows in results.items():
        for r in rows:
            lines.append(
                f"| {mode} | {r['energy']} | {r['bits']} | {r['ratio']:.1f}× "
                f"| {r['kept_median']:.1%} | **{r['kept_over_global_median']:.1%}** "
                f"| {r['kept_over_global_p25']:.1%} | {r['kept_over_global_min']:.1%} |"
            )
    RESULTS.mkdir(exist_ok=True)
    stem = "compression_defaults" + (f"_{args.name}" if args.name else "")
    atomic.write_text(RESULTS / f"{stem}.json", json.dumps(results, indent=2) + "\n")
    atomic.write_text(RESULTS / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
