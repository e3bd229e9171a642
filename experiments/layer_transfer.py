"""Which layers' part of an emulator-trained adapter carries to the full model? A probe on
finished runs, no training.

    python -m experiments.layer_transfer --runs RUN[,RUN...] --users 6 --blocks 8 --name NAME

An adapter trained on the emulator lowers the emulator's loss on a user's text by 35–40% out
of the alignment text's domain and the full model's by 9–22% (`proxy_probe`): what it learns
is partly the emulator's repair, and its weights pass into the full model layer by layer. The
emulator's kept middle layers are aligned (their weights differ from the full model's, and
dropped layers precede most of them); its top layers are the full model's exactly. If the
repair sits in some layers, scaling those layers' part of the adapter down should serve the
full model better, and a recipe or a per-layer strength could use it.

Per user (their personal adapter, on the first `--blocks` blocks of their held-out text): the
full model's perplexity with the adapter as trained, and with one group's part scaled by each
of `--scales` (the others as trained); the groups are the exact top layers and the aligned
middle layers in `--groups` contiguous runs. Reported: the median over users of each variant's
gain over the adapter as trained, and how many users it makes significantly better / worse
(paired 95% bootstrap over blocks).

Writes experiments/results/layer_transfer_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from experiments.lib import RESULTS, provenance, write_results
from soppu import basemodel, lm
from soppu.adapters import LoraState
from soppu.emulator import read_info
from soppu.intervals import paired_gain
from soppu.personalize import scored
from soppu.server.prepare_run import choose_users, stored_config
from soppu.server.store import RunFolder


def layer_groups(top: list[int], trained: list[int], parts: int) -> dict[str, list[int]]:
    """The exact top layers, then the other trained layers in `parts` contiguous runs."""
    middle = [layer for layer in sorted(trained) if layer not in top]
    size = -(-len(middle) // parts)
    groups = {
        f"layers {chunk[0]}–{chunk[-1]}": chunk
        for chunk in (middle[i : i + size] for i in range(0, len(middle), size))
    }
    return groups | {f"top {top[0]}–{top[-1]} (exact)": sorted(top)}


def scaled_layers(lora: LoraState, layers: list[int], scale: float, path: str) -> LoraState:
    """`lora` with ΔW of the given full-model layers (under `path`, the decoder's layer list)
    scaled, the rest as trained."""
    return lora.scaled(scale, [f"{path}.{layer}." for layer in layers])


def probe_run(path: Path, users: int, blocks: int, parts: int, scales: list[float]) -> dict:
    run = RunFolder(path)
    config = stored_config(run)
    base = basemodel.load(config.base_model or None)
    pad = base.tokenizer.pad_token_id
    info = read_info(run.emulator)
    texts = choose_users(config)
    per_user: dict[str, dict] = {}
    groups: dict[str, list[int]] = {}
    for user in run.users()[:users]:
        lora = run.latest(user)
        groups = layer_groups(info.adapter_layers, lora.config["layers_to_transform"], parts)
        held_out = lm.token_blocks(base.tokenizer, texts[user].test, config.training.seq_len)
        held_out = held_out[:blocks]
        bare, counts = scored(base.model, None, held_out, pad, 4)
        trained, _ = scored(base.model, lora, held_out, pad, 4)
        row = {"as trained": paired_gain(bare, trained, counts).point}
        for name, layers in groups.items():
            for scale in scales:
                variant = scaled_layers(lora, layers, scale, info.layers_path)
                nll, _ = scored(base.model, variant, held_out, pad, 4)
                gain = paired_gain(trained, nll, counts)
                row[f"{name} ×{scale:g}"] = {
                    "point": gain.point,
                    "low": gain.low,
                    "high": gain.high,
                }
        per_user[user] = row
        print(
            f"{path.name} {user}: as trained {row['as trained']:+.1%} over base; "
            + ", ".join(f"{k} {v['point']:+.1%}" for k, v in row.items() if k != "as trained"),
            flush=True,
        )
    variants = [k for k in next(iter(per_user.values())) if k != "as trained"]
    summary = {}
    for variant in variants:
        gains = [u[variant] for u in per_user.values()]
        summary[variant] = {
            "median": statistics.median(g["point"] for g in gains),
            "better": sum(g["low"] > 0 for g in gains),
            "worse": sum(g["high"] < 0 for g in gains),
        }
    return {
        "run": path.name,
        "groups": groups,
        "as_trained_median": statistics.median(u["as trained"] for u in per_user.values()),
        "summary": summary,
        "per_user": per_user,
    }


def markdown(result: dict) -> str:
    lines = [
        f"`{result['command']}` at {result['commit']} on {result['date']}.",
        "",
        f"Each user's personal adapter on the full model, one layer group's part scaled, the "
        f"others as trained: the median over {result['users']} users of the gain in held-out "
        f"perplexity over the adapter as trained (the first {result['blocks']} blocks of 128 "
        "tokens), and users significantly better / worse (paired 95% bootstrap over blocks).",
        "",
    ]
    for row in result["rows"]:
        lines += [
            f"**{row['run']}** (as trained: median {row['as_trained_median']:+.1%} over the "
            "base model)",
            "",
            "| layer group, scale | median over the adapter as trained | better / worse |",
            "|---|---|---|",
        ]
        for variant, s in row["summary"].items():
            lines.append(f"| {variant} | {s['median']:+.1%} | {s['better']} / {s['worse']} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="finished emulator-mode runs")
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--groups", type=int, default=3, help="runs of the middle layers")
    parser.add_argument("--scales", default="0,0.5,1.5")
    parser.add_argument("--name", default="default")
    args = parser.parse_args()
    torch.set_num_threads(2)
    basemodel.quiet_libraries()
    scales = [float(s) for s in args.scales.split(",")]
    rows = [
        probe_run(Path(run), args.users, args.blocks, args.groups, scales)
        for run in args.runs.split(",")
    ]
    result = {
        **provenance("layer_transfer"),
        "users": args.users,
        "blocks": args.blocks,
        "rows": rows,
    }
    write_results(RESULTS / f"layer_transfer_{args.name}.json", result, markdown(result))


if __name__ == "__main__":
    main()
