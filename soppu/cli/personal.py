"""`soppu emulator build` and `soppu personalize`: one user's side, before any federation."""

from __future__ import annotations

from dataclasses import fields, replace
from inspect import Parameter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from soppu import atomic
from soppu.cli.common import (
    BaseModelOpt,
    DataOpt,
    DeviceOpt,
    ThreadsOpt,
    clear_errors,
    console,
    data_flags,
    data_options,
    progress_bar,
    set_threads,
    setting_option,
    shown,
    with_flags,
)
from soppu.server.config import (
    CLIENT_MODES,
    FIELDS,
    HELP,
    MODE_RECIPES,
    MODE_TARGETS_HELP,
    FederationConfig,
    flag,
)
from soppu.train_config import TRAIN_FLAGS, TRAIN_HELP, TrainConfig


def register(app: typer.Typer) -> None:
    emulator_app = typer.Typer(
        help="Build the FedBiOT emulator clients train against.", no_args_is_help=True
    )
    emulator_app.command("build")(with_flags(emulator_build, _recipe_flags(), after=3))
    app.add_typer(emulator_app, name="emulator")
    app.command("personalize")(
        with_flags(personalize, [*_training_flags(), *data_flags()], after=8)
    )


# The emulator recipe's settings, named, defaulted and explained once, by the federation's
# config (a federation builds the same emulator from them).
RECIPE_SETTINGS = (
    "top",
    "bottom",
    "drop",
    "layer_select",
    "align_steps",
    "batch_size",
    "seq_len",
    "precision",
)


def _param(field: str) -> str:
    """A TrainConfig field's flag and parameter name (`lora_alpha`: `alpha` is the data's;
    `lora_rank`: `rank` is compression's, as in `soppu simulate`)."""
    return TRAIN_FLAGS.get(field, field)


# unset, the client mode's (MODE_RECIPES); TrainConfig's own default is the library's
MODE_HELP = {
    "target_modules": "LoRA targets, repeat the flag for each, or all-linear (default: "
    f"{MODE_TARGETS_HELP}).",
}


def _training_flags() -> list[Parameter]:
    return [
        setting_option(
            f,
            "--" + _param(f.name).replace("_", "-"),
            MODE_HELP.get(f.name, TRAIN_HELP[f.name]),
            kind=list[str] if f.name == "target_modules" else None,  # a repeated flag
            name=_param(f.name),
        )
        for f in fields(TrainConfig)
    ]


def _recipe_flags() -> list[Parameter]:
    return [setting_option(FIELDS[key], flag(key), HELP[key], name=key) for key in RECIPE_SETTINGS]


def _recipe(given: dict[str, Any]) -> dict[str, Any]:
    """The recipe flags' values, the federation's defaults where unset."""
    defaults = FederationConfig().flat()
    return {n: defaults[n] if given[n] is None else given[n] for n in RECIPE_SETTINGS}


PublicOpt = Annotated[
    str,
    typer.Option(
        help="Text no user owns, to align and correct on: generated (the full model's own "
        "samples), pool (the embedded Shakespeare pool) or a JSONL/CSV/Parquet file with a "
        "'text' column; '': the default."
    ),
]
ALIGN_LR = 1e-3  # soppu.alignment.AlignConfig.lr (a heavy import; a test checks they agree)


def emulator_build(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the emulator to.")],
    base_model: BaseModelOpt = None,
    public: PublicOpt = "",
    align_lr: Annotated[float, typer.Option(help="Alignment learning rate.")] = ALIGN_LR,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing emulator.")] = False,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    **recipe: Any,
) -> None:
    """Build and align the emulator; save it; time a client step on it and on the full model."""
    # The recipe flags (`recipe`) are the federation's settings (`_recipe_flags`).
    from soppu import basemodel, lm
    from soppu.alignment import AlignConfig
    from soppu.emulator import EmulatorPlan, save
    from soppu.personalize import fresh_lora, time_training_step
    from soppu.precision import resolve as resolve_precision

    used = set_threads(threads)
    with clear_errors():
        atomic.check_target(out, replace=overwrite, inputs=[Path(base_model)] if base_model else [])
        r = _recipe(recipe)
        batch_size, seq_len = r["batch_size"], r["seq_len"]
        base = basemodel.load(base_model, device=_device(device))
        plan = EmulatorPlan(
            base.num_layers,
            top=r["top"],
            bottom=r["bottom"],
            drop=r["drop"],
            select=r["layer_select"],
        )
        config = AlignConfig(
            steps=r["align_steps"],
            lr=align_lr,
            batch_size=batch_size,
            seq_len=seq_len,
            precision=resolve_precision(r["precision"], _device(device)),
        )
        emulator, info, texts = _build_emulator(base, plan, public, config)
        save(emulator, info, out, replace=overwrite)
        sample = lm.token_blocks(base.tokenizer, "\n".join(texts[:2000]), seq_len)
        batch = lm.collate(sample[:batch_size], base.tokenizer.pad_token_id)
        lora = fresh_lora(emulator, info, TrainConfig())
        emu_s = time_training_step(
            emulator, info.lora_on_emulator(lora), batch, precision=config.precision
        )
        full_s = time_training_step(base.model, lora, batch, precision=config.precision)
    how = f"{batch_size}×{seq_len} tokens, {used} threads, {config.precision}"
    _print_emulator(info, out, emu_s, full_s, how)


def _build_emulator(base, plan, public: str, config):
    """Build and align with a progress bar from the first second; say what it is aligned on."""
    from soppu.alignment import build_aligned
    from soppu.public import align_steps, default_public, describe

    public = public or default_public(None)  # no users' data: the embedded users' pool
    config = replace(config, steps=align_steps(public, config.steps))
    texts = _public(base, public, config.seq_len, config.precision)
    if plan.drop > 0 and config.steps > 0:
        console.print(
            f"aligning the emulator for {config.steps} steps on {shown(describe(public))}",
            highlight=False,
        )
    elif plan.drop > 0:
        console.print("[bold red]the emulator is NOT aligned (--align-steps 0)[/]")
    with progress_bar("align") as progress:
        progress("choosing layers and measuring the first loss", 0, max(config.steps, 1))
        emulator, info = build_aligned(
            base.model,
            base.tokenizer,
            base.name,
            plan,
            texts,
            config,
            lambda step, total, loss: progress(f"loss {loss:.4f}", step, total),
        )
    return emulator, info, texts


def _print_emulator(info, out: Path, emu_s: float, full_s: float, how: str) -> None:
    middle = [f for f in info.full_layers if f not in info.adapter_layers]
    console.print(f"emulator [bold]{info.version}[/] of {shown(info.base_model)} → {shown(out)}")
    console.print(f"  adapter layers (trained by users): {info.adapter_layers}")
    console.print(f"  emulator keeps {len(middle)} of the other layers: {middle}")
    console.print(
        f"  parameters: {info.params_emulator:,} vs {info.params_full:,} in the full model "
        f"({info.params_emulator / info.params_full:.0%})"
    )
    if info.alignment:
        before, after = info.alignment["before"], info.alignment["after"]
        console.print(
            f"  alignment on public text: loss {before['loss']:.4f} → {after['loss']:.4f} "
            f"(KL {before['kl']:.4f} → {after['kl']:.4f}, L2 {before['l2']:.4f} → "
            f"{after['l2']:.4f})",
            highlight=False,
        )
    console.print(
        f"  one LoRA training step ({how}): "
        f"emulator {emu_s:.2f} s, full model {full_s:.2f} s → [bold]{full_s / emu_s:.2f}×[/]",
        highlight=False,
    )


def personalize(
    user: Annotated[str, typer.Option("--user", help="The user id (see `soppu data`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PEFT adapter dir to write.")],
    base_model: BaseModelOpt = None,
    data: DataOpt = None,
    client_mode: Annotated[
        str,
        typer.Option(
            help="emulator: train on the emulator; full: on the full model; split: on its top "
            "8 layers' every projection, fed the hidden states below them."
        ),
    ] = "emulator",
    emulator: Annotated[
        Path | None, typer.Option(help="An emulator from `soppu emulator build` (else built).")
    ] = None,
    public: PublicOpt = "",
    start: Annotated[Path | None, typer.Option(help="Starting adapter (PEFT dir).")] = None,
    correction_batches: Annotated[
        int, typer.Option(help="Public batches for the gradient correction (0: off).")
    ] = 8,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing adapter at --out.")] = False,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    **flags: Any,
) -> None:
    """Train one user's LoRA on the emulator; write it for the full model; report perplexities."""
    # Long for a reason: most of its lines are the option list typer reads from the signature;
    # the training and data flags (`flags`) are derived (`_training_flags`, `data_flags`).
    from soppu import basemodel
    from soppu.adapters import read_lora, write_lora
    from soppu.data import load_users, open_users, pick_user
    from soppu.personalize import personalize as run
    from soppu.public import default_public

    set_threads(threads)
    options = data_options(flags)
    with clear_errors():
        given = {f.name: flags[_param(f.name)] for f in fields(TrainConfig)}
        given = {k: v for k, v in given.items() if v is not None}
        if client_mode not in CLIENT_MODES:
            raise ValueError(f"client mode {client_mode!r} is not one of {', '.join(CLIENT_MODES)}")
        mode = MODE_RECIPES[client_mode]  # the targets the mode trains, unless given
        given["target_modules"] = tuple(given.get("target_modules") or ()) or mode.targets
        config = TrainConfig(**given)
        atomic.check_target(out, replace=overwrite, inputs=[p for p in (emulator, start) if p])
        person = pick_user(load_users(data, options), user, open_users(data).label)
        base = basemodel.load(base_model, device=_device(device))
        public = public or default_public(data)
        emu_model, info, texts = _emulator(emulator, base, client_mode, public, config.precision)
        starting = read_lora(start) if start else None
        correction = _correction(base, emu_model, info, texts, config, starting, correction_batches)
        with progress_bar("train") as progress:
            result = run(
                person,
                emu_model,
                info,
                base.tokenizer,
                config,
                start=starting,
                full_model=base.model,
                progress=lambda s, n, loss: progress(f"loss {loss:.3f}", s, n),
                correction=correction,
            )
        write_lora(
            result.lora, out, {"emulator": info.version, **result.summary()}, replace=overwrite
        )
    _print_personal(result, out)


def _public(base, public: str, seq_len: int, precision: str) -> list[str]:
    """The public texts (`soppu.public`), with a spinner while the full model writes them."""
    from soppu.public import public_texts

    with console.status("the public text (the full model writes it once if generated)"):
        return public_texts(public, base, seq_len=seq_len, precision=precision)


def _emulator(folder: Path | None, base, client_mode: str, public: str, precision: str = "auto"):
    """(model, info, public texts): the given emulator, the full model itself (full mode), its
    top layers fed by it (split mode), or the default emulator built and aligned now."""
    from soppu.alignment import AlignConfig
    from soppu.emulator import EmulatorError, EmulatorPlan, build, full_model_info, load
    from soppu.features import ModelFeatures, attach
    from soppu.precision import resolve
    from soppu.public import SOURCE_STEPS

    if client_mode == "full":
        return base.model, full_model_info(base.model, base.name), []
    if client_mode == "split":  # the full model in hand computes the features
        plan = EmulatorPlan(base.num_layers, split=True)
        model, info = build(base.model, plan, base.name)
        layer = info.features_layer
        attach(model, info, ModelFeatures(base.model, base.tokenizer.pad_token_id, layer))
        return model, info, []
    device = str(next(base.model.parameters()).device)
    if folder is not None:
        model, info = load(folder, device=device)
        if info.base_model != base.name:
            raise EmulatorError(f"{folder}: built from {info.base_model}, not {base.name}")
        if not info.exact and not info.aligned:
            console.print(f"[bold red]{shown(folder)} is NOT aligned to the full model[/]")
        return model, info, _public(base, public, AlignConfig().seq_len, resolve(precision, device))
    plan = EmulatorPlan(base.num_layers)
    console.print(
        f"no --emulator: building the default one (top {plan.top}, {plan.keep_count} of the "
        f"{len(plan.middle)} layers below kept by importance)"
    )
    # as it ran; the steps are the public text's default, as a federation's
    align = AlignConfig(steps=SOURCE_STEPS, precision=resolve(precision, device))
    return _build_emulator(base, plan, public, align)


def _device(device: str) -> str:
    import torch

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not one of cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but torch sees no CUDA device")
    return device


def _correction(base, emulator, info, texts, config, start, batches: int):
    """The emulator's gradient bias at the starting adapter, on public text (as the
    federation's server measures it each round); None in full mode or when off."""
    from soppu import lm
    from soppu.alignment import gradient_correction
    from soppu.personalize import fresh_lora

    if info.exact or batches <= 0:
        return None
    blocks = lm.token_blocks(base.tokenizer, "\n".join(texts), config.seq_len)
    with console.status(f"measuring the gradient correction on {batches} public batches"):
        return gradient_correction(
            base.model,
            emulator,
            info,
            start or fresh_lora(emulator, info, config),
            blocks,
            base.tokenizer.pad_token_id,
            batches=batches,
            batch_size=config.batch_size,
            seed=config.seed,
            precision=config.precision,
        )


def _print_personal(result, out: Path) -> None:
    ppl = result.perplexity
    table = Table(
        title=f"held-out perplexity of {result.user_id} ({result.test_tokens:,} tokens)",
        title_justify="left",
    )
    for column in ("model", "perplexity", "vs base"):
        table.add_column(column, justify="left" if column == "model" else "right")
    rows = [
        ("base model", "base"),
        ("client's model, starting adapter", "emulator_start"),
        ("client's model + adapter", "emulator_adapter"),
        ("full model + adapter", "full_adapter"),
    ]
    for label, key in rows:
        if key in ppl:
            table.add_row(label, f"{ppl[key]:.2f}", f"{ppl[key] / ppl['base'] - 1:+.1%}")
    console.print(table)
    console.print(
        f"trained {len(result.train_loss)} steps on {result.train_tokens:,} tokens in "
        f"{result.seconds:.0f} s (loss {result.train_loss[0]:.3f} → {result.train_loss[-1]:.3f}); "
        f"adapter: [bold]{shown(out)}[/]",
        highlight=False,
    )
