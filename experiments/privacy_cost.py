"""What central differential privacy costs the honest users' gain, against its ε.

    python -m experiments.poisoning --run runs/experiments/pop-defaults-shakespeare-emulator-pool
    python -m experiments.privacy_cost --run runs/experiments/pop-defaults-shakespeare-emulator-pool

On the honest round experiments/poisoning.py trained and kept (every user of a finished run,
one more real round from its global adapter), the global adapter is averaged as
`--dp-noise Z --dp-clip C` would (soppu/server/schemes/privacy.py: each update clipped to C,
an unweighted mean, Gaussian noise Z·C/n), with C the round's median update norm (so about half
the updates are clipped, as the robust mean's default does), for each noise multiplier and a
few noise draws; then each user's held-out perplexity on the full model with it, beside plain
FedAvg and the default robust mean, and ε at δ = 1e-5 after 1 and after the run's rounds + 1.

Writes experiments/results/privacy_cost_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from experiments.lib import RESULTS, RUNS, Judge, provenance, write_results
from soppu.server.evaluation import relative_gain
from soppu.server.prepare_run import stored_config
from soppu.server.schemes import Privacy, Robustness, epsilon, private_mean, robust_mean
from soppu.server.schemes.aggregate import _norm, _update
from soppu.server.store import RunFolder

DELTA = 1e-5


def median_gain(judge: Judge, lora) -> float:
    gains = [
        relative_gain(row["base"], judge.perplexity(user, lora))
        for user, row in judge.evaluation.items()
    ]
    return statistics.median(gains)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--steps", type=int, default=8, help="the poisoning.py round's steps")
    parser.add_argument("--noises", default="0.1,0.3,1.0")
    parser.add_argument("--draws", type=int, default=2, help="noise draws per multiplier")
    parser.add_argument("--name", default="")
    args = parser.parse_args()
    run = Path(args.run)
    cache = RUNS / f"poisoning-{run.name}-steps{args.steps}.pt"
    if not cache.is_file():
        sys.exit(f"{cache}: no honest round; run experiments/poisoning.py --run {run} first")
    replies = torch.load(cache, weights_only=False)[0]
    rounds = stored_config(RunFolder(run)).rounds + 1
    judge = Judge(run)
    norms = [_norm(_update(trained, start)) for trained, start, _ in replies.values()]
    clip = statistics.median(norms)
    rows = [
        {"rule": "plain FedAvg", "gain": median_gain(judge, _plain(replies))},
        {"rule": "robust mean (default)", "gain": median_gain(judge, robust_mean(replies).lora)},
    ]
    print(rows, flush=True)
    for noise in (float(z) for z in args.noises.split(",")):
        draws = []
        for draw in range(args.draws):
            generator = torch.Generator().manual_seed(draw)
            private = private_mean(replies, Privacy(noise, clip, DELTA), generator)
            draws.append(median_gain(judge, private.lora))
        rows.append(
            {
                "rule": f"DP, noise {noise:g}",
                "noise": noise,
                "gain": statistics.mean(draws),
                "draws": draws,
                "epsilon_1": epsilon(noise, 1, DELTA),
                f"epsilon_{rounds}": epsilon(noise, rounds, DELTA),
            }
        )
        print(rows[-1], flush=True)
    result = {
        **provenance("privacy_cost.py"),
        "run": str(run),
        "users": len(replies),
        "clip": clip,
        "update_norms": norms,
        "rounds": rounds,
        "delta": DELTA,
        "rows": rows,
    }
    name = args.name or run.name
    write_results(RESULTS / f"privacy_cost_{name}.json", result, markdown(result))


def _plain(replies: dict):
    return robust_mean(replies, Robustness(clip=0, weight_cap=0, trim=0)).lora


def markdown(r: dict) -> str:
    rounds = r["rounds"]
    lines = [
        f"`{r['command']}` at {r['commit']} on {r['date']}: {r['users']} users, one honest "
        f"round; clip = the round's median update norm ({r['clip']:.3g}); δ = {r['delta']:g}.",
        "",
        f"| global adapter | median gain over base | ε after 1 round | ε after {rounds} |",
        "|---|---|---|---|",
    ]
    for row in r["rows"]:
        eps = [row.get("epsilon_1"), row.get(f"epsilon_{rounds}")]
        cells = " | ".join("–" if e is None else f"{e:.3g}" for e in eps)
        draws = row.get("draws")
        spread = f" ({', '.join(f'{d:.2%}' for d in draws)})" if draws else ""
        lines.append(f"| {row['rule']} | {row['gain']:.2%}{spread} | {cells} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
