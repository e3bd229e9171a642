"""Does a short personalisation on the emulator help the user on the full model?

    python experiments/personalize_quality.py            # the README's numbers (≈ 20 minutes)
    python experiments/personalize_quality.py --quick    # 2 users, 5 steps

On the embedded default (SmolLM2-135M-Instruct, Shakespeare roles): build the emulator at
drop 0.5 and align it on public text (once; reused from --emulator if given), then for each of
N users drawn with a fixed seed from those with at least --min-chars of text, train their LoRA
on the emulator (`soppu personalize`'s code path) and measure held-out perplexity of the base
model, the emulator alone, the adapter on the emulator and the adapter plugged into the full
model. Writes experiments/results/personalize_quality.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def emulator_for(base, args):
    from soppu.alignment import AlignConfig, build_aligned
    from soppu.data import public_text
    from soppu.emulator import EmulatorPlan, load, save

    if args.emulator and (Path(args.emulator) / "soppu_emulator.json").is_file():
        return load(Path(args.emulator))
    config = AlignConfig(steps=args.align_steps, lr=args.align_lr)
    began = time.perf_counter()
    emulator, info = build_aligned(
        base.model, base.tokenizer, base.name, EmulatorPlan(base.num_layers, drop=args.drop),
        public_text(), config,
        lambda step, total, loss: print(f"  align {step}/{total}: loss {loss:.3f}", flush=True),
    )
    info.alignment["seconds"] = time.perf_counter() - began
    if args.emulator:
        save(emulator, info, Path(args.emulator))
    return emulator, info


def main() -> None:
    from soppu import basemodel
    from soppu.data import load_users
    from soppu.personalize import TrainConfig, personalize

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--drop", type=float, default=0.5)
    parser.add_argument("--align-steps", type=int, default=60)
    parser.add_argument("--align-lr", type=float, default=1e-3)
    parser.add_argument("--min-chars", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--emulator", help="reuse (or save) the aligned emulator here")
    args = parser.parse_args()
    if args.quick:
        args.users, args.steps, args.align_steps = 2, 5, 2
    torch.set_num_threads(args.threads)

    base = basemodel.load()
    emulator, info = emulator_for(base, args)
    users = load_users()
    eligible = sorted(u for u, text in users.items() if text.chars >= args.min_chars)
    picked = random.Random(args.seed).sample(eligible, args.users)
    config = TrainConfig(steps=args.steps, lr=args.lr)
    rows = []
    for user in picked:
        result = personalize(users[user], emulator, info, base.tokenizer, config,
                             full_model=base.model)
        rows.append({"user": user, "chars": users[user].chars, **result.summary()})
        ppl = result.perplexity
        print(f"{user}: base {ppl['base']:.1f}, emulator {ppl['emulator_start']:.1f}, "
              f"emulator+adapter {ppl['emulator_adapter']:.1f}, full+adapter "
              f"{ppl['full_adapter']:.1f} ({result.seconds:.0f} s)", flush=True)
    write(rows, info, args)


def write(rows: list[dict], info, args) -> None:
    RESULTS.mkdir(exist_ok=True)
    better = sum(r["perplexity"]["full_adapter"] < r["perplexity"]["base"] for r in rows)
    meta = {"machine": platform.platform(), "args": vars(args), "emulator": info.version,
            "alignment": info.alignment, "improved": better, "users": len(rows)}
    (RESULTS / "personalize_quality.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "| user | text (chars) | base | emulator | emulator + adapter | full + adapter | change |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["perplexity"]
        lines.append(
            f"| {r['user']} | {r['chars']:,} | {p['base']:.1f} | {p['emulator_start']:.1f} | "
            f"{p['emulator_adapter']:.1f} | **{p['full_adapter']:.1f}** | "
            f"{p['full_adapter'] / p['base'] - 1:+.1%} |"
        )
    lines.append("")
    lines.append(f"Full model + adapter beats the base model for **{better} of {len(rows)}** users "
                 f"({args.steps} steps, emulator drop {args.drop}, {info.version}).")
    (RESULTS / "personalize_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
