"""Would the judge score faster with each adapter merged into the weights than through PEFT?

    python -m experiments.scoring_speed --run runs/experiments/main-default   # ≈ 4 minutes

For each user of a finished run, their personal adapter and the global one score the user's
validation and held-out text on the full model in fp32, once through PEFT's LoRA layers
(`attached`, what the judge does) and once merged into the weights (`merged` below: PEFT's
merge, the weights put back exactly afterwards), the paths alternating so that the machine's
drift falls on all alike; the bare model scores the same text for the ceiling. Each path's
time includes its set-up (attaching; cloning, merging, restoring), also reported apart.
Reports tokens per second of each, and the largest difference between the two adapter paths'
per-block losses (the same function up to float rounding). Writes
experiments/results/scoring_speed_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft.tuners.lora import LoraLayer

from experiments.lib import RESULTS, provenance, refuse_other_settings, write_results
from soppu import lm
from soppu.basemodel import set_threads
from soppu.personalize import attached
from soppu.server.prepare_run import choose_users, load_base, stored_config
from soppu.server.store import RunFolder


@contextmanager
def merged(model: torch.nn.Module, lora) -> Iterator[torch.nn.Module]:
    """`model` with `lora` folded into the weights it targets; afterwards the weights are put
    back exactly (unmerging alone subtracts in floating point and drifts)."""
    with attached(model, lora) as peft_model:
        layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
        kept = [layer.get_base_layer().weight.detach().clone() for layer in layers]
        peft_model.base_model.merge_adapter()
        try:
            yield peft_model
        finally:
            peft_model.base_model.unmerge_adapter()
            with torch.no_grad():
                for layer, weight in zip(layers, kept, strict=True):
                    layer.get_base_layer().weight.copy_(weight)


PATHS = {"bare": None, "attached": attached, "merged": merged}


def timed(model, lora, path, blocks, pad: int, batch: int) -> tuple[float, float, torch.Tensor]:
    """Seconds to score `blocks` through `path` in all, of them the set-up's (attaching or
    merging, and undoing it), and the sums."""
    start = time.perf_counter()
    if path is None:
        sums, _ = lm.block_nll(model, blocks, pad, batch)
        return time.perf_counter() - start, 0.0, sums
    with path(model, lora) as adapted:
        ready = time.perf_counter()
        sums, _ = lm.block_nll(adapted, blocks, pad, batch)
        scored = time.perf_counter()
    end = time.perf_counter()
    return end - start, (ready - start) + (end - scored), sums


def measure(source: str) -> dict:
    run = RunFolder(source)
    config = stored_config(run)
    base, users = load_base(config), choose_users(config)
    judge, pad = config.judge(), base.tokenizer.pad_token_id
    seconds, set_up, tokens = (
        dict.fromkeys(PATHS, 0.0),
        dict.fromkeys(PATHS, 0.0),
        dict.fromkeys(PATHS, 0),
    )
    scorings, largest = 0, 0.0
    shared = run.global_adapter()
    for user in [u for u in run.users() if u in users]:
        for text in (users[user].validation, users[user].test):
            blocks = lm.token_blocks(base.tokenizer, text, judge.seq_len, judge.max_eval_tokens)
            for lora in (run.latest(user), shared):
                sums = {}
                for name, path in PATHS.items():
                    spent, overhead, sums[name] = timed(
                        base.model, lora, path, blocks, pad, judge.batch_size
                    )
                    seconds[name] += spent
                    set_up[name] += overhead
                    tokens[name] += sum(b.numel() for b in blocks)
                scorings += 1
                relative = (sums["merged"] - sums["attached"]).abs() / sums["attached"].abs()
                largest = max(largest, float(relative.max()))
        print(f"{user}: {', '.join(f'{k} {tokens[k] / seconds[k]:.0f} tok/s' for k in PATHS)}")
    return {
        "rows": [
            {
                "path": name,
                "seconds": seconds[name],
                "set_up_seconds": set_up[name],
                "tokens": tokens[name],
            }
            for name in PATHS
        ],
        "scorings": scorings,
        "largest_relative_difference": largest,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--name", default="main")
    args = parser.parse_args()
    target = RESULTS / f"scoring_speed_{args.name}.json"
    refuse_other_settings(target, {"run": args.run})
    threads = set_threads(None)
    result = {
        **provenance(__file__),
        "settings": {"run": args.run},
        "threads": threads,
        "torch": torch.__version__,
        **measure(args.run),
    }
    write_results(target, result, markdown(result))


def markdown(result: dict) -> str:
    bare = next(r for r in result["rows"] if r["path"] == "bare")
    lines = [
        f"`{result['command']}` at {result['commit']} on {result['date']}: fp32 on "
        f"{result['threads']} threads ({result['torch']}); each user's personal and global "
        "adapter on their validation and held-out text, the paths alternating.",
        "",
        "| path | tokens | seconds | tokens / s | of the bare model's rate | set-up a scoring | "
        "tokens / s without it |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['path']} | {r['tokens']:,} | {r['seconds']:.1f} | "
            f"{r['tokens'] / r['seconds']:.0f} | "
            f"{(r['tokens'] / r['seconds']) / (bare['tokens'] / bare['seconds']):.0%} | "
            f"{r['set_up_seconds'] / result['scorings']:.2f} s | "
            f"{r['tokens'] / (r['seconds'] - r['set_up_seconds']):.0f} |"
            for r in result["rows"]
        ),
        "",
        "Largest relative difference of a block's loss, merged against attached: "
        f"{result['largest_relative_difference']:.1e}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
