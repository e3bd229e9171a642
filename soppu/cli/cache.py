"""`soppu cache list` and `soppu cache prune`: see and trim SOPPU's cache.
Registered on the main app by soppu/cli/__init__.py."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from soppu.cli.common import clear_errors, console, shown

cache_app = typer.Typer(help="See and trim SOPPU's cache of emulators, models and data.")


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app, name="cache")


@cache_app.command("list")
def list_entries() -> None:
    """Every cache entry: kind, size, days since last used, what it is."""
    from soppu import cache
    from soppu.cache import cache_dir

    found = cache.entries()
    table = Table(title=f"cache: {shown(cache_dir())}", title_justify="left")
    for column in ("kind", "entry", "MiB", "days unused", "what"):
        table.add_column(column, justify="right" if column in ("MiB", "days unused") else "left")
    for entry in found:
        table.add_row(
            entry.kind,
            shown(entry.path.name),
            f"{entry.bytes / 2**20:,.0f}",
            f"{entry.days_unused:.1f}",
            shown(entry.detail),
        )
    console.print(table)
    console.print(f"{len(found)} entries, {sum(e.bytes for e in found) / 2**20:,.0f} MiB")


@cache_app.command()
def prune(
    older_than: Annotated[
        float, typer.Option(min=0, help="Remove entries unused for this many days (0: all).")
    ] = 30.0,
    kind: Annotated[
        list[str] | None,
        typer.Option(help="Which kinds (repeat): aligned-emulators, emulators, models, data."),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Only say what would go.")] = False,
) -> None:
    """Remove emulators (by default) not used for --older-than days."""
    from soppu import cache

    with clear_errors():
        gone = cache.prune(older_than_days=older_than, kinds=kind or cache.GROWING, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for entry in gone:
        console.print(
            f"{verb} {entry.kind}/{shown(entry.path.name)} ({entry.bytes / 2**20:,.0f} MiB)"
        )
    total = sum(e.bytes for e in gone) / 2**20
    console.print(f"{verb} {len(gone)} entries, {total:,.0f} MiB", highlight=False)
