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


Stamp = tuple[int, int]  # a file's (size, mtime in ns) when its header was read


def read_layout(path: Path) -> tuple[dict[str, Span], Stamp]:
    """Every tensor's span, from the header (which safetensors has already validated), and
    the file's stamp, so that a later read can tell the file has changed since."""
    with open(path, "rb") as handle:
        status = os.fstat(handle.fileno())
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    start = 8 + size
    spans = {
        key: Span(
            start + entry["data_offsets"][0],
            entry["data_offsets"][1] - entry["data_offsets"][0],
            entry["dtype"],
            tuple(entry["shape"]),
        )
        for key, entry in header.items()
        if key != "__metadata__"
    }
    return spans, (status.st_size, status.st_mtime_ns)


def read_spans(path: Path, spans: list[Span], stamp: Stamp) -> list[Tensor]:
    """The tensors at `spans`, as float32, from one open of the file.

    Raises OSError when the file is no longer the one whose header gave the spans (its size
    or mtime differ from `stamp`), or is shorter than they say.
    """
    starts, total = [], 0
    for span in spans:
        starts.append(total)
        total += -(-span.nbytes // _ALIGN) * _ALIGN
    buffer = bytearray(total)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        status = os.fstat(handle.fileno())
        if (status.st_size, status.st_mtime_ns) != stamp:
            raise OSError("the file changed since its header was read")
        for span, at in zip(spans, starts, strict=True):
            got = os.preadv(handle.fileno(), [view[at : at + span.nbytes]], span.offset)
            if got != span.nbytes:
                raise OSError(f"the file ends {span.nbytes - got} bytes early")
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
