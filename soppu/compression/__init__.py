"""Joint compression of many users' LoRA adapters into shared bases and tiny per-user cores.

Pure tensors in, tensors out: no Flower, transformers or PEFT here. The names below load on
first use, so that `soppu.compression.methods` (read by the command line) imports no torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from soppu.compression.compress import CompressionConfig, SlotResult, compress_slot, fit_stack
    from soppu.compression.export import SERVING_RANKS, export_lora, serving_rank
    from soppu.compression.factors import CanonicalStack, LoRAFactors, canonicalize
    from soppu.compression.joint import Bracket, SlotFit
    from soppu.compression.slots import Slot, group_slots

_HOMES = {
    "soppu.compression.compress": ("CompressionConfig", "SlotResult", "compress_slot", "fit_stack"),
    "soppu.compression.export": ("SERVING_RANKS", "export_lora", "serving_rank"),
    "soppu.compression.factors": ("CanonicalStack", "LoRAFactors", "canonicalize"),
    "soppu.compression.joint": ("Bracket", "SlotFit"),
    "soppu.compression.slots": ("Slot", "group_slots"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'soppu.compression' has no attribute {name!r}")
    return getattr(import_module(_HOME[name]), name)


__all__ = [
    "SERVING_RANKS",
    "Bracket",
    "CanonicalStack",
    "CompressionConfig",
    "LoRAFactors",
    "Slot",
    "SlotFit",
    "SlotResult",
    "canonicalize",
    "compress_slot",
    "export_lora",
    "fit_stack",
    "group_slots",
    "serving_rank",
]
