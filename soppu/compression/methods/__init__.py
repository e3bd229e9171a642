"""Compression methods, one file each: a class implementing `base.CompressionMethod` and one
line in `METHODS`. Importing this package loads no torch."""

from __future__ import annotations

from soppu.compression.methods.base import CompressionMethod
from soppu.compression.methods.diag import DiagonalCores
from soppu.compression.methods.full import FullCores

METHODS: dict[str, CompressionMethod] = {
    FullCores.name: FullCores(),
    DiagonalCores.name: DiagonalCores(),
}

HELP = "; ".join(method.help for method in METHODS.values())  # for --sigma, wherever it is


def method_named(name: str) -> CompressionMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"sigma must be one of {tuple(METHODS)}, got {name!r}") from None


__all__ = ["HELP", "METHODS", "CompressionMethod", "method_named"]
