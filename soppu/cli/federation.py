"""`soppu simulate`: a federation on Flower's simulation engine, one virtual node per user.

Config: FederationConfig's defaults → a TOML file of run-config keys (`--config`) → flags.
Registered on the main app by soppu/cli.py, which is the one place allowed to wire the
clients and the server together.
"""

from __future__ import annotations

import json
import logging
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from soppu.cli.common import clear_errors, console, print_report, shown

Opt = typer.Option


def register(app: typer.Typer) -> None:
    app.command()(simulate)


def simulate(
    out: Annotated[Path, Opt("--out", "-o", help="Run folder.")] = Path("runs/federation"),
    config_file: Annotated[
        Path | None, Opt("--config", help="TOML of run-config keys (as in pyproject.toml).")
    ] = None,
    resume: Annotated[bool, Opt(help="Continue the run in --out from its last round.")] = False,
    base_model: Annotated[str | None, Opt(help="HF id or folder (default: SmolLM2-135M).")] = None,
    data: Annotated[str | None, Opt(help="Users' text (default: Shakespeare roles).")] = None,
    users: Annotated[int | None, Opt(help="Users (nodes): those with most text; 0: all.")] = None,
    rounds: Annotated[int | None, Opt(help="Federated rounds.")] = None,
    fraction_train: Annotated[float | None, Opt(help="Share of users trained a round.")] = None,
    min_train_nodes: Annotated[int | None, Opt(help="At least this many a round.")] = None,
    fraction_evaluate: Annotated[
        float | None, Opt(help="Share evaluated on the emulator each round.")
    ] = None,
    round_timeout: Annotated[float | None, Opt(help="Seconds a round waits.")] = None,
    aggregation: Annotated[
        str | None,
        Opt(help="fedavg: a global adapter + a personal one per user; none: purely local."),
    ] = None,
    client_mode: Annotated[
        str | None, Opt(help="emulator (clients never hold the full model) or full.")
    ] = None,
    local_steps: Annotated[int | None, Opt(help="Client training steps per round.")] = None,
    lr: Annotated[float | None, Opt(help="Client learning rate.")] = None,
    batch_size: Annotated[int | None, Opt(help="Sequences per step.")] = None,
    seq_len: Annotated[int | None, Opt(help="Tokens per sequence.")] = None,
    lora_rank: Annotated[int | None, Opt(help="LoRA rank.")] = None,
    lora_alpha: Annotated[float | None, Opt(help="LoRA α.")] = None,
    target_modules: Annotated[
        str | None, Opt(help="LoRA targets, comma-separated (default: q_proj,v_proj).")
    ] = None,
    lora_layers: Annotated[
        str | None, Opt(help="all: every layer the client's model has; adapter: top/bottom.")
    ] = None,
    correction_batches: Annotated[
        int | None, Opt(help="Public batches for each round's gradient correction (0: off).")
    ] = None,
    max_eval_tokens: Annotated[int | None, Opt(help="Held-out tokens per user.")] = None,
    emulator: Annotated[str | None, Opt(help="Emulator folder (default: build, cached).")] = None,
    drop: Annotated[float | None, Opt(help="Emulator drop ratio.")] = None,
    top: Annotated[int | None, Opt(help="Adapter: the last N layers.")] = None,
    bottom: Annotated[int | None, Opt(help="Adapter: also the first N layers.")] = None,
    layer_select: Annotated[
        str | None, Opt(help="Middle layers the emulator keeps: importance or even.")
    ] = None,
    align_steps: Annotated[int | None, Opt(help="Emulator alignment steps.")] = None,
    public: Annotated[
        str | None, Opt(help="Public text (JSONL/CSV/Parquet, 'text' column) to align on.")
    ] = None,
    compress_every: Annotated[int | None, Opt(help="Compress every K rounds (0: last).")] = None,
    rank: Annotated[int | None, Opt(help="Compression: shared rank per slot.")] = None,
    energy: Annotated[float | None, Opt(help="Compression: energy kept (if no --rank).")] = None,
    sigma: Annotated[str | None, Opt(help="Compression: full or diag cores.")] = None,
    bits: Annotated[int | None, Opt(help="Compression: 32, or 8/4 (quantised storage).")] = None,
    clusters: Annotated[int | None, Opt(help="Compression: bases per slot (0: choose).")] = None,
    export_rank: Annotated[int | None, Opt(help="Serving rank (0: exact).")] = None,
    min_chars: Annotated[int | None, Opt(help="Skip users with less text.")] = None,
    seed: Annotated[int | None, Opt()] = None,
    final_evaluation: Annotated[
        bool | None, Opt(help="Per-user perplexities on the full model after the run.")
    ] = None,
    client_cpus: Annotated[float, Opt(help="CPUs per simulated client.")] = 1.0,
    client_gpus: Annotated[
        float | None, Opt(help="GPUs per simulated client; > 0: clients train on CUDA.")
    ] = None,
    device: Annotated[
        str | None, Opt(help="Server device: alignment, corrections, evaluation, compression.")
    ] = None,
    threads: Annotated[
        int | None, Opt(min=1, help="torch threads on the server (default: all).")
    ] = None,
) -> None:
    """Run a simulated federation: train every user's LoRA, compress, publish and report."""
    flags = {k: v for k, v in locals().items() if v is not None}
    aliases = {
        "rank": "compress_rank",
        "energy": "compress_energy",
        "sigma": "compress_sigma",
        "bits": "compress_bits",
        "clusters": "compress_clusters",
    }
    overrides = {aliases.get(k, k): v for k, v in flags.items() if k not in _NOT_CONFIG}
    overrides["run_dir"] = str(out)
    with clear_errors():
        config = _config(config_file, overrides, resume)
        _simulate(config, resume, client_cpus)
    _print_results(Path(config.run_dir))


_NOT_CONFIG = {"out", "config_file", "resume", "client_cpus"}


def _config(config_file: Path | None, overrides: dict[str, Any], resume: bool):
    from server.config import FederationConfig
    from server.prepare_run import stored_config
    from server.store import RunFolder

    run = RunFolder(Path(overrides["run_dir"]))
    if resume and run.run_json.is_file():
        values = stored_config(run).to_run_config()
    elif config_file is not None:
        values = _read_toml(config_file)
    else:
        values = {}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    return FederationConfig.from_run_config({**values, **overrides})


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the config ({exc})") from None
    return data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", data)


def _simulate(config, resume: bool, client_cpus: float) -> None:
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation

    from clients.client_app import app as client_app
    from server.prepare_run import choose_users, resolve_config
    from server.server_app import server_app
    from server.store import RunFolder
    from soppu.basemodel import quiet_libraries

    quiet_libraries()
    logging.getLogger("flwr").addFilter(_NoRunSimulationDeprecation())
    config = resolve_config(config, resume=resume)  # refuses a bad resume before Ray starts
    nodes = len(choose_users(config))
    console.print(
        f"simulating [bold]{nodes}[/] users × {config.rounds} rounds → "
        f"[bold]{shown(config.run_dir)}[/]"
    )
    run_simulation(
        server_app(config, resume=resume, log=lambda line: console.print(line, highlight=False)),
        client_app,
        num_supernodes=nodes,
        backend_config={
            "client_resources": {"num_cpus": client_cpus, "num_gpus": config.client_gpus},
            "init_args": {"logging_level": "ERROR", "log_to_driver": False},
        },
    )
    if not RunFolder(Path(config.run_dir)).state_file.is_file():
        raise RuntimeError(f"the federation in {config.run_dir} stopped before any round")


class _NoRunSimulationDeprecation(logging.Filter):
    """`run_simulation` is what lets one command run the apps in-process with a config of its
    own; `flwr run .` is the documented alternative, so its deprecation notice is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            str(record.msg).startswith("DEPRECATED FEATURE")
            and "run_simulation" in str(record.args)
        )


def _print_results(root: Path) -> None:
    from server.store import RunFolder
    from server.versions import Versions

    run = RunFolder(root)
    state = run.state()
    serving = Versions(run.serving).current_link
    report = serving / "report" / "report.json"
    if report.is_file():
        print_report(json.loads(report.read_text()))
    if run.evaluation.is_file():
        print_evaluation(json.loads(run.evaluation.read_text()))
    console.print(f"rounds done: {state['round']}; adapters: [bold]{shown(run.store)}[/]")
    console.print(
        f"serving version: [bold]{shown(serving.resolve())}[/] "
        f"({shown(serving)} → {state.get('serving')})"
    )
    console.print(
        f"report: [bold]{shown(serving / 'report')}[/]; "
        f"per-user table: {shown(run.evaluation.with_suffix('.md'))}"
    )


def print_evaluation(result: dict[str, Any]) -> None:
    from server.evaluation import summary_lines

    table = Table(
        title="held-out perplexity per user (full model unless said)", title_justify="left"
    )
    keys = {
        "base": "base",
        "global": "global",
        "emulator": "emulator+own",
        "personal": "own",
        "compressed": "compressed",
    }
    kept = {"kept": "kept", "kept_over_global": "kept over global"}
    if all(row["global"] is None for row in result["users"]):
        keys.pop("global")  # no averaging in this run
        kept.pop("kept_over_global")
    table.add_column("user", overflow="fold", min_width=12)
    for label in [*keys.values(), *kept.values()]:
        table.add_column(label, justify="right", no_wrap=True)
    for row in result["users"]:
        table.add_row(
            row["user"],
            *("–" if row[k] is None else f"{row[k]:.2f}" for k in keys),
            *("–" if row[k] is None else f"{row[k]:.1%}" for k in kept),
        )
    console.print(table)
    for line in summary_lines(result["summary"]):
        console.print(line, highlight=False)
