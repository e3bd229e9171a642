"""Whether the final evaluation may score in bf16: the same verdicts, faster?

    python -m experiments.judge_precision --run RUN [--name NAME]

The final evaluation (soppu/server/evaluation.py) scores five models per user on their
held-out text on the full model, in fp32: the base model, the global and the personal
adapter, what the user is served before compression and its published (compressed) form.
This scores them again in bf16 autocast, and in bf16 with the output head in fp32 (the 49k
logits are the largest tensor bf16 rounds), each mode timed, and reports every comparison
the evaluation makes (served over base, personal over global, what compression costs) in
each mode beside fp32's own paired 95% interval: a faster mode can judge only where its
points stay well inside fp32's intervals.

Writes experiments/results/judge_precision_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from experiments.lib import RESULTS, interval, pct, provenance, write_results
from soppu import basemodel, lm
from soppu.adapters import read_lora
from soppu.intervals import paired_gain
from soppu.personalize import scored
from soppu.server.prepare_run import choose_users, stored_config
from soppu.server.store import RunFolder
from soppu.server.versions import CURRENT, ServingVersion

MODES = ("fp32", "bf16", "bf16-body")
COMPARISONS = {  # (reference, new), as the final evaluation's
    "served over base": ("base", "compressed"),
    "personal over global": ("global", "personal"),
    "compression": ("chosen", "compressed"),
}


@contextmanager
def fp32_head(model: nn.Module) -> Iterator[None]:
    """The output head computed in fp32 from fp32 inputs, whatever autocast is on."""
    head = model.get_output_embeddings()
    plain = head.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), head.weight.float(), head.bias)

    head.forward = forward
    try:
        yield
    finally:
        head.forward = plain


def score(model: nn.Module, lora, blocks, pad: int, size: int, mode: str):
    if mode == "bf16-body":
        with fp32_head(model):
            return scored(model, lora, blocks, pad, size, "bf16")
    return scored(model, lora, blocks, pad, size, mode)


def measure_user(run: RunFolder, base, config, text, user: str, seed: int) -> dict:
    pad, size = base.tokenizer.pad_token_id, config.training.batch_size
    cap = config.evaluation.final_eval_tokens or 2**62
    blocks = lm.token_blocks(base.tokenizer, text.test, config.training.seq_len, cap)
    serving = ServingVersion(run.serving / CURRENT)
    models = {
        "base": None,
        "global": run.global_adapter(),
        "personal": run.latest(user),
        "chosen": run.served_sources()[user].lora(),
        "compressed": read_lora(serving.user_dir(user)),
    }
    scores, seconds = {}, {}
    for mode in MODES:
        began = time.perf_counter()
        scores[mode] = {
            name: score(base.model, lora, blocks, pad, size, mode) for name, lora in models.items()
        }
        seconds[mode] = time.perf_counter() - began
    counts = scores["fp32"]["base"][1]
    gains = {
        label: {
            mode: paired_gain(scores[mode][ref][0], scores[mode][new][0], counts, seed=seed)
            for mode in MODES
        }
        for label, (ref, new) in COMPARISONS.items()
    }
    return {
        "user": user,
        "tokens": int(counts.sum()),
        "gains": {k: {m: g.as_dict() for m, g in v.items()} for k, v in gains.items()},
        "seconds": seconds,
    }


def markdown(result: dict) -> str:
    lines = [
        f"`{result['command']}` at {result['commit']} on {result['date']}",
        "",
        "| user | comparison | fp32 (95% interval) | bf16 | bf16 body, fp32 head |",
        "|---|---|---|---|---|",
    ]
    for row in result["users"]:
        for label, by_mode in row["gains"].items():
            lines.append(
                f"| {row['user']} | {label} | {interval(by_mode['fp32'])} "
                f"| {pct(by_mode['bf16']['point'])} | {pct(by_mode['bf16-body']['point'])} |"
            )
    total = {m: sum(r["seconds"][m] for r in result["users"]) for m in MODES}
    outside = result["outside_fp32_interval"]
    lines += [
        "",
        f"Scoring every model on held-out text: {total['fp32']:.0f} s in fp32, "
        f"{total['bf16']:.0f} s in bf16, {total['bf16-body']:.0f} s with an fp32 head. "
        f"Points outside fp32's own interval: bf16 {outside['bf16']}, "
        f"fp32 head {outside['bf16-body']} (of {outside['of']}).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="a finished federation run")
    parser.add_argument("--name", default="default", help="results file suffix")
    args = parser.parse_args()
    basemodel.set_threads(None)
    run = RunFolder(args.run)
    config = stored_config(run)
    base = basemodel.load(config.base_model or None, device="cpu")
    texts = choose_users(config)
    rows = []
    for seed, user in enumerate(sorted(u for u in run.users() if u in texts)):
        print(f"[{seed + 1}] {user}", flush=True)
        rows.append(measure_user(run, base, config, texts[user], user, seed))
    checks = [g for r in rows for g in r["gains"].values()]
    outside = {
        mode: sum(not g["fp32"]["low"] <= g[mode]["point"] <= g["fp32"]["high"] for g in checks)
        for mode in ("bf16", "bf16-body")
    }
    result = {
        **provenance(__file__),
        "run": str(args.run),
        "users": rows,
        "outside_fp32_interval": {**outside, "of": len(checks)},
    }
    write_results(RESULTS / f"judge_precision_{args.name}.json", result, markdown(result))


if __name__ == "__main__":
    main()
