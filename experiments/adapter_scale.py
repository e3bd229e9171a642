"""How strongly to apply each user's adapter: the served adapter scaled by λ, λ chosen per user
on their own validation text.

    python -m experiments.adapter_scale --run runs/experiments/pop-defaults-sympy-emulator-generated
    python -m experiments.adapter_scale --run RUN --scales 0.5,1,1.5,2,3 --users 2   # a quick look

An adapter trained on the emulator moves the full model by another amount than it moved the
emulator it was trained on (its effect passes through layers the emulator lacks). This scales
each user's personal and the global LoRA by λ (lora_B × λ: a plain PEFT adapter still) over
`--scales`, and chooses per user on their validation text by the served choice's own rule
(soppu/server/selection.py: the lowest validation loss among the base model and the candidates
significantly better than it), once among today's candidates (λ = 1) and once among all. Both
choices are judged on held-out text: the served gain over the base model, and the gain of the
scaled choice over today's with its paired 95% interval; a user counts as helped or harmed only
where that interval excludes 0. Every candidate is scored on both splits, so the tables also
show each λ's median held-out gain (no choice). One process; ≈ 2 minutes per user and
candidate pair of splits on this 2-core CPU.

Writes experiments/results/adapter_scale_<run name>_l<strengths>.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from experiments.lib import RESULTS, interval, pct, provenance, write_results
from soppu import basemodel, lm
from soppu.adapters import LoraState
from soppu.intervals import paired_gain
from soppu.personalize import scored
from soppu.server.prepare_run import choose_users, stored_config
from soppu.server.selection import choose as served_choice
from soppu.server.selection import global_over_personal
from soppu.server.store import RunFolder


def candidates(run: RunFolder, user: str, scales: list[float]) -> dict[str, LoraState | None]:
    found: dict[str, LoraState | None] = {"base": None}
    for name, lora in (("global", run.global_adapter()), ("personal", run.latest(user))):
        if lora is not None:
            found |= {f"{name}×{s:g}": lora.scaled(s) for s in scales}
    return found


def choose(val: dict[str, tuple[torch.Tensor, torch.Tensor]], allowed: list[str], seed: int) -> str:
    """The served choice's own rule (`soppu.server.selection.choose`, with its test of the
    global adapter's best against the personal one's) over `allowed`."""
    base, counts = val["base"]
    losses = {name: float(val[name][0].sum()) / float(counts.sum()) for name in allowed}
    better = {
        name
        for name in allowed
        if name != "base" and paired_gain(base, val[name][0], counts, seed=seed).verdict == "better"
    }
    rival = global_over_personal(val, losses, seed)
    beaten = rival is not None and rival.verdict == "better"
    return served_choice(losses, better, global_beats_personal=beaten)


def measure_user(run, base, config, text, user: str, scales: list[float], seed: int) -> dict:
    tokenizer, pad = base.tokenizer, base.tokenizer.pad_token_id
    cap = config.evaluation.final_eval_tokens or 2**62
    splits = {
        "val": lm.token_blocks(tokenizer, text.validation, config.training.seq_len, cap),
        "test": lm.token_blocks(tokenizer, text.test, config.training.seq_len, cap),
    }
    scores = {split: {} for split in splits}
    for name, lora in candidates(run, user, scales).items():
        for split, blocks in splits.items():
            scores[split][name] = scored(base.model, lora, blocks, pad, config.training.batch_size)
    names = list(scores["val"])
    today = choose(scores["val"], [n for n in names if n == "base" or n.endswith("×1")], seed)
    scaled_pick = choose(scores["val"], names, seed)
    test = scores["test"]
    base_scores, counts = test["base"]
    tokens = float(counts.sum())

    def over_base(name: str) -> float:
        return paired_gain(base_scores, test[name][0], counts, seed=seed).point

    change = paired_gain(test[today][0], test[scaled_pick][0], counts, seed=seed)
    return {
        "user": user,
        "test_tokens": int(tokens),
        "val_tokens": int(scores["val"]["base"][1].sum()),
        "today": today,
        "scaled": scaled_pick,
        "today_gain": over_base(today),
        "scaled_gain": over_base(scaled_pick),
        "scaled_over_today": change.as_dict(),
        "test_gain": {name: over_base(name) for name in names if name != "base"},
    }


def markdown(result: dict) -> str:
    rows = result["users"]
    lines = [
        f"`{result['command']}` at {result['commit']} on {result['date']}; run "
        f"`{result['run']}`, λ over {result['scales']}.",
        "",
        "| user | today's choice | its held-out gain | scaled choice | its held-out gain "
        "| scaled over today (95% interval) | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["scaled_over_today"]
        lines.append(
            f"| {r['user']} | {r['today']} | {pct(r['today_gain'])} | {r['scaled']} "
            f"| {pct(r['scaled_gain'])} | {interval(c)} "
            f"| {c['verdict']} |"
        )
    s = result["summary"]
    lines += [
        "",
        f"Median served gain over the base model: today {pct(s['today_median'])}, scaled "
        f"{pct(s['scaled_median'])}; scaled choice significantly better for "
        f"{s['better']}, worse for {s['worse']} of {len(rows)} users.",
        "",
        "Each candidate's median held-out gain over the base model (no choice):",
        "",
        "| candidate | " + " | ".join(f"λ = {x:g}" for x in result["scales"]) + " |",
        "|---|" + "---|" * len(result["scales"]),
    ]
    for kind in ("global", "personal"):
        cells = [s["by_candidate"].get(f"{kind}×{x:g}") for x in result["scales"]]
        lines.append(f"| {kind} | " + " | ".join(pct(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def summarise(rows: list[dict], scales: list[float]) -> dict:
    names = {name for r in rows for name in r["test_gain"]}
    verdicts = [r["scaled_over_today"]["verdict"] for r in rows]
    return {
        "today_median": statistics.median(r["today_gain"] for r in rows),
        "scaled_median": statistics.median(r["scaled_gain"] for r in rows),
        "better": verdicts.count("better"),
        "worse": verdicts.count("worse"),
        "by_candidate": {
            n: statistics.median(r["test_gain"][n] for r in rows if n in r["test_gain"])
            for n in sorted(names)
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished federation run")
    parser.add_argument("--scales", default="0.5,1,1.5,2,3", help="λ values, comma-separated")
    parser.add_argument("--users", type=int, default=0, help="the first N users only; 0: all")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: all cores")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scales = sorted({float(x) for x in args.scales.split(",")} | {1.0})
    run = RunFolder(args.run)
    config = stored_config(run)
    base = basemodel.load(config.base_model or None)
    texts = choose_users(config)
    users = run.users()[: args.users or None]
    rows = []
    for i, user in enumerate(users):
        print(f"[{i + 1}/{len(users)}] {user}", flush=True)
        rows.append(measure_user(run, base, config, texts[user], user, scales, seed=i))
    result = {
        **provenance("adapter_scale"),
        "run": str(args.run),
        "scales": scales,
        "summary": summarise(rows, scales),
        "users": rows,
    }
    # the grid in the name: a run with other strengths never replaces this one's results
    grid = "-".join(f"{x:g}" for x in scales)
    name = f"{args.run.name}_l{grid}" + (f"-{args.users}users" if args.users else "")
    write_results(RESULTS / f"adapter_scale_{name}.json", result, markdown(result))


if __name__ == "__main__":
    main()
