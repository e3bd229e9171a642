"""One source per setting: FederationConfig's sections' fields give `soppu simulate` its flags,
defaults and help, and pyproject's `[tool.flwr.app.config]` the same keys and values."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from soppu.cli import app
from soppu.cli import federation as cli_federation
from soppu.server.config import (
    FIELDS,
    FLAGS,
    HELP,
    MODE_RECIPES,
    SECTIONS,
    ClientTraining,
    EmulatorSettings,
    EvaluationSettings,
    FederationConfig,
    SchemeSettings,
    flag,
)

ROOT = Path(__file__).parents[1]


def simulate_options() -> dict[str, click.Option]:
    command = typer.main.get_command(app).commands["simulate"]
    return {p.name: p for p in command.params}


def test_every_setting_is_a_flag_with_its_default_and_help():
    options = simulate_options()
    names = set(FIELDS)
    assert set(HELP) == names and set(FLAGS) <= names
    assert set(options) == names | {
        "config_file",
        "resume",
        "client_cpus",
        "print_config",
        "re_evaluate",
    }
    for name, field in FIELDS.items():
        option = options[name]
        assert flag(name) in option.opts + option.secondary_opts
        assert option.default is None  # unset flags leave the run's or the file's value
        default = field.default if field.default != "" else "''"
        assert option.help.endswith(f"[default: {default}]"), option.help


def test_pyproject_holds_every_setting_at_its_default():
    text = (ROOT / "pyproject.toml").read_text()
    block = text.split("[tool.flwr.app.config]\n", 1)[1].split("\n\n", 1)[0] + "\n"
    resume, generated = block.split("\n", 1)
    assert resume.startswith("resume = false")  # the one run-config key that is not a setting
    assert generated == FederationConfig(run_dir="runs/flwr").to_toml()  # --print-config's text
    values = dict(tomllib.loads(text)["tool"]["flwr"]["app"]["config"])
    assert values.pop("resume") is False
    assert set(values) == {name.replace("_", "-") for name in FIELDS}
    assert FederationConfig.from_run_config(values) == FederationConfig(run_dir=values["run-dir"])
    with pytest.raises(ValueError, match="unknown key 'round'"):
        FederationConfig.from_run_config({"round": 3})
    with pytest.raises(ValueError, match="final-evaluation must be true or false"):
        FederationConfig.from_run_config({"final-evaluation": "maybe"})


def test_flags_override_the_file_which_overrides_the_defaults(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(cli_federation, "_simulate", lambda config, *_: seen.update(c=config))
    monkeypatch.setattr(cli_federation, "_print_results", lambda _: None)
    (tmp_path / "run.toml").write_text("rounds = 5\ncompress-rank = 3\nlr = 0.01\n")
    args = ["simulate", "--out", str(tmp_path / "run"), "--config", str(tmp_path / "run.toml")]
    args += ["--rank", "7", "--weights", "uniform", "--group", "shape", "--no-final-evaluation"]
    args += ["--scheme", "ditto", "--prox", "0.5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = seen["c"]
    assert (config.schedule.rounds, config.training.lr, config.compression.rank) == (5, 0.01, 7)
    assert (config.compression.weights, config.compression.group) == ("uniform", "shape")
    assert config.evaluation.final_evaluation is False and config.run_dir == str(tmp_path / "run")
    # --print-config writes what the flags and the file made, as a file --config reads back
    result = CliRunner().invoke(app, [*args, "--print-config"])
    assert result.exit_code == 0, result.output
    (tmp_path / "printed.toml").write_text(result.output)
    printed = tomllib.loads(result.output)
    assert (printed["rounds"], printed["compress-rank"], printed["lr"]) == (5, 7, 0.01)
    again = ["simulate", "--out", str(tmp_path / "run"), "--config", str(tmp_path / "printed.toml")]
    seen.clear()
    assert CliRunner().invoke(app, again).exit_code == 0
    assert seen["c"] == config  # the printed file alone makes the same run
    # ... and so does `flwr run . --run-config` with those keys (Flower's run config)
    assert FederationConfig.from_run_config(printed) == config
    assert (config.scheme.name, config.scheme.prox) == ("ditto", 0.5)
    compression = config.compression_config()
    assert (compression.rank, compression.weights, compression.group) == (7, "uniform", "shape")
    assert config.data == FederationConfig().data  # untouched: the defaults


def test_the_sections_nest_every_setting_once_and_flatten_only_for_the_run_config():
    """Each setting lives in one section (or at the top), under one flat key; the flat run
    config round-trips, and a run folder's flat run.json from before the sections loads."""
    assert set(SECTIONS) == {
        "data",
        "schedule",
        "scheme",
        "robust",
        "privacy",
        "training",
        "emulator",
        "compression",
        "evaluation",
    }
    nested = sum(len(fields(kind)) for kind in SECTIONS.values())
    assert nested + len(fields(FederationConfig)) - len(SECTIONS) == len(FIELDS) == 70
    config = FederationConfig(
        seed=3,
        training=ClientTraining(local_steps=5, lora_rank=4),
        emulator=EmulatorSettings(path="emu", drop=0.25),
        scheme=SchemeSettings(name="ditto", prox=0.3),
    )
    flat = config.to_run_config()
    assert (flat["local-steps"], flat["lora-rank"], flat["emulator"], flat["drop"]) == (
        5,
        4,
        "emu",
        0.25,
    )
    assert (flat["scheme"], flat["prox"], flat["seed"]) == ("ditto", 0.3, 3)
    assert FederationConfig.from_run_config(flat) == config
    assert FederationConfig.from_run_config(config.flat()) == config  # run.json's `_` keys
    # a setting's key, not its name in its section, is what the run config knows
    with pytest.raises(ValueError, match="unknown key 'path'"):
        FederationConfig.from_run_config({"path": "emu"})
    old = {"aggregation": "fedavg", "tracking": False, "compress_rank": 4, "local_steps": "3"}
    upgraded = FederationConfig.from_run_config(old)
    assert (upgraded.scheme.name, upgraded.log_to, upgraded.compression.rank) == (
        "fedavg-ft",
        "none",
        4,
    )
    assert upgraded.training.local_steps == 3  # coerced to the field's type
    # a knob the clients' training or the data reading also holds has its home there
    from soppu.data import DataOptions
    from soppu.train_config import TrainConfig

    for key, (home, name) in {
        "batch_size": (TrainConfig, "batch_size"),
        "lora_rank": (TrainConfig, "rank"),
        "lora_layers": (TrainConfig, "lora_layers"),
        "user_column": (DataOptions, "user_column"),
        "test_fraction": (DataOptions, "test_fraction"),
    }.items():
        theirs = next(f for f in fields(home) if f.name == name)
        assert (FIELDS[key].default, HELP[key]) == (theirs.default, theirs.metadata["help"])
    # every section checks its own values when made, naming the flag
    with pytest.raises(ValueError, match="serve-scales must be numbers"):
        EvaluationSettings(serve_scales="0")
    with pytest.raises(ValueError, match="correction-batches must be ≥ 0"):
        FederationConfig.from_run_config({"correction-batches": -1})
    # and where two sections meet, the config: a repair is kept on validation text only
    with pytest.raises(ValueError, match=r"repair-steps.*validation-fraction > 0"):
        FederationConfig.from_run_config({"repair-steps": 40, "validation-fraction": 0})
    with pytest.raises(ValueError, match=r"repair-for pass.*personal-pass > 0"):
        FederationConfig.from_run_config({"repair-steps": 40, "repair-for": "pass"})


def test_the_config_checks_against_the_modules_that_own_the_choices():
    from soppu.emulator import SELECTIONS
    from soppu.train_config import LORA_LAYERS

    with pytest.raises(ValueError, match="lora-layers must be one of"):
        ClientTraining(lora_layers="some")
    with pytest.raises(ValueError, match="layer-select must be one of"):
        EmulatorSettings(layer_select="random")
    for value in LORA_LAYERS:
        ClientTraining(lora_layers=value)
    for value in SELECTIONS:
        EmulatorSettings(layer_select=value)
    with pytest.raises(ValueError, match="threads must be ≥ 0"):
        FederationConfig(threads=-1)
    from soppu.server.config import SCHEMES
    from soppu.server.schemes import SCHEMES as IMPLEMENTED

    assert set(SCHEMES) == set(IMPLEMENTED)
    with pytest.raises(ValueError, match="scheme must be one of"):
        SchemeSettings(name="fedavg")
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="prox must be finite"):
            SchemeSettings(prox=bad)
    # A run folder from before `scheme` names it by its old setting.
    assert FederationConfig.from_run_config({"aggregation": "none"}).scheme.name == "local"
    assert FederationConfig.from_run_config({"aggregation": "fedavg"}).scheme.name == "fedavg-ft"


def test_personalize_takes_every_training_setting_from_train_config():
    from soppu.cli import personal
    from soppu.train_config import TRAIN_FLAGS, TRAIN_HELP, TrainConfig

    command = typer.main.get_command(app).commands["personalize"]
    options = {p.name: p for p in command.params}
    assert set(TRAIN_HELP) == {f.name for f in fields(TrainConfig)}
    for field in fields(TrainConfig):
        option = options[TRAIN_FLAGS.get(field.name, field.name)]
        assert option.default is None  # unset: TrainConfig's own default, or the mode's
        if field.name in personal.MODE_HELP:  # the client mode's targets and layers
            assert "client mode's" in option.help
        elif field.default is not None:
            assert option.help.endswith(f"[default: {field.default}]"), option.help
    assert options["alpha"].help.startswith("dirichlet")  # the data's alpha, not LoRA's


def test_emulator_build_takes_its_recipe_from_the_federation_config():
    from soppu.alignment import AlignConfig
    from soppu.cli import personal
    from soppu.emulator import EmulatorPlan

    group = typer.main.get_command(app).commands["emulator"]
    options = {p.name: p for p in group.commands["build"].params}
    simulate = simulate_options()
    for name in personal.RECIPE_SETTINGS:  # the same flag, help and default as the federation's
        assert options[name].opts == simulate[name].opts
        assert options[name].help == simulate[name].help and options[name].default is None
    # ... and the federation's defaults are the emulator's and the alignment's own
    defaults, plan, align = FederationConfig(), EmulatorPlan(30), AlignConfig()
    emulator, training = defaults.emulator, defaults.training
    assert (emulator.top, plan.top) == (0, 8)  # 0: EXACT_TOP, a third of a smaller model
    assert (emulator.bottom, emulator.drop) == (plan.bottom, plan.drop)
    assert emulator.layer_select == plan.select and defaults.align_steps() == align.steps
    assert (training.batch_size, training.seq_len) == (align.batch_size, align.seq_len)
    assert align.lr == personal.ALIGN_LR
    # an unset flag is the default, a set one wins
    assert personal._recipe(dict.fromkeys(personal.RECIPE_SETTINGS) | {"top": 3})["top"] == 3
    assert personal._recipe(dict.fromkeys(personal.RECIPE_SETTINGS))["drop"] == plan.drop


def test_each_client_mode_trains_its_measured_recipe_unless_one_is_given():
    for mode, recipe in MODE_RECIPES.items():
        train = FederationConfig(client_mode=mode).train()
        assert (train.lr, train.lr_scheduler_type) == (recipe.lr, recipe.schedule)
        assert (train.target_modules, train.lora_layers) == (recipe.targets, "all")
    # the emulator's and split mode's LoRA: every projection of every layer the client holds
    assert MODE_RECIPES["emulator"].targets == ("all-linear",) != MODE_RECIPES["full"].targets
    training = ClientTraining(
        lr=2e-3, lr_scheduler_type="cosine", target_modules="q_proj", lora_layers="adapter"
    )
    given = FederationConfig(client_mode="emulator", training=training).train()
    assert (given.lr, given.lr_scheduler_type) == (2e-3, "cosine")
    assert (given.target_modules, given.lora_layers) == (("q_proj",), "adapter")
    with pytest.raises(ValueError, match="lr scheduler 'warmup'"):
        FederationConfig(training=ClientTraining(lr_scheduler_type="warmup"))


def test_alignment_steps_are_the_public_texts_own_unless_given():
    from soppu.alignment import AlignConfig
    from soppu.server.config import DataSettings

    own_data = DataSettings(source="users.jsonl")
    # the embedded users align on their pool for AlignConfig's steps; anyone's own data on the
    # full model's generated text for four times as many (experiments/align_curve.py)
    assert FederationConfig().public_source() == "pool"
    assert FederationConfig().align_steps() == AlignConfig().steps == 60
    assert FederationConfig(data=own_data).public_source() == "generated"
    assert FederationConfig(data=own_data).align_steps() == 240
    for public, steps in (("pool", 60), ("generated", 240), ("public.jsonl", 60)):
        emulator = EmulatorSettings(public=public)
        assert FederationConfig(data=own_data, emulator=emulator).align_steps() == steps
    for given in (0, 7, 240):  # a number given is the number used, 0 (unaligned) included
        emulator = EmulatorSettings(align_steps=given)
        assert FederationConfig(data=own_data, emulator=emulator).align_steps() == given
        assert FederationConfig(emulator=emulator).align_steps() == given
    with pytest.raises(ValueError, match="align-steps must be ≥ 0, or -1"):
        EmulatorSettings(align_steps=-2)


def test_personalize_and_emulator_build_align_for_the_public_texts_own_steps(monkeypatch):
    import soppu.alignment
    from soppu.alignment import AlignConfig
    from soppu.cli import personal
    from soppu.emulator import EmulatorPlan
    from soppu.public import SOURCE_STEPS

    asked = []
    monkeypatch.setattr(personal, "_public", lambda *_: ["text"])
    monkeypatch.setattr(
        soppu.alignment, "build_aligned", lambda *a: asked.append(a[5].steps) or ("emu", "info")
    )
    base = type("Base", (), {"model": None, "tokenizer": None, "name": "m"})()
    plan = EmulatorPlan(30)
    for public, given, steps in (
        ("generated", SOURCE_STEPS, 240),
        ("pool", SOURCE_STEPS, 60),
        ("", SOURCE_STEPS, 60),  # emulator build's default: the pool
        ("generated", 12, 12),
        ("generated", 0, 0),
    ):
        personal._build_emulator(base, plan, public, AlignConfig(steps=given))
        assert asked.pop() == steps
