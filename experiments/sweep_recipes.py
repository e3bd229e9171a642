"""Which client recipe carries the gain? Gain on the full model against client cost.

    python -m experiments.sweep_recipes               # the benchmarks' table (≈ 100 minutes)
    python -m experiments.sweep_recipes --quick       # 2 users, 4 steps, 3 recipes

Every recipe trains each of N users' LoRA (the same users, drawn with a fixed seed from the
Shakespeare roles with at least --min-chars of text) for the same step budget on the model the
client holds (an emulator, or the full model), through `soppu personalize`'s code path, and
measures held-out perplexity on the full model. Recipes differ in where the LoRA sits (the
adapter layers only, or every layer the client's model has), which projections it targets,
which middle layers the emulator keeps (most important, or evenly spaced), its drop ratio, and
whether the server's gradient correction is sent. Two references frame them: the full model
with LoRA on every layer (the ceiling a client holding the full model reaches) and a LoRA the
server trains on the full model with public text only (what no user's text is needed for).

Cost is measured apart, one recipe at a time in a fresh child process that loads only the
model a client holds: the median seconds of one training step (forward, backward, AdamW) on
the same batch with one torch thread, and the peak RSS of that process (Linux VmHWM, reset
after the batch is made).

Quality runs `--workers` processes side by side (one torch thread each; timings are not taken
there). Writes experiments/results/recipe_sweep.json and .md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from experiments.lib import RESULTS, provenance
from soppu import atomic

QV = ("q_proj", "v_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Recipe:
    name: str
    mode: str = "emulator"  # emulator | full | public (the server trains on public text)
    drop: float = 0.5
    select: str = "importance"
    top: int = 2
    bottom: int = 0
    lora_layers: str = "all"
    targets: tuple[str, ...] = QV
    correction: int = 0  # public batches for the gradient correction (0: none)
    lr: float = 1e-3

    @property
    def emulator_key(self) -> str:
        if self.mode != "emulator":
            return "full"
        return f"drop{self.drop}-{self.select}-t{self.top}-b{self.bottom}"


RECIPES = [
    Recipe("FedBiOT: top 2, even", select="even", lora_layers="adapter"),
    Recipe("full model, top 2", mode="full", lora_layers="adapter"),
    Recipe("all kept layers, even", select="even"),
    Recipe("all kept layers, even, corrected", select="even", correction=8),
    Recipe("all kept layers"),
    Recipe("all kept layers, corrected", correction=8),
    Recipe("all kept layers, corrected, lr 2e-3", correction=8, lr=2e-3),
    Recipe("all kept layers, 7 projections, corrected", targets=ALL_LINEAR, correction=8),
    Recipe("drop 0.25, all kept layers, corrected", drop=0.25, correction=8),
    Recipe("full model, all layers", mode="full"),
    Recipe("full model, all layers, 7 projections", mode="full", targets=ALL_LINEAR),
    Recipe("public text only (server, full model)", mode="public"),
]
QUICK = [RECIPES[0], RECIPES[5], RECIPES[9]]


def build_emulators(recipes: list[Recipe], folder: Path, align_steps: int) -> None:
    """Each distinct emulator once (built and aligned on public text), saved under `folder`."""
    from soppu import basemodel
    from soppu.alignment import AlignConfig, build_aligned
    from soppu.data import public_text
    from soppu.emulator import EmulatorPlan, save

    base = basemodel.load()
    for recipe in {r.emulator_key: r for r in recipes if r.mode == "emulator"}.values():
        target = folder / recipe.emulator_key
        if (target / "soppu_emulator.json").is_file():
            continue
        plan = EmulatorPlan(
            base.num_layers,
            top=recipe.top,
            bottom=recipe.bottom,
            drop=recipe.drop,
            select=recipe.select,
        )
        began = time.perf_counter()
        emulator, info = build_aligned(
            base.model, base.tokenizer, base.name, plan, public_text(), AlignConfig(align_steps)
        )
        info.alignment["seconds"] = time.perf_counter() - began
        save(emulator, info, target)
        print(
            f"emulator {recipe.emulator_key}: {info.full_layers} "
            f"(KL {info.alignment['after']['kl']:.3f})",
            flush=True,
        )


def quality_job(job: tuple[Recipe, str, Path, int, int]) -> dict:
    """One (recipe, user): train on the client's model, evaluate on the full model."""
    import torch

    torch.set_num_threads(1)
    recipe, user, emulators, steps, max_eval_tokens = job
    from soppu import basemodel, lm

    basemodel.quiet_libraries()
    from soppu.alignment import gradient_correction
    from soppu.data import UserText, load_users, public_text
    from soppu.emulator import full_model_info, load
    from soppu.personalize import TrainConfig, fresh_lora, personalize

    base = basemodel.load()
    person = load_users()[user]
    if recipe.mode == "emulator":
        model, info = load(emulators / recipe.emulator_key)
    else:  # the client's model is the full model itself
        model, info = base.model, full_model_info(base.model, base.name)
    if recipe.mode == "public":  # the user's held-out text, but public text to train on
        person = UserText(user, "\n".join(public_text()), person.test)
    config = TrainConfig(
        steps=steps,
        lr=recipe.lr,
        target_modules=recipe.targets,
        lora_layers=recipe.lora_layers,
        max_eval_tokens=max_eval_tokens,
    )
    correction = None
    if recipe.correction:
        blocks = lm.token_blocks(base.tokenizer, "\n".join(public_text()), config.seq_len)
        correction = gradient_correction(
            base.model,
            model,
            info,
            fresh_lora(model, info, config),
            blocks,
            base.tokenizer.pad_token_id,
            batches=recipe.correction,
        )
    result = personalize(
        person, model, info, base.tokenizer, config, full_model=base.model, correction=correction
    )
    ppl = result.perplexity
    return {
        "recipe": recipe.name,
        "user": user,
        "base": ppl["base"],
        "client_model": ppl["emulator_adapter"],
        "full": ppl["full_adapter"],
        "gain": 1 - ppl["full_adapter"] / ppl["base"],
        "lora_layers": len(result.lora.config["layers_to_transform"]),
        "lora_params": sum(t.numel() for t in result.lora.tensors.values()),
    }


COST_CHILD = """
import gc, json, sys, torch
torch.set_num_threads(1)
from soppu import basemodel, lm
from soppu.data import public_text
from soppu.emulator import full_model_info, load
from soppu.personalize import TrainConfig, fresh_lora, time_training_step
mode, folder, lora_layers, targets, precision = sys.argv[1:6]
tokenizer = basemodel.load_tokenizer()
blocks = lm.token_blocks(tokenizer, "\\n".join(public_text()[:3000]), 128)
batch = lm.collate(blocks[100:104], tokenizer.pad_token_id)
del blocks
gc.collect()
with open("/proc/self/clear_refs", "w") as refs:  # reset the peak: count the model, not the data
    refs.write("5")
if mode == "emulator":
    model, info = load(folder)
else:  # a client in full mode holds the full model, and nothing else
    base = basemodel.load()
    model, info = base.model, full_model_info(base.model, base.name)
config = TrainConfig(lora_layers=lora_layers, target_modules=tuple(targets.split(",")))
lora = info.lora_on_emulator(fresh_lora(model, info, config))
seconds = time_training_step(model, lora, batch, repeats=5, precision=precision)
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
print(json.dumps({"step_s": seconds, "peak_rss_mib": peak}))
"""


def cost(recipe: Recipe, emulator: Path, precision: str = "auto") -> dict:
    """One client step's seconds and the client's peak RSS; `emulator`: its folder;
    `precision`: soppu.precision's (auto: bf16 where this CPU computes it natively)."""
    if recipe.mode == "public":
        return {"step_s": None, "peak_rss_mib": None}  # the server's work, not a client's
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            COST_CHILD,
            recipe.mode,
            str(emulator),
            recipe.lora_layers,
            ",".join(recipe.targets),
            precision,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--min-chars", type=int, default=10_000)
    parser.add_argument("--max-eval-tokens", type=int, default=2048)
    parser.add_argument("--align-steps", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--emulators", type=Path, default=Path("runs/experiments/sweep-emulators"))
    args = parser.parse_args()
    recipes = QUICK if args.quick else RECIPES
    if args.quick:
        args.users, args.steps, args.align_steps, args.max_eval_tokens = 2, 4, 2, 256
        args.emulators = args.emulators.with_name(args.emulators.name + "-quick")

    from soppu.basemodel import quiet_libraries
    from soppu.data import load_users

    quiet_libraries()
    users = load_users()
    eligible = sorted(u for u, text in users.items() if text.chars >= args.min_chars)
    picked = random.Random(0).sample(eligible, args.users)
    build_emulators(recipes, args.emulators, args.align_steps)
    jobs = [
        (r, u, args.emulators, args.steps, args.max_eval_tokens) for r in recipes for u in picked
    ]
    rows = []
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for row in pool.imap_unordered(quality_job, jobs):
            rows.append(row)
            print(
                f"{row['recipe']} / {row['user']}: base {row['base']:.1f} → "
                f"{row['full']:.1f} ({-row['gain']:+.1%})",
                flush=True,
            )
    costs = {r.name: cost(r, args.emulators / r.emulator_key) for r in recipes}
    write(recipes, rows, costs, picked, args)


def summarise(recipes: list[Recipe], rows: list[dict], costs: dict) -> list[dict]:
    ceiling = statistics.median(r["gain"] for r in rows if r["recipe"] == "full model, all layers")
    table = []
    for recipe in recipes:
        mine = [r for r in rows if r["recipe"] == recipe.name]
        gains = sorted(r["gain"] for r in mine)
        median = statistics.median(gains)
        table.append(
            {
                "recipe": recipe.name,
                **asdict(recipe),
                "users": len(mine),
                "gain_median": median,
                "gain_min": gains[0],
                "gain_max": gains[-1],
                "improved": sum(g > 0 for g in gains),
                "of_ceiling": median / ceiling,
                "lora_params": mine[0]["lora_params"],
                **costs[recipe.name],
            }
        )
    return table


def write(recipes, rows, costs, picked, args) -> None:
    RESULTS.mkdir(exist_ok=True)
    table = summarise(recipes, rows, costs)
    meta = {
        **provenance("sweep_recipes"),
        "machine": platform.platform(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "users": picked,
    }
    name = "recipe_sweep_quick" if args.quick else "recipe_sweep"
    summary = json.dumps({"meta": meta, "recipes": table, "rows": rows}, indent=2)
    atomic.write_text(RESULTS / f"{name}.json", summary + "\n")
    lines = [
        "| recipe | LoRA params | median gain on the full model | range | improved "
        "| of the full-model ceiling | client step (1 thread) | client peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in table:
        step = "–" if t["step_s"] is None else f"{t['step_s']:.2f} s"
        rss = "–" if t["peak_rss_mib"] is None else f"{t['peak_rss_mib']:.0f} MiB"
        lines.append(
            f"| {t['recipe']} | {t['lora_params'] / 1e3:.0f} K | **{t['gain_median']:.1%}** | "
            f"{t['gain_min']:.1%} to {t['gain_max']:.1%} | {t['improved']}/{t['users']} | "
            f"{t['of_ceiling']:.0%} | {step} | {rss} |"
        )
    lines.append("")
    lines.append(
        f"{len(picked)} users, {args.steps} steps of 4×128 tokens each; gain = 1 − "
        "held-out perplexity with the adapter / without, both on the full model."
    )
    atomic.write_text(RESULTS / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
