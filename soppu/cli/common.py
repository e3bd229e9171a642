"""What every `soppu` verb shares: the console, clear errors, progress bars, thread setting, and
the options several verbs take."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import Field, fields
from enum import StrEnum
from inspect import Parameter, Signature, signature
from typing import Annotated, Any, get_type_hints

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(soft_wrap=True)  # never break a path or an error across lines
# --help: Typer's rich panels where they fit (at 90 columns they already cut no option name;
# 100 leaves room for longer ones), else click's plain layout, which puts a long option on
# its own line and never cuts one
HELP_MARKUP = "rich" if shutil.get_terminal_size().columns >= 100 else None
if HELP_MARKUP is None:
    # Typer escapes its "[default: …]" for rich whenever rich is installed, so click's plain
    # help would print "\\[default: …]"; rich draws no help here, and this tells Typer so
    typer.core.HAS_RICH = False


def markup_safe(text: str) -> str:
    """Help text as the help's renderer reads it: brackets escaped only where rich draws."""
    return escape(text) if HELP_MARKUP else text


def shown(path: object) -> str:
    """A path or name as it is, never read as rich markup (`runs/[bold]x` stays that)."""
    return escape(str(path))


def set_threads(threads: int | None) -> int:
    from soppu.basemodel import set_threads as pin

    return pin(threads)


@contextmanager
def clear_errors() -> Iterator[None]:
    """Bad input ends in one red line naming the file and the problem, not a traceback."""
    from soppu.errors import SoppuError

    try:
        yield
    except (SoppuError, FileExistsError, FileNotFoundError, ValueError) as exc:
        console.print(f"[bold red]error:[/] {shown(exc)}", highlight=False)
        raise typer.Exit(2) from None
    except OSError as exc:  # a full disk, a read-only target: every write is atomic
        where = exc.filename or "a file"
        what = exc.strerror or type(exc).__name__
        console.print(
            f"[bold red]error:[/] {shown(where)}: {shown(what)}; what was there before is "
            "unchanged",
            highlight=False,
        )
        raise typer.Exit(2) from None


@contextmanager
def progress_bar(label: str) -> Iterator[Callable[[str, int, int], None]]:
    """Yields update(what, done, total)."""
    with Progress(
        TextColumn(f"[bold]{label}[/]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task("", total=None)

        def update(what: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=what)

        yield update
        bar.update(task, completed=bar.tasks[0].total or 0, description="done")


def print_report(data: dict) -> None:
    table = Table(title="Per-layer reconstruction error ‖D−D̂‖/‖D‖", title_justify="left")
    for column in ("layer", "module", "rank", "users", "mean", "median", "p95", "max", "personal"):
        table.add_column(column, justify="left" if column == "module" else "right")
    for row in data["modules"]:
        personal = row["personal_mean"]
        table.add_row(
            str(row["layer"]),
            row["kind"],
            str(row["rank"]),
            str(row["users"]),
            f"{row['mean']:.4f}",
            f"{row['median']:.4f}",
            f"{row['p95']:.4f}",
            f"{row['max']:.4f}",
            "–" if personal is None else f"{personal:.4f}",
        )
    console.print(table)
    t = data["totals"]
    console.print(
        f"[bold]{t['users']} users, {t['modules']} modules[/]: parameters "
        f"{t['params_before']:,} → {t['params_after']:,}, bytes {t['bytes_before']:,} → "
        f"{t['bytes_after']:,} at {t['bits']} bits ([bold]{t['ratio']:.1f}×[/]); "
        f"error mean {t['mean']:.4f}"
        + (f" ({t['float_mean']:.4f} before quantising)" if t["bits"] != 32 else "")
        + f", p95 {t['p95']:.4f}, max {t['max']:.4f}; "
        f"personal-part mean {_num(t['personal_mean'])}",
        highlight=False,
    )
    rank = data.get("config", {}).get("rank")
    if t.get("capped_slots"):
        console.print(
            f"rank {rank} is more than {t['capped_slots']} of {t['slots']} slots span on one "
            "side or both: there each side keeps every direction it spans (nothing is lost)",
            highlight=False,
        )


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


class Partitioner(StrEnum):
    natural = "natural"
    iid = "iid"
    dirichlet = "dirichlet"


BaseModelOpt = Annotated[
    str | None,
    typer.Option("--base-model", help="HF id or local folder (default: embedded SmolLM2-135M)."),
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help=markup_safe(
            "Users' text: a JSONL/CSV/Parquet file, hf:DATASET[@SUBSET] or py:MODULE:FUNCTION "
            "(default: Shakespeare roles)."
        ),
    ),
]
ThreadsOpt = Annotated[int | None, typer.Option(min=1, help="torch threads (default: all cores).")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, or cuda (a GPU torch sees).")]
# The DataOptions fields every verb that reads users' text takes as flags (not its seed: a
# verb's own or the run's); their help is the fields'.
DATA_FLAGS = (
    "user_column",
    "text_column",
    "partitioner",
    "num_users",
    "partition_by",
    "alpha",
    "min_chars",
    "test_fraction",
    "validation_fraction",
)


def data_flags() -> list[Parameter]:
    """The flags of every verb that reads users' text, each named as a DataOptions field,
    defaulting to its value, with its help (a verb takes them through `with_flags`)."""
    from soppu.data import DataOptions

    kinds = get_type_hints(DataOptions) | {"partitioner": Partitioner}
    by_name = {f.name: f for f in fields(DataOptions)}
    parameters = []
    for name in DATA_FLAGS:
        field = by_name[name]
        default = Partitioner(field.default) if name == "partitioner" else field.default
        help_text = markup_safe(field.metadata["help"])
        annotation = Annotated[kinds[name], typer.Option(help=help_text)]
        parameters.append(
            Parameter(name, Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        )
    return parameters


def data_options(flags: dict):
    """DataOptions from a verb's data flags."""
    from soppu.data import DataOptions

    values = {name: flags[name] for name in DATA_FLAGS}
    return DataOptions(**{**values, "partitioner": values["partitioner"].value})


def keyword_option(name: str, kind: Any, default: Any, *flags: str, help: str) -> Parameter:
    """One typer option as a signature parameter, for verbs whose flags are derived from a
    settings dataclass (its fields' names, defaults and help)."""
    annotation = Annotated[kind, typer.Option(*flags, help=help, show_default=False)]
    return Parameter(name, Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def setting_option(
    field: Field, flag: str, help_text: str, *short: str, kind: Any = None, name: str = ""
) -> Parameter:
    """The option of a settings field: `--flag` (`--flag/--no-flag` for a bool) and any
    `short` names, its help ending in the field's default; an unset flag passes None to the
    parameter `name` (default: the field's)."""
    kind = kind or type(field.default)
    flags = [f"{flag}/--no-{flag.removeprefix('--')}"] if kind is bool else [flag, *short]
    shown = "''" if field.default == "" else field.default
    text = help_text if field.default is None else f"{help_text} [default: {shown}]"
    return keyword_option(name or field.name, kind | None, None, *flags, help=markup_safe(text))


def with_flags(verb: Callable, derived: list[Parameter], *, after: int) -> Callable:
    """`verb` as typer sees it: its own options, with the `derived` ones (passed to its
    **keywords) after its first `after`."""
    own = [
        p.replace(kind=Parameter.KEYWORD_ONLY)
        for p in signature(verb, eval_str=True).parameters.values()
        if p.kind is not Parameter.VAR_KEYWORD
    ]

    def command(**values: Any) -> None:
        verb(**values)

    command.__doc__ = verb.__doc__
    return with_signature(command, [*own[:after], *derived, *own[after:]])


def with_signature(func: Callable, parameters: list[Parameter]) -> Callable:
    """`func` (taking **kwargs) as typer sees it: these parameters, in this order."""
    func.__signature__ = Signature(parameters)  # type: ignore[attr-defined]
    func.__annotations__ = {p.name: p.annotation for p in parameters}
    return func
