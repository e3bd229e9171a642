"""Joint compression of many users' LoRA adapters into shared bases and tiny per-user cores.

Pure tensors in, tensors out: no Flower, transformers or PEFT here.
"""

from soppu.compression.compress import CompressionConfig, SlotResult, compress_slot, fit_stack
from soppu.compression.export import SERVING_RANKS, export_lora, serving_rank
from soppu.compression.factors import CanonicalStack, LoRAFactors, canonicalize
from soppu.compression.joint import Bracket, SlotFit
from soppu.compression.slots import Slot, group_slots

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
