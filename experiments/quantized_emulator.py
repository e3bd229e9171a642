"""Is a quantised full model a better stand-in than the layer-drop emulator?

    python -m experiments.quantized_emulator --population sympy     # ≈ 8 minutes

For each stand-in, at the fresh LoRA (q/v on every layer it has) on 6 users' training text:
the cosine between the LoRA gradient on the stand-in and on the full model, bare and with the
gradient correction measured on 4 batches of generated text, and the stand-in's held-out
perplexity over the full model's (how much of the model it gives away). Stand-ins: the default
emulator of a finished run (`--emulator-run`) and the full model with every layer but the top
two quantised round-to-nearest, asymmetric, per group of input weights (2 bits in groups of
32; 3 and 4 bits in groups of 64). Writes experiments/results/quantized_emulator_<population>.json
and .md.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from experiments.lib import RESULTS, provenance, write_results

STAND_INS = [(2, 32), (3, 64), (4, 64)]  # (bits, group)


def quantised(model, bits: int, group: int, skip: set[int]):
    """A copy of `model` with the linear weights of every decoder layer not in `skip` rounded
    to `bits` bits, asymmetric min-max per group of `group` input weights."""
    from soppu.emulator import layers_path

    copied = copy.deepcopy(model)
    for i, layer in enumerate(copied.get_submodule(layers_path(copied))):
        if i in skip:
            continue
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                out, inp = module.weight.shape
                w = module.weight.data.reshape(out, inp // group, group)
                low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
                scale = (high - low).clamp(min=1e-8) / (2**bits - 1)
                rounded = torch.round((w - low) / scale) * scale + low
                module.weight.data = rounded.reshape(out, inp)
    return copied


def cosine(a: dict, b: dict) -> float:
    flat = [torch.cat([d[k].flatten() for k in sorted(d)]) for d in (a, b)]
    return float(torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--population", default="sympy")
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument(
        "--emulator-run", default="runs/experiments/pop-base-sympy-emulator-generated"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)

    from experiments.populations import prepare
    from soppu import basemodel, lm
    from soppu.alignment import _lora_gradient
    from soppu.data import load_users
    from soppu.emulator import full_model_info, load, to_full_keys
    from soppu.personalize import TrainConfig, fresh_lora
    from soppu.public import public_texts

    base = basemodel.load()
    tokenizer, pad = base.tokenizer, base.tokenizer.pad_token_id
    users = load_users(prepare(args.population))
    picked = list(users)[: args.users]
    public = lm.token_blocks(tokenizer, "\n".join(public_texts("generated", base, "x")), 128)
    n = base.num_layers
    stand_ins = {"default emulator": load(f"{args.emulator_run}/emulator")}
    for bits, group in STAND_INS:
        model = quantised(base.model, bits, group, {n - 2, n - 1})
        stand_ins[f"{bits}-bit, groups of {group}"] = (model, full_model_info(model, base.name))
    rows = []
    for name, (model, info) in stand_ins.items():
        lora = fresh_lora(model, info, TrainConfig())

        def gradients(blocks, seed, model=model, info=info, lora=lora):
            batches = list(lm.training_batches(blocks, 4, 4, pad, seed))
            on_full = _lora_gradient(base.model, lora, batches, "auto")
            on_model = _lora_gradient(model, info.lora_on_emulator(lora), batches, "auto")
            return on_full, to_full_keys(on_model, info)

        full_public, model_public = gradients(public, 0)
        correction = {k: full_public[k] - model_public[k] for k in full_public}
        per_user = []
        for user in picked:
            on_full, on_model = gradients(lm.token_blocks(tokenizer, users[user].train, 128), 2)
            corrected = {k: on_model[k] + correction[k] for k in on_model}
            test = lm.token_blocks(tokenizer, users[user].test, 128)[:16]
            ratio = lm.perplexity(model, test, pad, precision="bf16") / lm.perplexity(
                base.model, test, pad, precision="bf16"
            )
            per_user.append((cosine(on_full, on_model), cosine(on_full, corrected), ratio))
        rows.append(
            {
                "stand_in": name,
                "cosine": statistics.median(p[0] for p in per_user),
                "cosine_corrected": statistics.median(p[1] for p in per_user),
                "perplexity_ratio": statistics.median(p[2] for p in per_user),
            }
        )
        print(rows[-1], flush=True)
    result = {**provenance("quantized_emulator.py"), "population": args.population, "rows": rows}
    lines = [
        f"`{result['command']}` at {result['commit']} on {result['date']}",
        "",
        "| stand-in | gradient cosine with the full model | corrected | perplexity / full's |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stand_in']} | {r['cosine']:.2f} | {r['cosine_corrected']:.2f} "
            f"| {r['perplexity_ratio']:.2f}× |"
        )
    target = RESULTS / f"quantized_emulator_{args.population}.json"
    write_results(target, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
