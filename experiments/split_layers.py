"""Which LoRA, on which top layers, carries full mode's gain when it is trained exactly.

    python -m experiments.split_layers --population code --users 4     # ≈ 20 minutes

One user at a time (no federation), 30 steps at lr 1e-3 of `soppu personalize`'s recipe on the
full model, the gain on the user's held-out text: the LoRA on q/v of every layer (full mode's),
on the top 8 layers' q/v, on all projections of the top 8 and of the top 4 (what a split client
trains exactly), beside the default emulator of a finished run (`--emulator-run`, with the
gradient correction on generated text). Writes experiments/results/split_layers_<population>.json
and .md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from experiments.lib import RESULTS, pct, provenance, write_results

ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QV = ("q_proj", "v_proj")
LAYOUTS = [  # name, mode, top, lora layers, targets
    ("full model, q/v of every layer", "full", 2, "all", QV),
    ("top 8, q/v", "full", 8, "adapter", QV),
    ("top 8, all projections (split)", "full", 8, "adapter", ALL7),
    ("top 4, all projections", "full", 4, "adapter", ALL7),
    ("default emulator, corrected", "emulator", 2, "all", QV),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--population", default="code")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument(
        "--emulator-run", default="runs/experiments/pop-base-code-emulator-generated"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)

    from experiments.populations import prepare
    from soppu import basemodel, lm
    from soppu.alignment import gradient_correction
    from soppu.data import load_users
    from soppu.emulator import full_model_info, load
    from soppu.personalize import TrainConfig, fresh_lora, personalize
    from soppu.public import public_texts

    base = basemodel.load()
    tokenizer, pad = base.tokenizer, base.tokenizer.pad_token_id
    users = load_users(None if args.population == "shakespeare" else prepare(args.population))
    if args.population == "shakespeare":  # the roles with enough text, as the sweeps take them
        users = {u: t for u, t in users.items() if t.chars >= 10_000}
    picked = list(users)[: args.users]
    rows = []
    for name, mode, top, layers, targets in LAYOUTS:
        config = TrainConfig(lora_layers=layers, target_modules=targets, max_eval_tokens=2048)
        correction, began = None, time.time()
        if mode == "full":
            model, info = base.model, full_model_info(base.model, base.name, top=top)
        else:
            model, info = load(f"{args.emulator_run}/emulator")
            texts = public_texts("generated", base, "own data")
            public = lm.token_blocks(tokenizer, "\n".join(texts), 128)
        gains = []
        for user in picked:
            if mode == "emulator":
                start = fresh_lora(model, info, config)
                correction = gradient_correction(base.model, model, info, start, public, pad)
            result = personalize(
                users[user], model, info, tokenizer, config, full_model=base.model,
                correction=correction,
            )  # fmt: skip
            gains.append(1 - result.perplexity["full_adapter"] / result.perplexity["base"])
        rows.append(
            {"layout": name, "gains": dict(zip(picked, gains, strict=True)),
             "median": statistics.median(gains), "seconds": time.time() - began}
        )  # fmt: skip
        print(rows[-1], flush=True)
    result = {**provenance("split_layers.py"), "population": args.population, "rows": rows}
    lines = [
        f"`{result['command']}` at {result['commit']} on {result['date']}",
        "",
        "| LoRA | median gain over the base model | per user |",
        "|---|---|---|",
    ]
    for r in rows:
        per_user = ", ".join(pct(g) for g in r["gains"].values())
        lines.append(f"| {r['layout']} | **{pct(r['median'])}** | {per_user} |")
    write_results(RESULTS / f"split_layers_{args.population}.json", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
