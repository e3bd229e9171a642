"""Where users' text comes from: one small interface (`base.Source`), one file per source.

    --data FILE.jsonl|.csv|.parquet   a file of rows                           (file.py)
    --data hf:NAME[@SUBSET]           a Hugging Face dataset, as flwr-datasets' (hub.py)
                                      FederatedDataset reads one
    --data py:MODULE:FUNCTION         rows a Python function yields             (function.py)

Every source gives a table of rows; `soppu.data` partitions it into users with flwr-datasets'
partitioners, whatever it came from. Clients open the same `--data` string, so a source must
be reachable from every node that holds a user's text. A new source is one new file here and
one line in PREFIXES.
"""

from __future__ import annotations

from soppu.sources.base import DataError, Source
from soppu.sources.file import FileSource
from soppu.sources.function import FunctionSource
from soppu.sources.hub import HubSource

PREFIXES: dict[str, type[Source]] = {
    HubSource.prefix: HubSource,
    FunctionSource.prefix: FunctionSource,
}

__all__ = [
    "PREFIXES",
    "DataError",
    "FileSource",
    "FunctionSource",
    "HubSource",
    "open_source",
    "runs_code",
]


def open_source(data: str) -> Source:
    """The source `data` names: a registered prefix's, else a file."""
    for prefix, source in PREFIXES.items():
        if data.startswith(prefix):
            return source(data[len(prefix) :])
    return FileSource(data)


def runs_code(data: str) -> bool:
    """Whether opening `data` runs code (a function source): a node allows that only when its
    own config names the source, never because a server sent it."""
    return any(data.startswith(p) and getattr(s, "runs_code", False) for p, s in PREFIXES.items())
