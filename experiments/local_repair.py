"""Can a client repair its emulator on its own text, from what a serving API already answers?
A probe on finished runs' emulators: each user trains fresh LoRAs, no federation.

    python -m experiments.local_repair --runs RUN[,RUN...] --users 4 --name NAME

Out of the alignment text's domain the client's steps mostly repair the emulator on the
user's text (`proxy_probe`: −37% of the emulator's loss, −9 to −22% of the full model's), and
the server aligning on text of the users' domain carried half of full mode's gain where
generated text carried a third (benchmarks, "The frontier: the server holding text of the
users' domain"). The server never reads a user's text, but a user already sends it to the
serving API to score it (`/v1/completions`, `echo`, `logprobs: 5`): that answer, the full
model's log-probability of each token and its 5 most likely alternatives, is a teacher on
exactly the user's text. The federation's clients do this with `--repair-steps`
(`soppu/repair.py`, whose loop this probe runs; before 5bc7b51 the probe's own loop asked the
teacher per batch about all the user's blocks rather than about a seeded choice of
steps × batch of them). Here the client first tunes its emulator towards that teacher on its
own training text (the middle layers' weights, the alignment's parameters; or, with
`--repair-with lora`, a LoRA on every projection of those layers, merged in after, which
spares the client an optimizer state for 49 M weights), then trains its LoRA on the repaired
emulator, with the server's gradient correction (measured on the run's public
text and the emulator as the server holds it, all a real server could send) or without.

Per user, fresh LoRAs of `--steps` steps (`soppu personalize`'s recipe, the same seed):
`default` (the run's emulator, corrected: today's client); `repaired` and `repaired,
uncorrected`; `full` (the client holding the full model: the ceiling; `--no-ceiling` skips
it). Each judged on the full model on the first `--blocks` blocks of the user's held-out
text against the base model and against `default` (paired 95% bootstrap over blocks), with
the emulator's KL to the full model on that held-out text before and after the repair (does
a repair on the training text carry to the user's next text?) and the repair's seconds.

Writes experiments/results/local_repair_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from experiments.lib import RESULTS, provenance, write_results
from experiments.sweep_recipes import ALL_LINEAR
from soppu import basemodel, lm
from soppu.alignment import gradient_correction, measure
from soppu.emulator import full_model_info, load
from soppu.intervals import paired_gain
from soppu.personalize import TrainConfig, fresh_lora, personalize, scored
from soppu.repair import TOP_K, RepairConfig, TeacherAnswer, answer_from_logits
from soppu.repair import repair as soppu_repair
from soppu.server.prepare_run import choose_users, public_for, stored_config
from soppu.server.store import RunFolder


def answers_for(full, blocks, precision: str) -> list[TeacherAnswer]:
    """What scoring each block answers (the full model's top-5), as a node's teacher gives."""
    answers = []
    with torch.no_grad():
        for block in blocks:
            logits = lm.logits(full, lm.collate([block], 0), precision)[0]
            answers.append(answer_from_logits(block, logits, TOP_K))
    return answers


def repair_lora(emulator, info, rank: int):
    """The emulator under a LoRA on every projection of its middle layers, and its factors."""
    emulator.requires_grad_(False)
    layers = emulator.get_submodule(info.layers_path)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(ALL_LINEAR),
        layers_to_transform=[
            j for j in range(len(layers)) if j not in info.emulator_adapter_layers
        ],
        layers_pattern=info.layers_path.rsplit(".", 1)[-1],
    )
    model = get_peft_model(emulator, config)
    return model, [p for name, p in model.named_parameters() if "lora_" in name]


def repair(full, emulator, info, blocks, pad: int, args, precision: str, after_step=None):
    """Tune the emulator in place towards the teacher on a seeded choice of `blocks`, as a
    node does (`soppu.repair`): its middle layers' weights (`--repair-with layers`), or a
    LoRA of `--repair-rank` on every projection of the middle layers, merged in after
    (`lora`: the client keeps no optimizer state for 49 M weights)."""
    config = RepairConfig(args.repair_steps, args.repair_lr, 4, seed=3, precision=precision)
    blocks = config.chosen(blocks)
    answers = answers_for(full, blocks, precision)
    model, params = emulator, None
    if args.repair_with == "lora":
        model, params = repair_lora(emulator, info, args.repair_rank)
    soppu_repair(model, info, answers, pad, config, params, after_step or (lambda step: None))
    if model is not emulator:
        model.merge_and_unload()  # into the emulator's own modules, in place
    emulator.eval().requires_grad_(False)


def probe_user(run: RunFolder, config, user, base, public_blocks, args) -> dict:
    pad, mixed = base.tokenizer.pad_token_id, config.precision
    train = TrainConfig(steps=args.steps, precision=mixed)
    blocks = lm.token_blocks(base.tokenizer, user.train, train.seq_len)
    held_out = lm.token_blocks(base.tokenizer, user.test, train.seq_len)[: args.blocks]
    emulator, info = load(run.emulator)

    def correction(model) -> dict:
        start = fresh_lora(model, info, train)
        return gradient_correction(
            base.model, model, info, start, public_blocks, pad, batches=8, precision=mixed
        )

    def trained(model, model_info, shift) -> list[float]:
        lora = personalize(user, model, model_info, base.tokenizer, train, correction=shift).lora
        return scored(base.model, lora, held_out, pad, 4)[0]

    server_correction = correction(emulator)  # what the server measures and sends
    kl_before = measure(base.model, emulator, info, held_out, pad, 4, mixed).kl
    nll = {"default": trained(emulator, info, server_correction)}
    began = time.perf_counter()
    repair(base.model, emulator, info, blocks, pad, args, mixed)
    seconds = time.perf_counter() - began
    kl_after = measure(base.model, emulator, info, held_out, pad, 4, mixed).kl
    nll["repaired"] = trained(emulator, info, server_correction)
    nll["repaired, uncorrected"] = trained(emulator, info, None)
    if args.ceiling:
        nll["full"] = trained(base.model, full_model_info(base.model, base.name), None)
    bare, counts = scored(base.model, None, held_out, pad, 4)
    row = {"kl_before": kl_before, "kl_after": kl_after, "repair_seconds": seconds}
    for variant, scores in nll.items():
        row[variant] = {
            "over_base": paired_gain(bare, scores, counts).as_dict(),
            "over_default": paired_gain(nll["default"], scores, counts).as_dict(),
        }
    return row


def probe_run(path: Path, args) -> dict:
    run = RunFolder(path)
    config = stored_config(run)
    base = basemodel.load(config.base_model or None)
    texts = public_for(config, print, base)  # the run's own public text, as its server made it
    public_blocks = lm.token_blocks(base.tokenizer, "\n".join(texts), config.training.seq_len)
    users = choose_users(config)
    per_user = {}
    for name in run.users()[: args.users]:
        per_user[name] = probe_user(run, config, users[name], base, public_blocks, args)
        row = per_user[name]
        print(
            f"{path.name} {name}: KL {row['kl_before']:.3f} → {row['kl_after']:.3f}; "
            + ", ".join(f"{v} {row[v]['over_base']['point']:+.1%}" for v in variants(row)),
            flush=True,
        )
    return {"run": path.name, "per_user": per_user, "summary": summary(per_user)}


def kl_curve(path: Path, args) -> dict:
    """How the repair's lr moves the emulator's KL on one user's held-out text: for each of
    `--curve-lrs`, one repair of `--repair-steps` from the run's emulator, the KL measured
    every `--curve-every` steps. Chooses the probe's lr on one user, not on the results."""
    run = RunFolder(path)
    config = stored_config(run)
    base = basemodel.load(config.base_model or None)
    mixed = config.precision
    name = run.users()[args.curve_user]
    user = choose_users(config)[name]
    blocks = lm.token_blocks(base.tokenizer, user.train, config.training.seq_len)
    held_out = lm.token_blocks(base.tokenizer, user.test, config.training.seq_len)[: args.blocks]
    curves = {}
    for lr in (float(x) for x in args.curve_lrs.split(",")):
        curves[f"{lr:g}"] = one_curve(run, base, blocks, held_out, replace_lr(args, lr), mixed)
        print(f"{path.name} {name} lr {lr:g}: {curves[f'{lr:g}']}", flush=True)
    return {"run": path.name, "user": name, "curves": curves}


def one_curve(run: RunFolder, base, blocks, held_out, args, mixed: str) -> dict[int, float]:
    emulator, info = load(run.emulator)
    pad = base.tokenizer.pad_token_id

    def kl() -> float:
        return measure(base.model, emulator, info, held_out, pad, 4, mixed).kl

    curve = {0: kl()}

    def after_step(step: int) -> None:
        if step % args.curve_every == 0 or step == args.repair_steps:
            curve[step] = kl()

    repair(base.model, emulator, info, blocks, pad, args, mixed, after_step)
    return curve


def replace_lr(args, lr: float):
    return argparse.Namespace(**{**vars(args), "repair_lr": lr})


def curve_markdown(result: dict) -> str:
    steps = list(next(iter(result["curves"].values())))
    return (
        "\n".join(
            [
                f"`{result['command']}` at {result['commit']} on {result['date']}.",
                "",
                f"The emulator's KL to the full model on {result['user']}'s first "
                f"{result['blocks']} held-out blocks ({result['run']}) as "
                f"{repair_what(result)} is repaired on their training text, one repair per lr:",
                "",
                "| lr | " + " | ".join(f"step {s}" for s in steps) + " |",
                "|---|" + "---|" * len(steps),
                *(
                    f"| {lr} | " + " | ".join(f"{curve[s]:.3f}" for s in steps) + " |"
                    for lr, curve in result["curves"].items()
                ),
            ]
        )
        + "\n"
    )


VARIANTS = ("default", "repaired", "repaired, uncorrected", "full")


def variants(row: dict) -> list[str]:
    return [v for v in VARIANTS if v in row]


def summary(per_user: dict) -> dict:
    rows = list(per_user.values())
    out = {
        "kl_before": statistics.median(r["kl_before"] for r in rows),
        "kl_after": statistics.median(r["kl_after"] for r in rows),
        "repair_seconds": statistics.median(r["repair_seconds"] for r in rows),
    }
    for variant in variants(rows[0]):
        over_default = [r[variant]["over_default"] for r in rows]
        out[variant] = {
            "over_base": statistics.median(r[variant]["over_base"]["point"] for r in rows),
            "over_default": statistics.median(g["point"] for g in over_default),
            "better": sum(g["low"] > 0 for g in over_default),
            "worse": sum(g["high"] < 0 for g in over_default),
            "harmed": sum(r[variant]["over_base"]["high"] < 0 for r in rows),
        }
    return out


def repair_what(result: dict) -> str:
    if result.get("repair_with", "layers") == "layers":
        return "the emulator's middle layers"
    return f"a rank-{result['repair_rank']} LoRA on every projection of the middle layers"


def markdown(result: dict) -> str:
    lines = [
        f"`{result['command']}` at {result['commit']} on {result['date']}.",
        "",
        f"Fresh LoRAs of {result['steps']} steps per user; the repair: {result['repair_steps']} "
        f"steps at lr {result['repair_lr']:g} of {repair_what(result)} on the user's training "
        "text towards the full "
        f"model's top-{TOP_K} log-probabilities. Medians over {result['users']} users on the "
        f"first {result['blocks']} held-out blocks; better / worse / harmed: paired 95% "
        "intervals (against the default client, against the base model).",
        "",
        "| run | emulator KL on held-out text: before → after the repair | repair s | variant "
        "| over the base model | over the default client | better / worse | harmed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        s = row["summary"]
        for i, variant in enumerate(variants(s)):
            head = (
                f"| {row['run']} | {s['kl_before']:.3f} → {s['kl_after']:.3f} | "
                f"{s['repair_seconds']:.0f} "
                if i == 0
                else "| | | "
            )
            v = s[variant]
            lines.append(
                f"{head}| {variant} | {v['over_base']:+.1%} | {v['over_default']:+.1%} | "
                f"{v['better']} / {v['worse']} | {v['harmed']} |"
            )
    return "\n".join(lines) + "\n"


KEPT_ARGS = ("users", "steps", "repair_steps", "repair_lr", "repair_with", "repair_rank", "blocks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="finished emulator-mode runs")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="each LoRA's training steps")
    parser.add_argument("--repair-steps", type=int, default=40)
    parser.add_argument("--repair-lr", type=float, default=1e-4)
    parser.add_argument("--repair-with", choices=("layers", "lora"), default="layers")
    parser.add_argument("--repair-rank", type=int, default=16, help="with --repair-with lora")
    parser.add_argument("--no-ceiling", dest="ceiling", action="store_false", help="skip full")
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--name", default="default")
    parser.add_argument("--curve-lrs", default="", help="only the KL curve, e.g. 1e-4,3e-4")
    parser.add_argument("--curve-every", type=int, default=15)
    parser.add_argument("--curve-user", type=int, default=1, help="the run's n-th user")
    args = parser.parse_args()
    torch.set_num_threads(2)
    basemodel.quiet_libraries()
    if args.curve_lrs:
        result = {
            **provenance("local_repair"),
            **{k: getattr(args, k) for k in KEPT_ARGS},
            **kl_curve(Path(args.runs.split(",")[0]), args),
        }
        target = RESULTS / f"local_repair_curve_{args.name}.json"
        write_results(target, result, curve_markdown(result))
        return
    rows = [probe_run(Path(run), args) for run in args.runs.split(",")]
    result = {
        **provenance("local_repair"),
        **{k: getattr(args, k) for k in KEPT_ARGS},
        "rows": rows,
    }
    write_results(RESULTS / f"local_repair_{args.name}.json", result, markdown(result))


if __name__ == "__main__":
    main()
