"""`soppu simulate`: a federation on Flower's simulation engine, one virtual node per user.

Config: FederationConfig's defaults → a TOML file of run-config keys (`--config`) → flags;
the flags are derived from FederationConfig's fields and their help (soppu/server/config.py).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.table import Table

from soppu.cli.common import (
    clear_errors,
    console,
    keyword_option,
    print_report,
    setting_option,
    shown,
    with_signature,
)
from soppu.server.config import FIELDS, HELP, flag


def register(app: typer.Typer) -> None:
    app.command("simulate")(_simulate_command())


def _simulate_command() -> Callable[..., None]:
    """`soppu simulate`, its flags derived from `FederationConfig` (name, default, help): a
    flag left out keeps the run's, the --config file's or the config's default, in that order."""

    def simulate(
        config_file: Path | None = None,
        resume: bool = False,
        re_evaluate: bool = False,
        client_cpus: float = 1.0,
        print_config: bool = False,
        **settings: Any,
    ) -> None:
        """Run a simulated federation: train every user's LoRA, compress, publish and report."""
        from soppu.server.prepare_run import load_config

        overrides = {k: v for k, v in settings.items() if v is not None}
        overrides.setdefault("run_dir", FIELDS["run_dir"].default)
        with clear_errors():
            config = load_config(overrides, config_file=config_file, resume=resume)
            if print_config:  # plain text, so that it can be redirected into a --config file
                sys.stdout.write(config.to_toml())
                return
            _simulate(config, resume, re_evaluate, client_cpus)
        _print_results(Path(config.run_dir))

    own = [
        keyword_option(
            "config_file", Path | None, None, "--config", help="TOML of run-config keys."
        ),
        keyword_option(
            "resume", bool, False, "--resume/--no-resume", help="Continue the run in --out."
        ),
        keyword_option(
            "re_evaluate",
            bool,
            False,
            "--re-evaluate",
            help="With --resume on a finished run: evaluate it again (else nothing is done).",
        ),
        keyword_option(
            "client_cpus", float, 1.0, "--client-cpus", help="CPUs per simulated client."
        ),
        keyword_option(
            "print_config",
            bool,
            False,
            "--print-config",
            help="Print the run config these flags and --config make, as TOML, and stop.",
        ),
    ]
    derived = [
        setting_option(f, flag(key), HELP[key], *(["-o"] if key == "run_dir" else []), name=key)
        for key, f in FIELDS.items()
    ]
    return with_signature(simulate, [*own, *derived])


def _simulate(config, resume: bool, re_evaluate: bool, client_cpus: float) -> None:
    from soppu import api

    api.simulate(
        config,
        resume=resume,
        re_evaluate=re_evaluate,
        client_cpus=client_cpus,
        log=lambda line: console.print(line, highlight=False),
    )


def _print_results(root: Path) -> None:
    from soppu.server.store import RunFolder
    from soppu.server.versions import ServingVersion, Versions

    run = RunFolder(root)
    state = run.state()
    serving = Versions(run.serving).current_link
    current = ServingVersion(serving)
    report = current.report / "report.json"
    if report.is_file():
        print_report(json.loads(report.read_text()))
    if run.evaluation.is_file():  # its summary lines the server has just logged
        print_evaluation(json.loads(run.evaluation.read_text()), summary=False)
    console.print(f"rounds done: {state['round']}; adapters: [bold]{shown(run.store)}[/]")
    console.print(
        f"serving version: [bold]{shown(serving.resolve())}[/] "
        f"({shown(serving)} → {state.get('serving')})"
    )
    console.print(
        f"report: [bold]{shown(current.report)}[/]; "
        f"per-user table: {shown(run.evaluation.with_suffix('.md'))}"
    )


def print_evaluation(result: dict[str, Any], summary: bool = True) -> None:
    from soppu.server.evaluation import summary_lines

    # Fits 80 columns (any log): a light box, one-decimal perplexities, short headers
    # explained in the caption; a long user id folds instead of squeezing the numbers.
    table = Table(
        title="held-out perplexity per user (full model unless said)",
        title_justify="left",
        caption="emu+own: own adapter on the client's model; pub: what is served, published; "
        "gain: served over base, with its paired 95% interval",
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        show_edge=False,
    )
    keys = {
        "base": "base",
        "global": "global",
        "emulator": "emu+own",
        "personal": "own",
        "compressed": "pub",
    }
    if all(row["global"] is None for row in result["users"]):
        keys.pop("global")  # no averaging in this run
    table.add_column("user", overflow="fold", min_width=12, ratio=1)
    for label in keys.values():
        table.add_column(label, justify="right", no_wrap=True)
    table.add_column("served", no_wrap=True)
    table.add_column("gain [95%]", justify="right", no_wrap=True)
    for row in result["users"]:
        gain = row["gains"].get("served_over_base")
        table.add_row(
            row["user"],
            *("–" if row[k] is None else f"{row[k]:.1f}" for k in keys),
            row["served"],
            _gain_cell(gain),
        )
    console.print(table)
    for line in summary_lines(result["summary"]) if summary else []:
        console.print(line, highlight=False)


def _gain_cell(gain: dict[str, Any] | None) -> str:
    """The served gain with its interval, coloured by the verdict."""
    from soppu.server.evaluation import gain_text

    colour = {"better": "green", "worse": "red"}.get(gain["verdict"] if gain else "", "")
    text = gain_text(gain)
    return f"[{colour}]{text}[/]" if colour else text
