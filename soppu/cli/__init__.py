"""The `soppu` command line: thin verbs over the packages that do the work; each module here
registers its verbs on `app` (the console script `soppu = "soppu.cli:app"`)."""

from __future__ import annotations

import typer

from soppu.cli import cache, compression, data, federation, personal, serve
from soppu.cli.common import HELP_MARKUP

app = typer.Typer(
    name="soppu",
    help="One PEFT per user: compress many users' LoRA adapters into shared bases, publish "
    "them for PEFT/LoRAX/vLLM, and report the per-layer reconstruction error.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=HELP_MARKUP,
)

for verbs in (data, compression, personal, federation, serve, cache):
    verbs.register(app)


def main() -> None:  # pragma: no cover - console script entry
    app()
