"""A setting's one home: a config dataclass field that carries its help (and its flag, where
that is not the field's name) in `field(metadata=...)`, as PEFT's configs keep theirs. The
command line, `--print-config` and the docs read them from there (`helps`, `flag`); torch-free.
"""

from __future__ import annotations

from dataclasses import Field, field, fields
from typing import Any


def setting(default: Any, help: str, *, flag: str | None = None, key: str | None = None) -> Any:
    """A config field: its default, the one line of help every verb shows, its flag's name
    where it is not the field's (`--out` for `run_dir`), and, in a nested config, its key in
    the flat run config where that is not the field's name (`compress_rank` for
    `compression.rank`)."""
    metadata = {"help": help, **({"flag": flag} if flag else {}), **({"key": key} if key else {})}
    return field(default=default, metadata=metadata)


def same_as(config: type, name: str) -> Any:
    """A config field with the default and metadata of `config`'s field `name`: one knob that
    two configs hold has one home (a federation's batch size is its clients' training's)."""
    of = next(f for f in fields(config) if f.name == name)
    return field(default=of.default, metadata=dict(of.metadata))


def key(of: Field) -> str:
    """A nested config field's name in the flat run config (`_` form)."""
    return of.metadata.get("key", of.name)


def helps(config: type) -> dict[str, str]:
    """Field name → help, for every field of a config dataclass."""
    return {f.name: f.metadata["help"] for f in fields(config)}


def flags(config: type) -> dict[str, str]:
    """Field name → flag name (without `--`, with `_`), only where it is not the field's."""
    return {f.name: f.metadata["flag"] for f in fields(config) if "flag" in f.metadata}


def flag(of: Field) -> str:
    """A field's command-line flag: `--` and its flag name (else its key), `-` for `_`."""
    return "--" + of.metadata.get("flag", key(of)).replace("_", "-")
