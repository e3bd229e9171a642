"""Client training step on the emulator vs the full model: time and peak memory.

    python experiments/bench_emulator.py            # the README's numbers (≈ 6 minutes)
    python experiments/bench_emulator.py --quick    # one drop ratio, fewer repeats

Every measurement is one LoRA step (forward, backward, AdamW) of the same LoRA (r=8 on the
attention q/v of the last two layers) on the same batch (4×128 tokens of public Shakespeare
text) with the same torch thread count, in a fresh child process that loads only the model a
client would hold (the saved emulator, or the full model); peak RSS (Linux VmHWM) is reset
after the batch is made, so it counts the model, the LoRA step and the interpreter.
Emulator and full model alternate, so machine noise hits both alike. Drop ratio 0.95 keeps
one middle layer: its time is the floor set by what the emulator cannot drop (embeddings,
the 49k-token head, the adapter layers and their backward pass).

Writes experiments/results/emulator_bench.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

CHILD = """
import gc, json, sys, torch
torch.set_num_threads(int(sys.argv[2]))
from peft import get_peft_model, get_peft_model_state_dict
from soppu import basemodel, lm
from soppu.data import public_text
from soppu.emulator import load, read_info
from soppu.personalize import LoraState, TrainConfig, new_lora_config, time_training_step
which, repeats, folder = sys.argv[1], int(sys.argv[3]), sys.argv[4]
tokenizer = basemodel.load_tokenizer()
blocks = lm.token_blocks(tokenizer, "\\n".join(public_text()), 128)
batch = lm.collate(blocks[100:104], tokenizer.pad_token_id)
del blocks
gc.collect()
with open("/proc/self/clear_refs", "w") as refs:  # reset the peak: count the model, not the data
    refs.write("5")
if which == "full":  # a client holding the full model never loads the emulator
    info, model = read_info(folder), basemodel.load().model
    layers = info.adapter_layers
else:
    model, info = load(folder)
    layers = info.emulator_adapter_layers
config = new_lora_config(info, model.config.model_type, TrainConfig())
torch.manual_seed(0)
peft_model = get_peft_model(model, LoraState({}, config).peft_config(layers))
lora = LoraState(get_peft_model_state_dict(peft_model, save_embedding_layers=False), config)
peft_model.unload()
seconds = time_training_step(model, lora, layers, batch, repeats=repeats)
status = open("/proc/self/status").read()
peak = int(status.split("VmHWM:")[1].split()[0]) / 1024
print(json.dumps({"seconds": seconds, "peak_rss_mib": peak}))
"""


def build_emulators(drops: list[float], folder: Path) -> dict[float, dict]:
    from soppu import basemodel
    from soppu.emulator import EmulatorPlan, build, save

    base = basemodel.load()
    built = {}
    for drop in drops:
        emulator, info = build(base.model, EmulatorPlan(base.num_layers, drop=drop), base.name)
        save(emulator, info, folder / f"drop-{drop}")
        built[drop] = {"layers": len(info.full_layers), "params": info.params_emulator,
                       "params_full": info.params_full}
    return built


def child(which: str, threads: int, repeats: int, emulator: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, which, str(threads), str(repeats), str(emulator)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    drops = [0.5] if args.quick else [0.25, 0.5, 0.75, 0.95]
    repeats = 2 if args.quick else 5
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        built = build_emulators(drops, Path(tmp))
        for threads in args.threads:
            for drop in drops:
                folder = Path(tmp) / f"drop-{drop}"
                emu = child("emulator", threads, repeats, folder)
                full = child("full", threads, repeats, folder)
                row = {"drop": drop, "threads": threads, **built[drop],
                       "emulator_s": emu["seconds"], "full_s": full["seconds"],
                       "speedup": full["seconds"] / emu["seconds"],
                       "emulator_rss_mib": emu["peak_rss_mib"],
                       "full_rss_mib": full["peak_rss_mib"]}
                rows.append(row)
                print(f"drop {drop:.2f}, {threads} thread(s): emulator {emu['seconds']:.2f} s "
                      f"/ full {full['seconds']:.2f} s = {row['speedup']:.2f}×; peak RSS "
                      f"{emu['peak_rss_mib']:.0f} vs {full['peak_rss_mib']:.0f} MiB", flush=True)
    write(rows, args)


def write(rows: list[dict], args) -> None:
    RESULTS.mkdir(exist_ok=True)
    meta = {"machine": platform.platform(), "cpus": __import__("os").cpu_count(),
            "quick": args.quick, "batch": "4×128 tokens", "lora": "r=8 q/v, last 2 layers"}
    (RESULTS / "emulator_bench.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                            indent=2) + "\n")
    lines = [
        "| drop | threads | emulator layers | emulator params | step: emulator | step: full "
        "| speed-up | peak RSS: emulator | peak RSS: full |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['drop']:.2f} | {r['threads']} | {r['layers']} of 30 | "
            f"{r['params'] / 1e6:.1f} M of {r['params_full'] / 1e6:.1f} M | "
            f"{r['emulator_s']:.2f} s | {r['full_s']:.2f} s | **{r['speedup']:.2f}×** | "
            f"{r['emulator_rss_mib']:.0f} MiB | {r['full_rss_mib']:.0f} MiB |"
        )
    (RESULTS / "emulator_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
