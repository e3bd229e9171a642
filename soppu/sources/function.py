"""Rows a Python function yields: `py:MODULE:FUNCTION`, each row a mapping with the user and
text columns (a generator of synthetic users, or a reader of a format no file source knows).
Every node that holds users' text must be able to import MODULE."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, ClassVar

from soppu.sources.base import DataError


class FunctionSource:
    prefix: ClassVar[str] = "py:"
    runs_code: ClassVar[bool] = True  # a node opens it only when its own config says so

    def __init__(self, spec: str) -> None:
        module, _, function = spec.rpartition(":")
        self.label = f"py:{spec}"
        if not module or not function:
            raise DataError(f"{self.label}: give py:MODULE:FUNCTION")
        try:
            self.function = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError) as exc:
            raise DataError(f"{self.label}: cannot import it ({exc})") from None

    def rows(self) -> Any:
        import datasets

        rows = []
        for i, row in enumerate(self.function()):
            if not isinstance(row, Mapping):
                raise DataError(f"{self.label}: row {i + 1} is not a mapping of columns")
            rows.append(dict(row))
        if not rows:
            raise DataError(f"{self.label}: yielded no rows")
        try:
            return datasets.Dataset.from_list(rows)
        except Exception as exc:  # columns whose types differ between rows
            raise DataError(f"{self.label}: rows do not form one table ({exc})") from None
