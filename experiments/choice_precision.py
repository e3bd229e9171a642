"""Whether the served choice may score its candidates in bf16: the same choice, faster?

    python -m experiments.choice_precision --runs RUN[,RUN...]

The served choice (soppu/server/selection.py) scores every candidate (the base model, the
global and the personal adapter at every strength of the run's `serve_scales`) on each user's
validation text on the full model: in the main job that is nine forward passes over every
user's validation split, about a quarter of the whole command. bf16 autocast runs those
forwards about 2.3× faster on a CPU with native bf16, but rounds every logit. This scores each
user's candidates on validation once in fp32 and once in bf16 (each timed), chooses by the
product's own rule with each, and judges both choices on the user's held-out text in fp32
(the final evaluation's precision): the test gain of each over the base model, and the bf16
choice against the fp32 one with its paired 95% interval (a user counts as changed only where
it excludes 0).

Writes experiments/results/choice_precision_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from experiments.adapter_scale import candidates, choose
from experiments.lib import RESULTS, interval, pct, provenance, write_results
from soppu import basemodel, lm, precision
from soppu.intervals import paired_gain
from soppu.personalize import scored
from soppu.server.prepare_run import choose_users, stored_config
from soppu.server.store import RunFolder

PRECISIONS = ("fp32", "bf16")


def measure_user(run: RunFolder, base, config, text, user: str, seed: int) -> dict:
    pad, size = base.tokenizer.pad_token_id, config.training.batch_size
    cap = config.evaluation.final_eval_tokens or 2**62
    val = lm.token_blocks(base.tokenizer, text.validation, config.training.seq_len, cap)
    test = lm.token_blocks(base.tokenizer, text.test, config.training.seq_len, cap)
    found = candidates(run, user, config.evaluation.scales())
    picks, seconds = {}, {}
    for mixed in PRECISIONS:
        began = time.perf_counter()
        scores = {
            name: scored(base.model, lora, val, pad, size, mixed) for name, lora in found.items()
        }
        seconds[mixed] = time.perf_counter() - began
        picks[mixed] = choose(scores, list(scores), seed)
    judged = {
        name: scored(base.model, found[name], test, pad, size, "fp32")
        for name in {"base", *picks.values()}
    }
    base_test, counts = judged["base"]

    def over_base(name: str) -> float:
        return paired_gain(base_test, judged[name][0], counts, seed=seed).point

    change = paired_gain(judged[picks["fp32"]][0], judged[picks["bf16"]][0], counts, seed=seed)
    return {
        "user": user,
        "val_tokens": sum(int(b.numel()) for b in val),
        "test_tokens": int(counts.sum()),
        "seconds": seconds,
        "choice": picks,
        "test_gain": {mixed: over_base(picks[mixed]) for mixed in PRECISIONS},
        "bf16_over_fp32": change.as_dict(),
    }


def summarise(rows: list[dict]) -> dict:
    verdicts = [r["bf16_over_fp32"]["verdict"] for r in rows]
    fp32 = sum(r["seconds"]["fp32"] for r in rows)
    bf16 = sum(r["seconds"]["bf16"] for r in rows)
    return {
        "users": len(rows),
        "same_choice": sum(r["choice"]["fp32"] == r["choice"]["bf16"] for r in rows),
        "better": verdicts.count("better"),
        "worse": verdicts.count("worse"),
        "median_gain": {m: statistics.median(r["test_gain"][m] for r in rows) for m in PRECISIONS},
        "seconds": {"fp32": fp32, "bf16": bf16},
        "speed_up": fp32 / bf16 if bf16 else None,
    }


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = [
        f"`{result['command']}` at {result['commit']} on {result['date']}; bf16 native here: "
        f"{result['native_bf16']}.",
        "",
        "| run | user | choice fp32 | choice bf16 | held-out gain fp32 | bf16 "
        "| bf16 over fp32 (95% interval) | scoring s fp32 | bf16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["users"]:
        c = r["bf16_over_fp32"]
        lines.append(
            f"| {r['run']} | {r['user']} | {r['choice']['fp32']} | {r['choice']['bf16']} "
            f"| {pct(r['test_gain']['fp32'])} | {pct(r['test_gain']['bf16'])} "
            f"| {interval(c)} "
            f"| {r['seconds']['fp32']:.1f} | {r['seconds']['bf16']:.1f} |"
        )
    lines += [
        "",
        f"Same choice for {s['same_choice']} of {s['users']} users; the bf16 choice is "
        f"significantly better on held-out text for {s['better']}, worse for {s['worse']}. "
        f"Median held-out gain over the base model: fp32 choice {pct(s['median_gain']['fp32'])}, "
        f"bf16 choice {pct(s['median_gain']['bf16'])}. Scoring every candidate on validation: "
        f"{s['seconds']['fp32']:.0f} s in fp32, {s['seconds']['bf16']:.0f} s in bf16 "
        f"({s['speed_up']:.2f}× faster).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="finished federation runs, comma-separated")
    parser.add_argument("--name", default="default", help="results file suffix")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: all cores")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for path in args.runs.split(","):
        run = RunFolder(Path(path))
        config = stored_config(run)
        base = basemodel.load(config.base_model or None)
        texts = choose_users(config)
        users = run.users()
        for i, user in enumerate(users):
            print(f"{run.root.name} [{i + 1}/{len(users)}] {user}", flush=True)
            row = measure_user(run, base, config, texts[user], user, seed=i)
            rows.append({"run": run.root.name, **row})
    result = {
        **provenance("choice_precision"),
        "runs": args.runs.split(","),
        "native_bf16": precision.native_bf16("cpu"),
        "summary": summarise(rows),
        "users": rows,
    }
    write_results(RESULTS / f"choice_precision_{args.name}.json", result, markdown(result))


if __name__ == "__main__":
    main()
