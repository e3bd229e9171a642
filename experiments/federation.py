"""A simulated federation measured: quality kept by compression, storage ratio, Flower overhead.

    python -m experiments.federation --name scale64 --users 64 --rounds 1 --local-steps 15 \\
        --max-eval-tokens 1024 --rank 16          # the benchmarks' ≥ 64-user row (≈ 30 minutes)
    python -m experiments.federation --name main --cold   # the README's main job, timed
    python -m experiments.federation --analyse runs/experiments/main   # re-read a finished run

`--sweep-ranks 8,16,32` also re-compresses the finished store at those shared ranks (into a
scratch folder) and measures every user's compressed perplexity on the full model at each:
the storage ratio against the share of the gain kept.

`--cold` times what a first run pays: a fresh SOPPU cache that shares only the prepared model
and data (set-up), so the emulator is built and aligned inside the timed command.

Runs `soppu simulate` (a subprocess: its own Ray) into runs/experiments/<name>, then reads the
run folder and writes experiments/results/federation_<name>.json and .md:

- quality: each user's held-out perplexity (base, own adapter, published compressed adapter,
  all on the full model) and the share of the gain compression keeps, as a distribution;
- storage: the compressed store's parameters against every user's LoRA (the report's ratio);
- overhead per round: the server's wall time against the clients' time. `client` is the time
  inside `personalize` (local training and evaluation); `handler` adds the ClientApp's own
  setup (reading the user's text, loading the emulator). With W parallel workers the round's
  useful time is client/W; Flower's overhead is the rest of the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from experiments.lib import RESULTS, RUNS, analyse, launch, provenance, sweep
from soppu import atomic


def markdown(result: dict) -> str:
    from soppu.server.evaluation import summary_lines

    s, c = result["summary"], result["compression"]
    lines = [
        f"**{s['users']} users**, compressed {c['ratio']:.1f}× (shared ranks {c['ranks']}, "
        f"weighted error mean {c['error_mean']:.3f}).",
        "",
        "| share of the gain kept | min | p10 | p25 | median | p75 | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, what in (("kept", "over the base model"), ("kept_over_global", "over global")):
        if s.get(f"{key}_median") is not None:
            cells = " | ".join(
                f"{s[f'{key}_{q}']:.1%}" for q in ("min", "p10", "p25", "median", "p75", "max")
            )
            lines.append(f"| {what} ({s[f'{key}_users']} users) | {cells} |")
    lines += [
        "",
        *summary_lines(s),
        f"Median perplexity: base {s['base_median']:.2f}, global "
        + ("–" if s["global_median"] is None else f"{s['global_median']:.2f}")
        + f", personal {s['personal_median']:.2f}, compressed {s['compressed_median']:.2f}.",
        "",
        f"| round | wall | emulator install | gradient correction | clients' work / worker "
        f"({result['workers']}) | handlers / worker | Flower overhead | outside training |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rounds"]:
        lines.append(
            f"| {r['round']} | {r['wall_s']:.0f} s | {r['install_s']:.1f} s | "
            f"{r['correction_s']:.0f} s | {r['client_s_per_worker']:.0f} s | "
            f"{r['handler_s_per_worker']:.0f} s | {r['flower_overhead']:.1%} | "
            f"{r['outside_training']:.1%} |"
        )
    for r in result.get("personal_pass", []):
        lines.append(f"\nThe personal pass (round {r['round']}) took {r['wall_s']:.0f} s.")
    if result.get("sweep"):
        lines += [
            "",
            "| shared rank | storage ratio | error mean | kept over base: median | p25 "
            "| kept over global: median | p25 | min |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in result["sweep"]:
            lines.append(
                f"| {r['rank']} | {r['ratio']:.1f}× | {r['error_mean']:.3f} | "
                f"{r['kept_median']:.1%} | {r['kept_p25']:.1%} | "
                f"{r['kept_over_global_median']:.1%} | {r['kept_over_global_p25']:.1%} | "
                f"{r['kept_over_global_min']:.1%} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="main")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--client-cpus", type=float, default=1.0)
    parser.add_argument("--analyse", type=Path, help="Only read this finished run folder.")
    parser.add_argument("--sweep-ranks", default="", help="e.g. 8,16,32")
    parser.add_argument("--cold", action="store_true", help="Align the emulator afresh.")
    args, extra = parser.parse_known_args()
    workers = max(1, int((os.cpu_count() or 1) // args.client_cpus))
    run = args.analyse or RUNS / args.name
    seconds = None
    if args.analyse is None:
        if run.exists():
            sys.exit(f"{run} exists: remove it, or pass --analyse {run}")
        seconds = launch(args, run, extra)
    result = analyse(run, workers)
    ranks = [int(r) for r in args.sweep_ranks.split(",") if r]
    if ranks:
        result["sweep"] = sweep(run, ranks)
    result = {**provenance("federation"), **result}
    result |= {
        "command_seconds": seconds,
        "extra_args": extra,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    RESULTS.mkdir(exist_ok=True)
    name = args.name if args.analyse is None else run.name
    atomic.write_text(RESULTS / f"federation_{name}.json", json.dumps(result, indent=2) + "\n")
    head = f"`{result['command']}` at {result['commit']} on {result['date']}\n\n"
    text = head + markdown(result)
    if seconds is not None:
        text += f"\nThe whole command took {seconds / 60:.1f} minutes.\n"
    atomic.write_text(RESULTS / f"federation_{name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
