"""Each user's gain, emulator mode against full mode, side by side: the issue's targets.

    python -m experiments.gains                     # the benchmarks' table (≈ 80 minutes)
    python -m experiments.gains --users 4 --rounds 1 --local-steps 3 --name quick

Runs the same federation twice through `soppu simulate` (each its own Ray), once with the
clients holding the emulator (the default) and once holding the full model, with the same
users (the --users roles with the most text, all with ≥ 10,000 characters), rounds, local
steps, batch and threads. Both use the default scheme: a federated-average global adapter,
and every user's personal adapter fine-tuned from it each round. Then, per mode:

- each user's held-out perplexity on the full model: base, global, personal, compressed;
- the median gain over the base model, and emulator mode's share of full mode's gain;
- how many users' personal adapter beats the global one, and by how much;
- the compressed adapters' share of both gains at several shared ranks, in float32 and in
  8-bit storage (their storage ratio, counted in bytes);
- the client's cost: one training step's time and the client process's peak memory (one
  torch thread, the same batch), measured apart in fresh processes.

Writes experiments/results/gains_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

from experiments.lib import RESULTS, RUNS, analyse, launch_unless_finished, sweep
from experiments.sweep_recipes import Recipe, cost
from soppu import atomic
from soppu.emulator import META_NAME
from soppu.server.store import RunFolder

MODES = ("emulator", "full")
PRECISIONS = ("bf16", "fp32")


def run_mode(args: argparse.Namespace, mode: str, extra: list[str]) -> dict:
    run = RUNS / f"gains-{args.name}-{mode}"
    seconds = launch_unless_finished(args, run, ["--client-mode", mode, *extra])
    workers = max(1, int((os.cpu_count() or 1) // args.client_cpus))
    result = analyse(run, workers)
    ranks = [int(r) for r in args.sweep_ranks.split(",") if r]
    bits = tuple(int(b) for b in args.sweep_bits.split(",") if b)
    result["sweep"] = sweep(run, ranks, bits) if ranks else []
    result["command_seconds"] = seconds
    return result


def client_costs(args: argparse.Namespace) -> dict[str, dict]:
    """Step time and peak RSS of one client of each mode, the emulator the run used, in bf16
    autocast and in fp32, side by side."""
    emulator_run = RUNS / f"gains-{args.name}-emulator"
    folder = RunFolder(emulator_run).emulator.resolve()
    plan = json.loads((folder / META_NAME).read_text())
    recipes = {"emulator": Recipe("emulator"), "full": Recipe("full", mode="full")}
    costs = {
        f"{mode}_{precision}": cost(recipe, folder, precision)
        for precision in PRECISIONS
        for mode, recipe in recipes.items()
    }
    return {**costs, "emulator_layers": len(plan["full_layers"])}


def markdown(results: dict[str, dict], costs: dict, args: argparse.Namespace) -> str:
    em, fu = results["emulator"]["summary"], results["full"]["summary"]
    share = em["gain_median"] / fu["gain_median"] if fu["gain_median"] else float("nan")

    def pct(value):
        return "–" if value is None else f"{value:.1%}"

    lines = [
        f"{em['users']} Shakespeare roles, {args.rounds} rounds × {args.local_steps} local "
        "steps of 4×128 tokens, fedavg global + personal adapters, LoRA r=8 on q/v.",
        "",
        "| | emulator mode | full mode |",
        "|---|---|---|",
        f"| median gain over the base model (personal, full model) | **{pct(em['gain_median'])}** "
        f"| **{pct(fu['gain_median'])}** |",
        f"| median gain of the global adapter | {pct(em['global_gain_median'])} "
        f"| {pct(fu['global_gain_median'])} |",
        f"| users improved | {em['improved']}/{em['users']} | {fu['improved']}/{fu['users']} |",
        f"| personal beats global | **{em['beats_global']}/{em['with_global']}** "
        f"| **{fu['beats_global']}/{fu['with_global']}** |",
        f"| median personal gain over global | {pct(em['personal_over_global_median'])} "
        f"| {pct(fu['personal_over_global_median'])} |",
        *(
            f"| client step, {p} (1 thread, 4×128 tokens) "
            f"| {costs[f'emulator_{p}']['step_s']:.2f} s | {costs[f'full_{p}']['step_s']:.2f} s |"
            for p in PRECISIONS
        ),
        *(
            f"| client peak RSS, {p} | {costs[f'emulator_{p}']['peak_rss_mib']:.0f} MiB "
            f"| {costs[f'full_{p}']['peak_rss_mib']:.0f} MiB |"
            for p in PRECISIONS
        ),
        f"| layers the client holds | {costs['emulator_layers']} of 30 | 30 of 30 |",
        "",
        f"Emulator mode reaches **{share:.0%}** of full mode's median gain.",
    ]
    for mode, result in results.items():
        if not result["sweep"]:
            continue
        lines += [
            "",
            f"Compression, {mode} mode (the same adapters re-compressed at each shared rank "
            "and storage width):",
            "",
            "| shared rank | bits | storage ratio | kept of the gain over base: median "
            "| kept of the personal gain over global: median | p25 | min |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in result["sweep"]:
            lines.append(
                f"| {r['rank']} | {r.get('bits', 32)} | {r['ratio']:.1f}× "
                f"| {r['kept_median']:.1%} | "
                f"**{r['kept_over_global_median']:.1%}** | {r['kept_over_global_p25']:.1%} | "
                f"{r['kept_over_global_min']:.1%} |"
            )
    for mode, result in results.items():
        lines += [
            "",
            f"Per user, {mode} mode (held-out perplexity on the full model):",
            "",
            "| user | base | global | personal | compressed | gain | over global |",
            "|---|---|---|---|---|---|---|",
        ]
        for u in result["users"]:
            gain = 1 - u["personal"] / u["base"]
            over = 1 - u["personal"] / u["global"] if u["global"] else None
            lines.append(
                f"| {u['user']} | {u['base']:.2f} | {u['global']:.2f} | {u['personal']:.2f} "
                f"| {u['compressed']:.2f} | {gain:.1%} | {pct(over)} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="main")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=15)
    parser.add_argument("--client-cpus", type=float, default=1.0)
    parser.add_argument("--sweep-ranks", default="4,8,16,32")
    parser.add_argument("--sweep-bits", default="32,8", help="storage widths swept")
    args, extra = parser.parse_known_args()
    args.cold = False
    extra = ["--local-steps", str(args.local_steps), "--min-chars", "10000", *extra]
    results = {mode: run_mode(args, mode, extra) for mode in MODES}
    costs = client_costs(args)
    out = {
        "args": vars(args),
        "extra_args": extra,
        "modes": results,
        "client_costs": costs,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
    em, fu = results["emulator"]["summary"], results["full"]["summary"]
    out["gain_share"] = em["gain_median"] / fu["gain_median"] if fu["gain_median"] else None
    RESULTS.mkdir(exist_ok=True)
    atomic.write_text(RESULTS / f"gains_{args.name}.json", json.dumps(out, indent=2) + "\n")
    text = markdown(results, costs, args)
    atomic.write_text(RESULTS / f"gains_{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
