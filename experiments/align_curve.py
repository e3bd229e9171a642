"""How the emulator's distance to the full model falls with alignment steps, per alignment
source and learning rate, on the text of every population's users (which no alignment reads).

    python -m experiments.align_curve --sources generated,pool --steps 240 --every 30 \
        --lrs 1e-3 --populations shakespeare,sympy,fortunes --kl-blocks 2

Each (source, lr) builds the default recipe's emulator (the federation's plan, batch, block
length and precision) and aligns it for `--steps`; every `--every` steps the alignment pauses
(its clock too) while the emulator's KL to the full model is measured on the source's own
held-out blocks and on the first `--kl-blocks` test blocks of each population's 8 largest
users. The generated text is made for the alignment's length, so every step reads a fresh
sample (`--sample-steps 60`: the federation's own 320 samples, read again for longer).

Writes experiments/results/align_curve_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from experiments.lib import RESULTS, provenance, write_results
from experiments.populations import held_out_blocks
from soppu import basemodel, lm, precision
from soppu.alignment import AlignConfig, align, build_aligned, measure
from soppu.generated import GenerationConfig, generated_text
from soppu.public import public_texts
from soppu.server.config import FederationConfig


def generation(args, resolved: str) -> GenerationConfig:
    """The federation's generated text, with one fresh sample per block an alignment of
    `--sample-steps` (0: `--steps`) reads beside the default's held-out, importance and
    correction blocks: `--sample-steps 60` is the federation's own 320 samples."""
    default = GenerationConfig()
    spare = default.samples - AlignConfig.steps * AlignConfig.batch_size
    steps = args.sample_steps or args.steps
    samples = spare + max(steps, AlignConfig.steps) * AlignConfig.batch_size
    return GenerationConfig(samples=samples, tokens=default.tokens, precision=resolved)


def curve(base, source: str, lr: float, args, held_out: dict[str, list]) -> dict:
    """Align one emulator for `args.steps`, measuring every `args.every` steps."""
    config = FederationConfig()
    resolved = precision.resolve(config.precision, "cpu")
    align_config = AlignConfig(
        steps=args.steps,
        lr=lr,
        batch_size=config.training.batch_size,
        seq_len=config.training.seq_len,
        precision=resolved,
    )
    started = time.perf_counter()
    public = (
        generated_text(base.model, base.tokenizer, generation(args, resolved))
        if source == "generated"
        else public_texts(source, base, None)
    )
    generation_seconds = time.perf_counter() - started
    tokenizer, pad = base.tokenizer, base.tokenizer.pad_token_id
    blocks = lm.token_blocks(tokenizer, "\n".join(public), align_config.seq_len)
    plan = config.plan(base.num_layers)  # its layers chosen on this text, as a federation's
    unaligned = replace(align_config, steps=0)
    emulator, info = build_aligned(base.model, tokenizer, base.name, plan, public, unaligned)
    texts = {"own": blocks[: align_config.eval_blocks], **held_out}
    points, paused = [], 0.0

    def checkpoint(step: int) -> None:
        nonlocal paused
        began = time.perf_counter()
        seconds = began - aligned_from - paused
        kls = {k: measure(base.model, emulator, info, v, pad, 4).kl for k, v in texts.items()}
        paused += time.perf_counter() - began
        points.append({"step": step, "seconds": round(seconds, 1), "kl": kls})
        print(
            f"{source} lr {lr:g} step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in kls.items())
        )

    aligned_from = time.perf_counter()
    checkpoint(0)

    def progress(step: int, steps: int, loss: float) -> None:
        if step and (step % args.every == 0 or step == steps):
            checkpoint(step)

    align(base.model, emulator, info, blocks, pad, align_config, progress)
    return {
        "source": source,
        "lr": lr,
        "public_blocks": len(blocks),
        "generation_seconds": round(generation_seconds, 1) if source == "generated" else None,
        "points": points,
    }


def markdown(result: dict) -> str:
    names = ["own", *result["populations"]]
    lines = [
        f"`{result['command']}` at {result['commit']} on {result['date']}",
        "",
        "The emulator's KL to the full model (mean per token) as alignment goes on, on the "
        "source's own held-out blocks and on each population's users' held-out text; seconds "
        "of alignment alone (the measurements paused the clock).",
        "",
        "| aligned on | its blocks | lr | steps | seconds | " + " | ".join(names) + " |",
        "|---|---|---|---|---|" + "---|" * len(names),
    ]
    for row in result["curves"]:
        for point in row["points"]:
            kls = " | ".join(f"{point['kl'][n]:.3f}" for n in names)
            lines.append(
                f"| {row['source']} | {row['public_blocks']} | {row['lr']:g} | {point['step']} "
                f"| {point['seconds']:.0f} "
                f"| {kls} |"
            )
    made = [r for r in result["curves"] if r["generation_seconds"] is not None]
    if made:
        lines += [
            "",
            f"Generating the samples took {made[0]['generation_seconds']:.0f} s (once, cached).",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="default")
    parser.add_argument("--sources", default="generated,pool")
    parser.add_argument("--lrs", default="1e-3", help="comma-separated alignment lrs")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--every", type=int, default=30)
    parser.add_argument(
        "--sample-steps",
        type=int,
        default=0,
        help="generate samples for an alignment of N steps (0: --steps); fewer are read again",
    )
    parser.add_argument("--populations", default="shakespeare,sympy,fortunes")
    parser.add_argument("--kl-blocks", type=int, default=2, help="held-out blocks per user")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    base = basemodel.load()
    populations = args.populations.split(",")
    held_out = {p: held_out_blocks(base.tokenizer, p, args.kl_blocks) for p in populations}
    curves = [
        curve(base, source, float(lr), args, held_out)
        for source in args.sources.split(",")
        for lr in args.lrs.split(",")
    ]
    result = {**provenance(__file__), "populations": populations, "curves": curves}
    write_results(RESULTS / f"align_curve_{args.name}.json", result, markdown(result))


if __name__ == "__main__":
    main()
