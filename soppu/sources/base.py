"""What every source of users' text is: something that gives rows of (user, text, ...)."""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from soppu.errors import SoppuError


class DataError(SoppuError, ValueError):
    """Bad per-user data; the message names the source (file, dataset) and what is wrong."""


class Source(Protocol):
    prefix: ClassVar[str]  # how `--data` names it ('' for a file path)
    label: str  # how messages name it: a path, a dataset, a function

    def __init__(self, spec: str) -> None: ...

    def rows(self) -> Any:
        """Every row, as a `datasets.Dataset`; DataError (naming the source) if it cannot."""
        ...
