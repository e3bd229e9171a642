"""A JSONL, CSV or Parquet file of rows (the embedded Shakespeare users are one too)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from soppu.sources.base import DataError

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class FileSource:
    prefix: ClassVar[str] = ""

    def __init__(self, spec: str | Path) -> None:
        self.path = Path(spec).expanduser()
        self.label = str(self.path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such data file")
        if self.path.suffix.lower() not in FORMATS:
            raise DataError(f"{self.path}: unknown format; use .jsonl, .csv or .parquet")

    def rows(self) -> Any:
        import datasets

        datasets.disable_progress_bars()
        kind = FORMATS[self.path.suffix.lower()]
        try:
            return datasets.load_dataset(kind, data_files=str(self.path), split="train")
        except Exception as exc:  # datasets raises many types for one cause: an unreadable file
            raise DataError(f"{self.path}: cannot read it as {kind} ({exc})") from None
