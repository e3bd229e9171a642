"""Mixed precision for the work that trains: client steps, their own held-out checks, the
emulator's alignment and the gradient corrections run under bf16 autocast where the device
computes bf16 natively (a CPU with AVX512-BF16 or AMX, or a CUDA device that has it; elsewhere
bf16 is emulated and slower than fp32; experiments/gains.py times a client step in both).
Weights, the LoRA, its gradients and AdamW's state stay fp32, as with transformers'
`bf16=True`; the run's final evaluation on the full model is always fp32, so gains are judged
in one precision whatever the clients used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from soppu.train_config import PRECISIONS


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` multiplies bf16 in hardware (a CPU without it would emulate bf16 and
    run slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own probes
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve(precision: str, device: torch.device | str) -> str:
    """`precision` on `device` as "bf16" or "fp32": `auto` is bf16 where it is native there."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


@contextmanager
def autocast(precision: str, device: torch.device | str) -> Iterator[None]:
    """bf16 autocast on `device` when `precision` resolves to bf16 there, else nothing."""
    device = torch.device(device)
    if resolve(precision, device) == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield
