"""`soppu synth`, `compress`, `add`, `publish`, `report`, `inspect` and `demo`: adapters in,
compressed stores and serving versions out."""

from __future__ import annotations

import json
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from click.core import ParameterSource

if TYPE_CHECKING:
    from soppu.compression.compress import CompressionConfig

from soppu.cli.common import (
    ThreadsOpt,
    clear_errors,
    console,
    print_report,
    progress_bar,
    set_threads,
    shown,
)
from soppu.compression.methods import HELP as METHOD_HELP
from soppu.compression.methods import METHODS

Sigma = StrEnum("Sigma", {name: name for name in METHODS})  # one choice per method
SIGMA_DEFAULT = Sigma("full")
SIGMA_HELP = f"Per-user core (the compression method): {METHOD_HELP}"


class Group(StrEnum):
    slot = "slot"
    shape = "shape"


class Weights(StrEnum):
    uniform = "uniform"
    norm = "norm"


class Structure(StrEnum):
    shared = "shared"
    random = "random"


def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write one PEFT adapter dir per user.")],
    users: Annotated[int, typer.Option(help="Number of users.")] = 16,
    layers: Annotated[int, typer.Option(help="Decoder layers (q_proj, v_proj each).")] = 30,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank k.")] = 8,
    structure: Annotated[Structure, typer.Option(help="shared: realistic; random: hard.")] = (
        Structure.shared
    ),
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Write seeded synthetic per-user adapters with SmolLM2-135M's q/v shapes."""
    from soppu.synthetic import PopulationSpec, write_population

    spec = PopulationSpec(users, layers, rank=lora_rank, structure=structure.value, seed=seed)
    with clear_errors():
        paths = write_population(spec, out)
    console.print(f"wrote {len(paths)} adapters to [bold]{shown(out)}[/]")


def compress(
    ctx: typer.Context,
    inputs: Annotated[
        list[Path] | None,
        typer.Argument(help="PEFT adapter dirs, or folders of them (id = dir name)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Compressed store to write.")
    ] = None,
    run: Annotated[
        Path | None,
        typer.Option(
            help="Instead: a federation's run folder (stopped or running); writes "
            "RUN/compressed/vNNNN and publishes RUN/serving/vNNNN."
        ),
    ] = None,
    export_rank: Annotated[
        int | None,
        typer.Option(help="With --run: serving rank (8..128); default: the run's (exact)."),
    ] = None,
    rank: Annotated[int | None, typer.Option(help="Shared rank r per slot (may exceed k).")] = None,
    energy: Annotated[
        float | None,
        typer.Option(
            help="Else: smallest r per slot keeping this energy share (default 0.9; with --run "
            "the run's own compression settings, which any of these flags override)."
        ),
    ] = None,
    max_error: Annotated[
        float | None, typer.Option(help="Else: weighted relative error target (energy 1−e²).")
    ] = None,
    sigma: Annotated[Sigma, typer.Option(help=SIGMA_HELP)] = SIGMA_DEFAULT,
    bits: Annotated[
        int, typer.Option(help="32, or 8/4: bases and cores stored as codes with column scales.")
    ] = 32,
    clusters: Annotated[
        int,
        typer.Option(
            help="Bases per slot, users assigned to the one that holds them best; 0: choose "
            "1–4 per slot where more do better at one basis's storage."
        ),
    ] = 1,
    group: Annotated[
        Group, typer.Option(help="slot: basis per (layer, module); shape: per tensor shape.")
    ] = Group.slot,
    weights: Annotated[
        Weights, typer.Option(help="uniform, or norm (1/‖D_i‖²: every user counts alike).")
    ] = Weights.uniform,
    device: Annotated[str, typer.Option(help="cpu or cuda (or cuda:N).")] = "cpu",
    tol: Annotated[
        float, typer.Option(min=1e-12, max=1, help="Stop when an iteration gains < tol·energy.")
    ] = 1e-5,
    max_iters: Annotated[int, typer.Option(min=1, help="Iteration cap per slot.")] = 200,
    personal_error: Annotated[
        bool, typer.Option(help="Measure the personal-part error (one dense mean per module).")
    ] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store at --out.")] = False,
    threads: ThreadsOpt = None,
) -> None:
    """Jointly compress users' LoRA adapters into shared bases and per-user cores."""
    # Long for a reason: most of its lines are the option list typer reads from the signature.
    from soppu import api
    from soppu.adapter_sets import discover
    from soppu.compression.compress import CompressionConfig

    set_threads(threads)
    with clear_errors():
        config = CompressionConfig.from_target(
            rank=rank,
            energy=energy,
            max_error=max_error,
            sigma=sigma.value,
            weights=weights.value,
            group=group.value,
            tol=tol,
            max_iters=max_iters,
            device=device,
            personal_error=personal_error,
            bits=bits,
            clusters=clusters,
        )
        if run is not None:
            if inputs or out:
                raise ValueError("give either --run RUN or INPUTS with --out, not both")
            given = {
                name
                for name in ctx.params
                if ctx.get_parameter_source(name) != ParameterSource.DEFAULT
            }
            _compress_run(run, config, export_rank, given)
            return
        if not inputs or out is None:
            raise ValueError("give INPUTS and --out (or --run RUN)")
        console.print(
            f"compressing {len(discover(inputs))} users' adapters → [bold]{shown(out)}[/]"
        )
        with progress_bar("compress") as progress:
            api.compress(inputs, out, config, overwrite=overwrite, progress=progress)
    print_report(json.loads((out / "report" / "report.json").read_text()))
    console.print(f"store: [bold]{shown(out)}[/]  report: [bold]{shown(out / 'report')}[/]")


def _compress_run(
    run: Path, asked: CompressionConfig, export_rank: int | None, given: set[str]
) -> None:
    from soppu.server.compression_round import compress_run
    from soppu.server.prepare_run import stored_config
    from soppu.server.store import RunFolder

    folder = RunFolder(run)
    if not folder.run_json.is_file():
        raise ValueError(f"{run}: not a federation run folder (no run.json)")
    stored = stored_config(folder)
    config = with_run_settings(asked, stored.compression_config(), given)
    if "export_rank" not in given:
        export_rank = stored.compression.export_rank or None
    target = f"rank {config.rank}" if config.rank else f"energy {config.energy:g}"
    console.print(
        f"compressing with {target}, {config.bits}-bit storage, sigma {config.sigma}, "
        f"{config.clusters} basis/slot (the run's settings unless a flag says otherwise)"
    )
    with progress_bar("compress") as progress:
        compressed, version = compress_run(  # what was asked for, for everyone
            folder, config, export_rank=export_rank, incremental=False, progress=progress
        )
    print_report(json.loads((compressed / "report" / "report.json").read_text()))
    console.print(
        f"store: [bold]{shown(compressed)}[/]; published [bold]{shown(version)}[/] (current)"
    )


# What a federation's run config decides about its compression rounds.
RUN_SETTINGS = ("sigma", "bits", "clusters", "weights", "group")
TARGETS = {"rank", "energy", "max_error"}


def with_run_settings(
    asked: CompressionConfig, stored: CompressionConfig, given: set[str]
) -> CompressionConfig:
    """The run's compression settings (`stored`), except where a flag was given (`asked`);
    the rank-or-energy target is one setting: any of its flags replaces the run's."""
    changes = {name: getattr(stored, name) for name in RUN_SETTINGS if name not in given}
    if not given & TARGETS:
        changes |= {"rank": stored.rank, "energy": stored.energy}
    return replace(asked, **changes)


def add(
    store: Annotated[Path, typer.Argument(help="A compressed store to add users to.")],
    inputs: Annotated[
        list[Path], typer.Argument(help="The new users' PEFT adapter dirs, or folders of them.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The new store to write.")],
    refit_above: Annotated[
        float | None,
        typer.Option(
            help="Refit a slot (full cores: warm-started from its bases) when the new users' "
            "energy outside its bases passes this share; default: never refit."
        ),
    ] = None,
    originals: Annotated[
        list[Path] | None,
        typer.Option(help="The old users' own adapters, for refits (default: as recorded)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store at --out.")] = False,
    threads: ThreadsOpt = None,
) -> None:
    """Add users to a store: their cores on its bases, their errors and the drift reported."""
    # No refit unless a slot's drift passes --refit-above: the old users' cores stay as they are.
    from soppu import api
    from soppu.adapter_sets import discover

    set_threads(threads)
    with clear_errors():
        console.print(
            f"adding {len(discover(inputs))} users to {shown(store)} → [bold]{shown(out)}[/]"
        )
        with progress_bar("add") as progress:
            manifest = api.add(
                store,
                inputs,
                out,
                refit_above=refit_above,
                originals=originals,
                progress=progress,
                overwrite=overwrite,
            )
    print_report(json.loads((out / "report" / "report.json").read_text()))
    added = manifest["added"]
    refits = added["refit_slots"]
    console.print(
        f"added {len(added['users'])} users; drift (their energy outside the bases) max "
        f"{added['drift_max']:.4f}; "
        + (f"refit {len(refits)} slots: {', '.join(refits[:6])}" if refits else "no slot refit"),
        highlight=False,
    )
    console.print(f"store: [bold]{shown(out)}[/]  report: [bold]{shown(out / 'report')}[/]")


def publish(
    store: Annotated[Path, typer.Argument(help="A compressed store (from `soppu compress`).")],
    to: Annotated[Path, typer.Option("--to", help="Serving directory (versions + current).")],
    export_rank: Annotated[
        int | None, typer.Option(help="Serving rank k' (8/16/32/64/128); default: exact.")
    ] = None,
    num_layers: Annotated[
        int | None,
        typer.Option(
            help="The base model's decoder layers; every one gets every target module (zero "
            "where a user's LoRA has none), as LoRAX needs. Default: the store's record, else "
            "one past the highest layer adapted."
        ),
    ] = None,
    threads: ThreadsOpt = None,
) -> None:
    """Write the next serving version (one PEFT dir per user) and switch `current` to it."""
    from soppu import api

    set_threads(threads)
    with clear_errors(), progress_bar("publish") as progress:
        version = api.publish(
            store, to, export_rank=export_rank, num_layers=num_layers, progress=progress
        )
    manifest = version.manifest
    exact = "exact" if manifest["export_exact"] else "truncated"
    console.print(
        f"published [bold]{shown(version.root)}[/] ({len(manifest['users'])} users, rank "
        f"{manifest['export_rank']}, {exact}); {shown(to / 'current')} → {version.root.name}"
    )


def report(
    path: Annotated[Path, typer.Argument(help="A compressed store or a serving dir/version.")],
    out: Annotated[Path | None, typer.Option(help="Where to write (default PATH/report).")] = None,
) -> None:
    """Print the per-layer reconstruction-error table; write JSON, CSV, Markdown and PNG."""
    from soppu import api

    with clear_errors():
        data = api.report(path)
        files = api.write_report(data, out or api.report_dir(path))
    print_report(data)
    console.print("wrote " + ", ".join(str(f) for f in files))


def inspect(path: Annotated[Path, typer.Argument(help="Adapter dir(s), store or serving dir.")]):
    """Say what a path holds: adapters, a compressed store, or a serving dir."""
    from soppu.cli.inspection import describe

    with clear_errors():
        for line in describe(path):
            console.print(line, highlight=False)


def demo(
    out: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/demo"),
    users: Annotated[int, typer.Option(help="Synthetic users.")] = 16,
    layers: Annotated[int, typer.Option(help="Decoder layers (SmolLM2-135M has 30).")] = 30,
    rank: Annotated[int, typer.Option(help="Shared rank r per slot.")] = 32,
    threads: ThreadsOpt = None,
) -> None:
    """The embedded default end to end: synthetic users → compress → publish → report."""
    from soppu.adapter_sets import discover
    from soppu.compression.compress import CompressionConfig
    from soppu.server.compression_round import compress_and_publish
    from soppu.server.versions import Versions
    from soppu.synthetic import PopulationSpec, write_population

    set_threads(threads)
    with clear_errors():
        write_population(PopulationSpec(users, layers), out / "store")
        console.print(
            f"{users} users' adapters (SmolLM2-135M q/v, rank 8) in {shown(out / 'store')}"
        )
        compressed = Versions(out / "compressed").next()
        with progress_bar("compress and publish") as progress:
            version = compress_and_publish(
                discover([out / "store"]),
                compressed,
                out / "serving",
                CompressionConfig(rank=rank),
                progress=progress,
            )
    print_report(json.loads((compressed / "report" / "report.json").read_text()))
    console.print(f"compressed store: [bold]{shown(compressed)}[/]")
    console.print(f"serving version:  [bold]{shown(version)}[/] (current → {version.name})")
    console.print(f"report:           [bold]{shown(version / 'report')}[/] (md, csv, json, png)")


def register(app: typer.Typer) -> None:
    app.command()(synth)
    app.command()(compress)
    app.command()(add)
    app.command()(publish)
    app.command()(report)
    app.command()(inspect)
    app.command()(demo)
