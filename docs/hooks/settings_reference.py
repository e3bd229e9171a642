"""mkdocs hook: the federation's settings reference, generated from `FederationConfig`'s
fields and sections where a page says `<!-- settings-reference -->`, so the docs list exactly
the flags `soppu simulate` has, with the same defaults and help."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from soppu.server.config import SECTIONS, FederationConfig
from soppu.settings import flag, key

MARKER = "<!-- settings-reference -->"


def on_page_markdown(markdown: str, **_: Any) -> str:
    return markdown.replace(MARKER, reference()) if MARKER in markdown else markdown


def reference() -> str:
    """One table per section (the top-level settings first): flag, run-config key, default,
    help."""
    top = [f for f in fields(FederationConfig) if f.name not in SECTIONS]
    parts = [_table("Top level", "FederationConfig's own fields, read as `config.<field>`.", top)]
    for name, kind in SECTIONS.items():
        doc = " ".join((kind.__doc__ or "").split())
        parts.append(_table(f"`{name}` ({kind.__name__})", doc, fields(kind)))
    return "\n".join(parts)


def _table(title: str, intro: str, of: Any) -> str:
    rows = [
        f"| `{flag(f)}` | `{key(f).replace('_', '-')}` | `{f.name}` | {_default(f.default)} | "
        f"{f.metadata['help'].replace('|', '/')} |"
        for f in of
    ]
    head = "| flag | run-config key | field | default | what it sets |\n|---|---|---|---|---|"
    return f"#### {title}\n\n{intro}\n\n{head}\n" + "\n".join(rows) + "\n"


def _default(value: Any) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    return "`''`" if value == "" else f"`{value}`"
