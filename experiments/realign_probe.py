"""Would FedBiOT's re-alignment between rounds help out of domain? A probe on finished runs.

    python -m experiments.realign_probe --runs RUN[,RUN...] --steps 20,60 --users 4

FedBiOT re-aligns the emulator every round with the current adapter plugged into both models
(`soppu.alignment.realign`). What a client gains from that is a gradient nearer the full
model's on its own text. This measures exactly that, at each run's final global adapter (the
start of a next round) and with the run's own public text: per user, on their training text,
the cosine between the full model's LoRA gradient and the emulator's, bare and corrected as
the server corrects it (g_emu + (g_full − g_emu) on public batches), and the emulator's KL to
the full model with the adapter in both; before re-alignment, then after each cumulative
number of `--steps`. A cosine that rises is a client step nearer the full model's; one that
does not says re-alignment would not carry more of full mode's gain to the users.

Writes experiments/results/realign_probe_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from experiments.gradient_bias import cosine
from experiments.lib import RESULTS, provenance, write_results
from soppu import basemodel, lm
from soppu.alignment import AlignConfig, _lora_gradient, gradient_correction, measure, realign
from soppu.emulator import load, to_full_keys
from soppu.personalize import attached
from soppu.server.prepare_run import choose_users, public_for, stored_config
from soppu.server.store import RunFolder


def probe(full, emulator, info, lora, public, users: dict, pad: int, batches: int, mixed: str):
    """Median cosines and KL over `users` (name → token blocks) at `lora`, in `mixed` precision
    (the run's, as its clients and corrections used)."""
    correction = gradient_correction(
        full, emulator, info, lora, public, pad, batches=batches, precision=mixed
    )
    rows = []
    for blocks in users.values():
        chosen = list(lm.training_batches(blocks, 4, batches, pad, seed=7))
        g_full = _lora_gradient(full, lora, chosen, mixed)
        on_emulator = _lora_gradient(emulator, info.lora_on_emulator(lora), chosen, mixed)
        g_emu = to_full_keys(on_emulator, info)
        corrected = {k: g_emu[k] + correction[k] for k in g_emu}
        with attached(full, lora), attached(emulator, info.lora_on_emulator(lora)):
            kl = measure(full, emulator, info, blocks[:16], pad, 4).kl
        rows.append((cosine(g_full, g_emu), cosine(g_full, corrected), kl))
    return {
        "cosine": statistics.median(r[0] for r in rows),
        "cosine_corrected": statistics.median(r[1] for r in rows),
        "kl_with_adapter": statistics.median(r[2] for r in rows),
        "per_user": dict(zip(users, rows, strict=True)),
    }


def probe_run(path: Path, steps: list[int], n_users: int, batches: int) -> list[dict]:
    run = RunFolder(path)
    config = stored_config(run)
    base = basemodel.load(config.base_model or None)
    pad = base.tokenizer.pad_token_id
    emulator, info = load(run.emulator)
    lora = run.global_adapter()
    texts = public_for(config, print, base)  # the run's own, as its server made it
    public = lm.token_blocks(base.tokenizer, "\n".join(texts), config.training.seq_len)
    texts_of = choose_users(config)
    users = {
        u: lm.token_blocks(base.tokenizer, texts_of[u].train, config.training.seq_len)
        for u in run.users()[:n_users]
    }
    rows, done, seconds = [], 0, 0.0
    for target in [0, *steps]:
        if target > done:
            began = time.perf_counter()
            align = AlignConfig(steps=target - done, seed=done, precision=config.precision)
            realign(base.model, emulator, info, lora, public, pad, align)
            seconds += time.perf_counter() - began
            done = target
        row = probe(base.model, emulator, info, lora, public, users, pad, batches, config.precision)
        rows.append({"run": path.name, "realign_steps": done, "seconds": seconds, **row})
        print(
            f"{path.name}: {done} steps, cos {row['cosine']:.3f}, corrected "
            f"{row['cosine_corrected']:.3f}, KL {row['kl_with_adapter']:.3f}",
            flush=True,
        )
    return rows


def markdown(result: dict) -> str:
    lines = [
        f"`{result['command']}` at {result['commit']} on {result['date']}.",
        "",
        "| run | re-alignment steps (adapter in both) | seconds | cos(g_full, g_emu) on users' "
        "text | corrected | emulator's KL to the full model, adapter in both |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['run']} | {r['realign_steps']} | {r['seconds']:.0f} | {r['cosine']:.3f} "
            f"| **{r['cosine_corrected']:.3f}** | {r['kl_with_adapter']:.3f} |"
        )
    lines += [
        "",
        f"Median over {result['users']} users per run, at each run's final global adapter; "
        f"{result['batches']} batches of 4 blocks each for every gradient.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", required=True, help="finished emulator-mode runs, comma-separated"
    )
    parser.add_argument("--steps", default="20,60", help="cumulative re-alignment steps")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--name", default="default")
    args = parser.parse_args()
    torch.set_num_threads(2)
    basemodel.quiet_libraries()
    steps = sorted(int(x) for x in args.steps.split(","))
    rows = [
        row
        for path in args.runs.split(",")
        for row in probe_run(Path(path), steps, args.users, args.batches)
    ]
    result = {
        **provenance("realign_probe"),
        "users": args.users,
        "batches": args.batches,
        "rows": rows,
    }
    write_results(RESULTS / f"realign_probe_{args.name}.json", result, markdown(result))


if __name__ == "__main__":
    main()
