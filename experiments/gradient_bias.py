"""Why the gradient correction: the LoRA's gradient on the emulator against the full model's.

    python -m experiments.gradient_bias            # the benchmarks' numbers (≈ 10 minutes)
    python -m experiments.gradient_bias --quick    # 2 users, 2 batches

For each emulator (the sweep's, `experiments/sweep_recipes.py` builds and keeps them in
runs/experiments/sweep-emulators), at the fresh LoRA on every kept layer (q/v, r=8): the
cosine between the full model's and the emulator's LoRA gradient, on public text and on each
user's own training text; then, on the user's text, the cosine between the full model's
gradient and the *corrected* emulator gradient g_emu(user) + (g_full − g_emu)(public), the
correction measured on other (public) batches, as the server sends it. A cosine near 1 means
the client's step is the full model's. Writes experiments/results/gradient_bias.json and .md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import torch

from experiments.lib import RESULTS, provenance
from soppu import atomic

EMULATORS = Path("runs/experiments/sweep-emulators")


def flat(grads: dict) -> torch.Tensor:
    return torch.cat([grads[k].flatten() for k in sorted(grads)])


def cosine(a: dict, b: dict) -> float:
    return float(torch.nn.functional.cosine_similarity(flat(a), flat(b), dim=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args()
    if args.quick:
        args.users, args.batches = 2, 2
    torch.set_num_threads(2)

    from soppu import basemodel, lm
    from soppu.alignment import _lora_gradient
    from soppu.data import load_users, public_text
    from soppu.emulator import load, to_full_keys
    from soppu.personalize import TrainConfig, fresh_lora

    basemodel.quiet_libraries()
    base = basemodel.load()
    pad = base.tokenizer.pad_token_id
    public = lm.token_blocks(base.tokenizer, "\n".join(public_text()), 128)
    users = load_users()
    eligible = sorted(u for u, t in users.items() if t.chars >= 10_000)
    picked = random.Random(0).sample(eligible, args.users)
    rows = []
    for folder in sorted(EMULATORS.glob("drop*")):
        emulator, info = load(folder)
        lora = fresh_lora(emulator, info, TrainConfig())

        def gradients(blocks, seed, lora=lora, emulator=emulator, info=info):
            batches = list(lm.training_batches(blocks, 4, args.batches, pad, seed))
            g_full = _lora_gradient(base.model, lora, batches)
            g_emu = to_full_keys(
                _lora_gradient(emulator, info.lora_on_emulator(lora), batches), info
            )
            return g_full, g_emu

        pub_full, pub_emu = gradients(public, 1)
        correction = {k: pub_full[k] - pub_emu[k] for k in pub_full}
        per_user = []
        for user in picked:
            blocks = lm.token_blocks(base.tokenizer, users[user].train, 128)
            g_full, g_emu = gradients(blocks, 2)
            corrected = {k: g_emu[k] + correction[k] for k in g_emu}
            per_user.append((cosine(g_full, g_emu), cosine(g_full, corrected)))
        row = {
            "emulator": folder.name,
            "layers": info.full_layers,
            "kl_after_alignment": info.alignment["after"]["kl"],
            "public_cosine": cosine(pub_full, pub_emu),
            "user_cosine": statistics.median(c for c, _ in per_user),
            "user_cosine_corrected": statistics.median(c for _, c in per_user),
            "per_user": dict(zip(picked, per_user, strict=True)),
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "per_user"}), flush=True)
    write(rows, args)


def write(rows: list[dict], args) -> None:
    RESULTS.mkdir(exist_ok=True)
    name = "gradient_bias_quick" if args.quick else "gradient_bias"
    summary = json.dumps(
        {**provenance("gradient_bias"), "rows": rows, "args": vars(args)}, indent=2, default=str
    )
    atomic.write_text(RESULTS / f"{name}.json", summary)
    lines = [
        "| emulator | KL after alignment | cos(g_full, g_emu) on public text | on a user's text "
        "| corrected, on a user's text |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['emulator']} | {r['kl_after_alignment']:.3f} | {r['public_cosine']:.3f} | "
            f"{r['user_cosine']:.3f} | **{r['user_cosine_corrected']:.3f}** |"
        )
    lines += ["", f"Median over {args.users} users; {args.batches} batches of 4×128 tokens each."]
    atomic.write_text(RESULTS / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
