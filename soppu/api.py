"""SOPPU as Python functions: the whole pipeline, each step's result in memory.

The `soppu` command wraps these; a notebook or a script calls them directly:

    from soppu import api

    data = api.DataSettings(source="users.jsonl", users=8)
    run = api.simulate(api.FederationConfig(run_dir="runs/mine", data=data))
    run.evaluation["summary"]["compressed_gain_median"]   # the median served gain
    manifest = api.compress(["adapters/"], "store", api.CompressionConfig(energy=0.9))
    version = api.publish("store", "serving")             # a ServingVersion
    version.users(), version.user_dir("alice")            # plain PEFT dirs

Like `soppu/cli/`, this module is an entry point: it may import every package, and nothing
in `compression/`, `server/`, `clients/` or the rest of `soppu/` imports it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soppu.compression import CompressionConfig
from soppu.server.compressed_store import CompressedStore
from soppu.server.config import (
    CentralDP,
    ClientTraining,
    CompressionSettings,
    DataSettings,
    EmulatorSettings,
    EvaluationSettings,
    FederationConfig,
    RobustMean,
    RoundSchedule,
    SchemeSettings,
)
from soppu.server.store import RunFolder
from soppu.server.versions import ServingVersion

__all__ = [
    "CentralDP",
    "ClientTraining",
    "CompressedStore",
    "CompressionConfig",
    "CompressionSettings",
    "DataSettings",
    "EmulatorSettings",
    "EvaluationSettings",
    "FederationConfig",
    "RobustMean",
    "RoundSchedule",
    "Run",
    "SchemeSettings",
    "ServingVersion",
    "add",
    "compress",
    "compress_run",
    "evaluate",
    "publish",
    "report",
    "simulate",
]

Log = Callable[[str], None]
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Run:
    """A finished (or stopped) federation: its folder and, after the final evaluation, each
    user's perplexities, served choice and paired intervals (`evaluation.json`)."""

    folder: RunFolder
    evaluation: dict[str, Any] | None

    @property
    def serving(self) -> ServingVersion:
        """The version its users are served from now."""
        from soppu.server.versions import Versions

        return ServingVersion(Versions(self.folder.serving).require_current())


def simulate(
    config: FederationConfig,
    *,
    resume: bool = False,
    re_evaluate: bool = False,
    client_cpus: float = 1.0,
    log: Log = print,
) -> Run:
    """Run a federation on Flower's simulation engine, one virtual node per user: every user
    trains their LoRA, the server keeps every adapter, compresses, publishes and evaluates.
    Resuming a finished run does nothing but say so; with `re_evaluate`, it evaluates again."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation

    from soppu.basemodel import quiet_libraries
    from soppu.clients.client_app import app as client_app
    from soppu.server.prepare_run import choose_users, resolve_config
    from soppu.server.server_app import server_app

    quiet_libraries()
    logging.getLogger("flwr").addFilter(_NoRunSimulationDeprecation())
    if re_evaluate and not resume:
        raise ValueError("--re-evaluate evaluates a finished run again: it needs --resume")
    config = resolve_config(config, resume=resume)  # refuses a bad resume before Ray starts
    folder = RunFolder(Path(config.run_dir))
    if resume and (done := _finished(folder, config)):
        if not re_evaluate:
            log(f"{done}; nothing to do (--re-evaluate evaluates it again)")
            return Run(folder, _read_json(folder.evaluation))
        log(f"{done}; evaluating it again")
        return Run(folder, evaluate(folder.root, log=log))
    nodes = len(choose_users(config))
    log(f"simulating {nodes} users × {config.schedule.rounds} rounds → {config.run_dir}")
    run_simulation(
        server_app(config, resume=resume, log=log),
        client_app,
        num_supernodes=nodes,
        backend_config={
            "client_resources": {"num_cpus": client_cpus, "num_gpus": config.client_gpus},
            "init_args": {"logging_level": "ERROR", "log_to_driver": False},
        },
    )
    folder = RunFolder(Path(config.run_dir))
    if not folder.state_file.is_file():
        raise RuntimeError(f"the federation in {config.run_dir} stopped before any round")
    return Run(folder, _read_json(folder.evaluation))


def _finished(folder: RunFolder, config: FederationConfig) -> str:
    """What a finished run did ('' while there is more to do): every round trained,
    compressed and published, and evaluated where the config asks for it."""
    state = folder.state() if folder.state_file.is_file() else {}
    done = (
        state.get("round", 0) >= config.schedule.rounds
        and state.get("compressed_round") == state.get("round")
        and bool(state.get("serving"))
        and (folder.evaluation.is_file() or not config.evaluation.final_evaluation)
    )
    return (
        f"{folder.root} is finished: {state['round']} rounds, serving {state['serving']}"
        if done
        else ""
    )


def compress(
    inputs: Sequence[str | Path] | Mapping[str, str | Path],
    out: str | Path,
    config: CompressionConfig,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Jointly compress PEFT adapter dirs into the store `out`; returns its manifest. `inputs`:
    user → dir, or dirs and folders of them (each user named by their dir)."""
    from soppu.server.compress_store import compress_adapters

    paths, given = _adapter_paths(inputs)
    return compress_adapters(
        paths, Path(out), config, progress=progress, replace=overwrite, source={"inputs": given}
    )


def add(
    store: str | Path,
    inputs: Sequence[str | Path] | Mapping[str, str | Path],
    out: str | Path,
    *,
    refit_above: float | None = None,
    originals: Sequence[str | Path] | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """`store` with new users put onto its bases (a slot they drift from past `refit_above`
    is refit, from the old users' `originals` or the adapters the store recorded) written to
    `out`; returns the new manifest."""
    from soppu.server.add_users import add_adapters

    paths, _ = _adapter_paths(inputs)
    return add_adapters(
        Path(store),
        paths,
        Path(out),
        refit_above=refit_above,
        originals=_adapter_paths(originals)[0] if originals else None,
        progress=progress,
        replace=overwrite,
    )


def publish(
    store: str | Path,
    serving: str | Path,
    *,
    export_rank: int | None = None,
    num_layers: int | None = None,
    progress: Progress | None = None,
) -> ServingVersion:
    """Write the next serving version of `store` (one PEFT dir per user) and switch `current`
    to it."""
    from soppu.server.publish import publish as publish_store

    return ServingVersion(
        publish_store(
            Path(store),
            Path(serving),
            export_rank=export_rank,
            num_layers=num_layers,
            progress=progress,
        )
    )


def compress_run(
    run: str | Path, config: CompressionConfig | None = None, *, export_rank: int | None = None
) -> ServingVersion:
    """A compression round for every user of a federation's store (stopped or running), with
    the run's own compression settings unless `config` is given; returns the new version."""
    from soppu.server.compression_round import compress_run as compress_round
    from soppu.server.prepare_run import stored_config

    folder = RunFolder(Path(run))
    settings = stored_config(folder)
    _, version = compress_round(
        folder,
        config or settings.compression_config(),
        export_rank=export_rank or settings.compression.export_rank or None,
        incremental=False,
    )
    return ServingVersion(version)


def evaluate(run: str | Path, *, log: Log = print) -> dict[str, Any]:
    """Evaluate a run's users again on the full model (what `simulate` does at its end):
    base, global, personal and published adapters, with paired intervals."""
    from soppu.server.evaluation import evaluate_run
    from soppu.server.prepare_run import choose_users, load_base, stored_config

    folder = RunFolder(Path(run))
    config = stored_config(folder)
    base = load_base(config)
    return evaluate_run(
        folder,
        base.model,
        base.tokenizer,
        choose_users(config),
        config.judge(),
        lambda user, done, total: log(f"evaluate [{done + 1}/{total}] {user}"),
    )


def report(path: str | Path) -> dict[str, Any]:
    """The per-layer reconstruction-error report of a store, a serving version or a serving
    dir (its current version), as `report.json` holds it."""
    source = report_dir(Path(path))
    try:
        data = json.loads((source / "report.json").read_text())
        missing = [key for key in ("slots", "modules", "totals") if key not in data]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{source / 'report.json'}: not a SOPPU report ({exc})") from None
    if missing:
        raise ValueError(f"{source / 'report.json'}: not a SOPPU report (no {missing[0]!r})")
    return data


def write_report(data: dict[str, Any], target: str | Path) -> list[Path]:
    """Render `data` (a report) into `target`'s JSON, CSV, Markdown and PNG files, each
    replaced whole: they are rendered in a scratch folder beside `target` first, so a full or
    read-only disk leaves what was there, and nothing else in `target` is touched."""
    import os

    from soppu import atomic
    from soppu.compression.report import write_report as render

    target = Path(target)
    with atomic.scratch_dir(target.parent, target.name) as scratch:
        rendered = render(data, scratch)
        target.mkdir(exist_ok=True)
        for file in rendered:
            os.replace(file, target / file.name)
    return [target / file.name for file in rendered]


def report_dir(path: Path) -> Path:
    """Where `path`'s report is: its report/, its current version's, its newest version's
    (a folder of versions such as a run's compressed/), a run's served version's, or `path`
    itself: whatever `soppu inspect` describes."""
    from soppu.server.versions import Versions

    newest = Versions(path).newest()
    candidates = [path / "report", path / "current" / "report", path]
    candidates += [newest / "report"] if newest else []
    candidates += [RunFolder(path).serving / "current" / "report"]
    for candidate in candidates:
        if (candidate / "report.json").is_file():
            return candidate
    raise ValueError(
        f"{path}: no report.json (expected a store, a serving dir, a version or a run)"
    )


def _adapter_paths(
    inputs: Sequence[str | Path] | Mapping[str, str | Path],
) -> tuple[dict[str, Path], list[str]]:
    from soppu.adapter_sets import discover

    if isinstance(inputs, Mapping):
        paths = {user: Path(p) for user, p in inputs.items()}
        return paths, [str(p) for p in paths.values()]
    return discover([Path(p) for p in inputs]), [str(p) for p in inputs]


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


class _NoRunSimulationDeprecation(logging.Filter):
    """`run_simulation` is what lets one call run the apps in-process with a config of its
    own; `flwr run .` is the documented alternative, so its deprecation notice is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            str(record.msg).startswith("DEPRECATED FEATURE")
            and "run_simulation" in str(record.args)
        )
