"""What one or two hostile clients do to the global adapter, with and without the robust mean.

    python -m experiments.poisoning --run runs/experiments/pop-defaults-shakespeare-emulator-pool
    python -m experiments.poisoning --run RUN --steps 4 --name quick

On a finished run (its emulator, its users, its global adapter as the round's start), it
trains one more real round for every user on the emulator, twice with different data-order
seeds (the honest run-to-run spread), with the gradient correction measured at the start as a
round's server measures it. Then, with the scheme's own aggregation code
(`soppu/server/schemes/aggregate.py`), for plain FedAvg and the robust mean:

- the distance of the global adapter to the honest-only one when 1 or 2 of the replies are
  hostile (update scaled ×1e4; noise of ±9.9e5 on every weight; num-examples claimed 1e12),
  in units of the honest run-to-run spread (target: ≤ 2);
- replies the round code refuses on receipt (num-examples −1e12, NaN, missing, 0, 2.5);
- what the robust mean costs the honest users with no attacker: each user's held-out
  perplexity on the full model with either global adapter (target: median gain within 1
  point of plain FedAvg's).

Writes experiments/results/poisoning_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from experiments.lib import RESULTS, RUNS, Judge, provenance
from soppu import atomic
from soppu import emulator as E
from soppu.adapters import LoraState
from soppu.personalize import personalize
from soppu.server.evaluation import relative_gain
from soppu.server.federation import checked_metrics
from soppu.server.prepare_run import public_for, round_correction
from soppu.server.schemes import Robustness, robust_mean
from soppu.server.store import RunFolder

PLAIN = Robustness(clip=0, weight_cap=0, trim=0)
RULES = {  # side by side; the first is plain FedAvg
    "fedavg": PLAIN,
    "clip 1×, cap 4×": Robustness(clip=1, weight_cap=4, trim=0),
    "clip 2×, cap 4×": Robustness(clip=2, weight_cap=4, trim=0),
    "clip 1×, cap 4×, trim 0.2": Robustness(clip=1, weight_cap=4, trim=0.2),
    "clip 1×, median (the default)": Robustness(clip=1, weight_cap=4, trim=0.5),
    "median alone": Robustness(clip=0, weight_cap=0, trim=0.5),
}


def honest_round(judge: Judge, run: Path, steps: int, seed: int) -> dict:
    """user → (trained, start, examples): one real round from the run's global adapter."""
    folder = RunFolder(run)
    emulator, info = E.load(folder.emulator)
    start = folder.global_adapter()
    public = public_for(judge.config, print, judge.base)
    correction = round_correction(judge.config, judge.base, emulator, info, public)(start, 99)
    train = replace(judge.config.train(judge.config.schedule.rounds + 1), steps=steps, seed=seed)
    replies = {}
    for user in judge.evaluation:
        result = personalize(
            judge.texts[user],
            emulator,
            info,
            judge.base.tokenizer,
            train,
            start=start,
            correction=correction or None,
        )
        replies[user] = (result.lora, start, max(1, result.train_tokens // train.seq_len))
        print(f"  seed {seed}: {user} trained ({result.seconds:.0f} s)", flush=True)
    return replies


def distance(a: LoraState, b: LoraState) -> float:
    return sum(float((a.tensors[k] - b.tensors[k]).double().norm() ** 2) for k in a.tensors) ** 0.5


def attacks(replies: dict) -> dict[str, Callable]:
    def scaled(trained, start, n):
        t = {k: start.tensors[k] + 1e4 * (v - start.tensors[k]) for k, v in trained.tensors.items()}
        return LoraState(t, trained.config), start, n

    def noise(trained, start, n):
        generator = torch.Generator().manual_seed(7)
        t = {
            k: v + 9.9e5 * torch.randint(-1, 2, v.shape, generator=generator).float()
            for k, v in trained.tensors.items()
        }
        return LoraState(t, trained.config), start, n

    def greedy(trained, start, n):
        return trained, start, 10**12

    return {"scaled ×1e4": scaled, "noise ±9.9e5": noise, "num-examples 1e12": greedy}


def poisoned(replies: dict, hostile: int, attack) -> tuple[dict, dict]:
    users = sorted(replies)
    bad = users[-hostile:]
    honest = {u: replies[u] for u in users if u not in bad}
    return honest, {**honest, **{u: attack(*replies[u]) for u in bad}}


def refused_on_receipt() -> dict[str, str]:
    out = {}
    for label, claim in {
        "num-examples −1e12": {"num-examples": -1e12},
        "num-examples NaN": {"num-examples": float("nan")},
        "num-examples missing": {},
        "num-examples 0": {"num-examples": 0},
        "num-examples 2.5": {"num-examples": 2.5},
    }.items():
        try:
            checked_metrics(claim)
            out[label] = "accepted"
        except ValueError as exc:
            out[label] = f"refused: {exc}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--name", default="")
    args = parser.parse_args()
    run = Path(args.run)
    name = args.name or run.name
    target = RESULTS / f"poisoning_{name}.json"
    rules = {rule: vars(r) for rule, r in RULES.items()}
    if target.is_file() and json.loads(target.read_text())["rules"] != rules:
        sys.exit(f"{target} holds a run of other rules; choose another --name")
    # the blocks (and cap) the run's own evaluation judged base and served on
    judge = Judge(run)
    cache = RUNS / f"poisoning-{run.name}-steps{args.steps}.pt"  # the honest rounds, once
    if cache.is_file():
        rounds = torch.load(cache, weights_only=False)
    else:
        rounds = [honest_round(judge, run, args.steps, seed) for seed in (0, 1)]
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(rounds, cache)
    spread = distance(robust_mean(rounds[0], PLAIN).lora, robust_mean(rounds[1], PLAIN).lora)
    rows = []
    for hostile in (1, 2):
        for label, attack in attacks(rounds[0]).items():
            honest, mixed = poisoned(rounds[0], hostile, attack)
            row = {"hostile": hostile, "attack": label, "distance": {}, "named": {}}
            for rule, robustness in RULES.items():
                reference = robust_mean(honest, robustness).lora
                averaged = robust_mean(mixed, robustness)
                row["distance"][rule] = distance(averaged.lora, reference) / spread
                row["named"][rule] = sorted({*averaged.clipped, *averaged.capped})
            rows.append(row)
            print(row, flush=True)
    averaged = {rule: robust_mean(rounds[0], r) for rule, r in RULES.items()}
    gains = []
    for user, evaluated in judge.evaluation.items():
        row = {"user": user}
        for rule, mean in averaged.items():
            row[rule] = relative_gain(evaluated["base"], judge.perplexity(user, mean.lora))
        gains.append(row)
        print(row, flush=True)
    result = {
        **provenance("poisoning.py"),
        "run": str(run),
        "steps": args.steps,
        "users": len(rounds[0]),
        "honest_spread": spread,
        "attacks": rows,
        "refused_on_receipt": refused_on_receipt(),
        "rules": rules,
        "no_attack": {
            "users": gains,
            "median": {rule: statistics.median(g[rule] for g in gains) for rule in RULES},
            "limited": {rule: sorted({*m.clipped, *m.capped}) for rule, m in averaged.items()},
        },
    }
    RESULTS.mkdir(exist_ok=True)
    atomic.write_text(target, json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    atomic.write_text(target.with_suffix(".md"), text)
    print(text)


def markdown(result: dict) -> str:
    rules = list(result["rules"])
    lines = [
        f"`{result['command']}` at {result['commit']} on {result['date']}: {result['users']} "
        f"users, one real round of {result['steps']} steps from the run's global adapter.",
        "",
        "Distance of the global adapter to the honest-only one under the same rule, in units "
        f"of the honest run-to-run spread ({result['honest_spread']:.3g}; target ≤ 2):",
        "",
        "| hostile | attack | " + " | ".join(rules) + " |",
        "|---|---|" + "---|" * len(rules),
    ]
    for r in result["attacks"]:
        cells = " | ".join(f"{r['distance'][rule]:.3g}" for rule in rules)
        lines.append(f"| {r['hostile']} | {r['attack']} | {cells} |")
    lines += ["", "Refused on receipt (that user's round only):", ""]
    lines += [f"- {k}: {v}" for k, v in result["refused_on_receipt"].items()]
    n = result["no_attack"]
    lines += [
        "",
        "No attacker: median gain over the base model on held-out text (full model), and the "
        "users each rule limited:",
        "",
        "| rule | median gain | limited |",
        "|---|---|---|",
    ]
    for rule in rules:
        limited = ", ".join(n["limited"][rule]) or "nobody"
        lines.append(f"| {rule} | {n['median'][rule]:.2%} | {limited} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
