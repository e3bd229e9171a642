"""What a client pays in each client mode: one training step's seconds, peak memory, weights held.

    python -m experiments.split_cost            # ≈ 2 minutes
    python -m experiments.split_cost --name exact-top \
        --emulator runs/experiments/pop-top8all-code-emulator-generated/emulator \
        --before runs/experiments/main-now/emulator

Side by side, each in a fresh process on 1 thread (peak RSS is the process's own), on the
same batch of 4 × 128 public tokens at the run's default precision, each mode's LoRA as its
recipe (`MODE_RECIPES`) has it: the emulator in `--emulator`, split mode's client (the top 8
layers, LoRA on all their projections, its features for the batch read from a file: in a
deployment the model owner's side computes them), and the full model (LoRA on q/v of every
layer); with `--before`, also the emulator recipe before 2026-12-07 on that emulator (2 exact
top layers under 14 stand-ins, LoRA on q/v of all 16). A split client's one-off cost per block
is its features: 128 × hidden numbers. Writes experiments/results/split_cost[_NAME].json and
.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from experiments.lib import RESULTS, provenance, refuse_other_settings, write_results

CHILD = """
import json, sys, torch
from dataclasses import replace
torch.set_num_threads(1)
from safetensors.torch import load_file
from soppu import basemodel, features, lm
from soppu.emulator import full_model_info, load
from soppu.personalize import fresh_lora, time_training_step
from soppu.server.config import FederationConfig
mode, folder, batch_file, precision, targets, layers = sys.argv[1:7]
saved = load_file(batch_file)
batch = lm.Batch(saved["ids"], saved["mask"])
with open("/proc/self/clear_refs", "w") as refs:  # count the model, not the start-up
    refs.write("5")
if mode == "full":
    base = basemodel.load()
    model, info = base.model, full_model_info(base.model, base.name)
else:
    model, info = load(folder)
if mode == "split":
    class FromFile:  # the answers the model owner's side would send
        def hidden_states(self, blocks):
            rows = {saved["ids"][i, : len(b)].numpy().tobytes(): i for i, b in enumerate(blocks)}
            return [saved["features"][rows[b.numpy().tobytes()], : len(b)] for b in blocks]
    features.attach(model, info, FromFile())
config = FederationConfig(client_mode=mode).train()
if targets:  # a recipe other than the mode's: the emulator's before 2026-12-07
    config = replace(config, target_modules=tuple(targets.split(",")), lora_layers=layers)
lora = info.lora_on_emulator(fresh_lora(model, info, config))
seconds = time_training_step(model, lora, batch, repeats=5, precision=precision)
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
weights = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
lora_weights = sum(t.numel() for t in lora.tensors.values())
print(json.dumps({"mode": mode, "step_s": seconds, "peak_rss_mib": peak,
                  "weights": weights, "lora_weights": lora_weights}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--emulator", type=Path, default=Path("runs/experiments/main-now/emulator"))
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--before", type=Path, help="An emulator of the recipe before 2026-12-07.")
    parser.add_argument("--name", default="", help="Results under split_cost_NAME.")
    args = parser.parse_args()
    target = RESULTS / (f"split_cost_{args.name}.json" if args.name else "split_cost.json")
    settings = {
        "emulator": str(args.emulator),
        "before": str(args.before or ""),
        "precision": args.precision,
    }
    refuse_other_settings(target, settings)

    import torch
    from safetensors.torch import save_file

    from soppu import basemodel, lm
    from soppu import emulator as E
    from soppu.data import public_text
    from soppu.features import ModelFeatures
    from soppu.precision import resolve
    from soppu.server.config import FederationConfig

    precision = resolve(args.precision, "cpu")
    base = basemodel.load()
    blocks = lm.token_blocks(base.tokenizer, "\n".join(public_text()[:3000]), 128)[100:104]
    batch = lm.collate(blocks, base.tokenizer.pad_token_id)
    plan = FederationConfig(client_mode="split").plan(base.num_layers)
    split, info = E.build(base.model, plan, base.name)
    pad = base.tokenizer.pad_token_id
    states = ModelFeatures(base.model, pad, info.features_layer).hidden_states(blocks)
    with tempfile.TemporaryDirectory() as tmp:
        E.save(split, info, Path(tmp) / "split")
        del split
        batch_file = Path(tmp) / "batch.safetensors"
        save_file(
            {"ids": batch.ids, "mask": batch.mask, "features": torch.stack(states)}, batch_file
        )
        rows = [child("emulator", args.emulator, batch_file, precision)]
        if args.before:  # its architecture's q and v on every layer it holds
            qv = ",".join(basemodel.default_target_modules(base.model.config.model_type))
            rows.append(child("emulator", args.before, batch_file, precision, qv, "all"))
        rows += [
            child("split", Path(tmp) / "split", batch_file, precision),
            child("full", Path("."), batch_file, precision),
        ]
    hidden = base.model.config.hidden_size
    result = {
        **provenance("split_cost.py"),
        "settings": settings,
        "precision": precision,
        "feature_bytes_per_block": 128 * hidden * 4,
        "rows": rows,
    }
    write_results(target, result, markdown(result))


def child(
    mode: str, folder: Path, batch_file: Path, precision: str, targets: str = "", layers: str = ""
) -> dict:
    """One mode's row, in a fresh process; `targets` and `layers`: a LoRA other than the
    mode's recipe."""
    args = [mode, str(folder), str(batch_file), precision, targets, layers]
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *args],
        capture_output=True,
        text=True,
        check=True,
    )
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["recipe"] = f"{targets} on {layers} layers" if targets else "the mode's"
    print(json.dumps(row), flush=True)
    return row


def markdown(result: dict) -> str:
    lines = [
        f"`{result['command']}` at {result['commit']} on {result['date']} "
        f"({result['precision']}, 1 thread, 4 × 128 tokens)",
        "",
        "| client mode | LoRA | weights held | LoRA weights | step | peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['mode']} | {r.get('recipe', '')} | {r['weights'] / 1e6:.1f} M "
            f"| {r['lora_weights'] / 1e3:.0f} K "
            f"| {r['step_s']:.2f} s | {r['peak_rss_mib']:.0f} MiB |"
        )
    kib = result["feature_bytes_per_block"] / 1024
    lines += ["", f"A split client's features: {kib:.0f} KiB a block of 128 tokens in float32."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
