"""Positional reads of a few tensors from a safetensors file, many files at a time.

safetensors validates each file's header when it is first read (`adapters.read_adapter`);
after that, compression reads the same handful of tensors from a thousand files once per
chunk of slots. `safe_open` re-parses the whole header and maps the file on every open
(≈ 0.3 ms, plus ≈ 40 µs per tensor), which made reading 35% of a whole-model compression.
Here the header's offsets are kept from the first read and the bytes are read with one
`preadv` per tensor into a buffer this process owns: no mapping, so no file pages held in
the process's memory while a factor lives.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_ALIGN = 8  # each tensor's bytes start at a multiple of the widest element in the buffer


@dataclass(frozen=True)
class Span:
    """Where one tensor's bytes lie in its file."""

    offset: int  # from the start of the file
    nbytes: int
    dtype: str  # as the header spells it: F32, BF16, ...
    shape: tuple[int, ...]


def read_layout(path: Path) -> dict[str, Span]:
    """Every tensor's span, from the header (which safetensors has already validated)."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    start = 8 + size
    return {
        key: Span(
            start + entry["data_offsets"][0],
            entry["data_offsets"][1] - entry["data_offsets"][0],
            entry["dtype"],
            tuple(entry["shape"]),
        )
        for key, entry in header.items()
        if key != "__metadata__"
    }


def read_spans(path: Path, spans: list[Span]) -> list[Tensor]:
    """The tensors at `spans`, as float32, from one open of the file.

    Raises OSError when the file is shorter than its header says (changed since it was read).
    """
    starts, total = [], 0
    for span in spans:
        starts.append(total)
        total += -(-span.nbytes // _ALIGN) * _ALIGN
    buffer = bytearray(total)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        for span, at in zip(spans, starts, strict=True):
            got = os.preadv(handle.fileno(), [view[at : at + span.nbytes]], span.offset)
            if got != span.nbytes:
                raise OSError(f"file ends {span.nbytes - got} bytes early (changed since read?)")
    out = []
    for span, at in zip(spans, starts, strict=True):
        dtype = DTYPES[span.dtype]  # the reader of the header refused any other
        count = span.nbytes // dtype.itemsize
        if not count:  # frombuffer refuses an empty view
            out.append(torch.zeros(span.shape))
            continue
        tensor = torch.frombuffer(buffer, dtype=dtype, count=count, offset=at)
        out.append(tensor.view(span.shape).to(torch.float32))
    return out
