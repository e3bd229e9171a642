"""Would the gradient correction help out of domain if measured on text the adapted full model
writes? A probe on finished runs.

    python -m experiments.steered_probe --runs RUN[,RUN...] --users 4

The correction (g_full − g_emu on public batches, added to every client step) is measured on
text unlike the users' when they write outside the alignment text's domain, and there it can
hurt (issue 22: sympy's docstrings gain without it, the fortune files lose). The server holds
no user's text, but after a round it holds the global adapter, which has learned what the
users write together. Text the full model writes *with that adapter attached* is nearer the
users' text, and no user's text is read to make it. This measures what a client would gain,
at each run's final global adapter (the start of a next round), per user on their training
text: the cosine between the full model's LoRA gradient and the emulator's, bare and
corrected on (a) the run's public text, (b) `--samples` texts the adapted full model writes
(as `soppu.generated` does, from one random ordinary token each), and (c) other batches of the
user's own text, the bound no server can reach. `--betas` adds the public text's correction
at other strengths β (g_emu + β·correction): a shrunk correction where its text is unlike the
users'.

Writes experiments/results/steered_probe_<name>.json and .md.
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
from soppu.alignment import _lora_gradient, gradient_correction
from soppu.emulator import load, to_full_keys
from soppu.generated import GenerationConfig, sample
from soppu.personalize import attached
from soppu.server.prepare_run import choose_users, public_for, stored_config
from soppu.server.store import RunFolder


def steered_texts(base, lora, samples: int, seq_len: int, precision: str) -> list[str]:
    config = GenerationConfig(samples=samples, tokens=seq_len, seed=1, precision=precision)
    with attached(base.model, lora) as adapted:
        return sample(adapted, base.tokenizer, config)


def probe_run(
    path: Path, n_users: int, batches: int, samples: int, betas: tuple[float, ...] = ()
) -> dict:
    run = RunFolder(path)
    config = stored_config(run)
    base = basemodel.load(config.base_model or None)
    pad, mixed = base.tokenizer.pad_token_id, config.precision
    emulator, info = load(run.emulator)
    lora = run.global_adapter()
    texts = public_for(config, print, base)  # the run's own, as its server made it
    began = time.perf_counter()
    steered = steered_texts(base, lora, samples, config.training.seq_len, mixed)
    seconds = time.perf_counter() - began
    texts_of = choose_users(config)

    def correction(blocks: list) -> dict:
        return gradient_correction(
            base.model, emulator, info, lora, blocks, pad, batches=batches, precision=mixed
        )

    def blocks_of(text: str) -> list:
        return lm.token_blocks(base.tokenizer, text, config.training.seq_len)

    shared = {
        "public": correction(blocks_of("\n".join(texts))),
        "steered": correction(blocks_of("\n".join(steered))),
    }
    per_user = {}
    for user in run.users()[:n_users]:
        blocks = blocks_of(texts_of[user].train)
        chosen = list(lm.training_batches(blocks, 4, batches, pad, seed=7))
        g_full = _lora_gradient(base.model, lora, chosen, mixed)
        on_emulator = _lora_gradient(emulator, info.lora_on_emulator(lora), chosen, mixed)
        g_emu = to_full_keys(on_emulator, info)
        own = gradient_correction(  # other batches of the user's own text than those judged
            base.model, emulator, info, lora, blocks, pad, batches=batches, seed=11, precision=mixed
        )
        shifts = {"none": {k: 0 for k in g_emu}, **shared, "own": own}
        shifts |= {f"public×{b:g}": {k: b * v for k, v in shared["public"].items()} for b in betas}
        per_user[user] = {
            source: cosine(g_full, {k: g_emu[k] + shift[k] for k in g_emu})
            for source, shift in shifts.items()
        }
        print(f"{path.name} {user}: {per_user[user]}", flush=True)
    return {
        "run": path.name,
        "generation_seconds": seconds,
        "steered_sample": steered[0][:300],
        "median": {s: statistics.median(u[s] for u in per_user.values()) for s in shifts},
        "per_user": per_user,
    }


def markdown(result: dict) -> str:
    lines = [
        f"`{result['command']}` at {result['commit']} on {result['date']}.",
        "",
        "cos(g_full, g_emu + correction) on each user's own training text, at the run's final "
        f"global adapter; median over {result['users']} users (each user: better than the "
        "public text's correction with the steered one).",
        "",
        "| run | no correction | on the public text | on the adapted model's text | on the "
        "user's own text (bound) | users better with steered | generation seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        m = r["median"]
        better = sum(u["steered"] > u["public"] for u in r["per_user"].values())
        lines.append(
            f"| {r['run']} | {m['none']:.3f} | {m['public']:.3f} | **{m['steered']:.3f}** | "
            f"{m['own']:.3f} | {better} of {len(r['per_user'])} | {r['generation_seconds']:.0f} |"
        )
    betas = [s for s in result["rows"][0]["median"] if s.startswith("public×")]
    if betas:
        lines += [
            "",
            "The public text's correction at a strength β (g_emu + β·correction), median cosine:",
            "",
            "| run | " + " | ".join(f"β = {s.removeprefix('public×')}" for s in betas) + " |",
            "|---|" + "---|" * len(betas),
            *(
                f"| {r['run']} | " + " | ".join(f"{r['median'][s]:.3f}" for s in betas) + " |"
                for r in result["rows"]
            ),
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="finished emulator-mode runs")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--samples", type=int, default=32, help="the adapted model's texts")
    parser.add_argument(
        "--betas", default="", help="strengths of the public correction, e.g. 0.25,0.5,0.75"
    )
    parser.add_argument("--name", default="default")
    args = parser.parse_args()
    torch.set_num_threads(2)
    basemodel.quiet_libraries()
    betas = tuple(float(b) for b in args.betas.split(",") if b.strip())
    rows = [
        probe_run(Path(p), args.users, args.batches, args.samples, betas)
        for p in args.runs.split(",")
    ]
    result = {**provenance("steered_probe"), "users": args.users, "rows": rows}
    write_results(RESULTS / f"steered_probe_{args.name}.json", result, markdown(result))


if __name__ == "__main__":
    main()
