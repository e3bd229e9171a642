"""How one user's LoRA is trained: the settings, their defaults and their help, in a module
light enough for the command line to read without torch (`soppu personalize`'s training flags
are derived from it; a federation's come from `soppu/server/config.py`)."""

from __future__ import annotations

from dataclasses import dataclass

LORA_LAYERS = ("all", "adapter")
# transformers' `get_scheduler` names (`TrainingArguments.lr_scheduler_type`), per training run
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
PRECISIONS = ("auto", "bf16", "fp32")  # soppu.precision's, kept here free of torch


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 30
    lr: float = 1e-3
    lr_scheduler_type: str = "constant"
    # linear warm-up from 0 (a fresh AdamW's first step is ±lr in every parameter); "constant"
    # ignores it, as in transformers
    warmup_steps: int = 0
    batch_size: int = 4
    seq_len: int = 128
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] | None = None  # default: the attention q and v projections
    lora_layers: str = "all"  # every layer the emulator keeps, or the adapter layers only
    seed: int = 0
    first_step: int = 0  # batches of the seed's data order already trained on (earlier rounds)
    max_eval_tokens: int = 2048  # held-out tokens evaluated per user (from the start)
    # bf16 autocast where the device computes bf16 natively (soppu.precision); the LoRA stays fp32
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.lora_layers not in LORA_LAYERS:
            raise ValueError(f"lora layers {self.lora_layers!r} is not one of {LORA_LAYERS}")
        if self.lr_scheduler_type not in LR_SCHEDULERS:
            raise ValueError(
                f"lr scheduler {self.lr_scheduler_type!r} is not one of {LR_SCHEDULERS}"
            )
        if not 0 <= self.warmup_steps < max(self.steps, 1):
            raise ValueError(f"warmup steps {self.warmup_steps} must be in [0, steps)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.first_step < 0:
            raise ValueError(f"first step {self.first_step} is negative")


# `soppu personalize` flags that are not the field's name with `-` for `_`.
TRAIN_FLAGS = {"alpha": "lora_alpha"}

TRAIN_HELP = {
    "steps": "Training steps.",
    "lr": "Learning rate.",
    "lr_scheduler_type": "constant, constant_with_warmup, linear or cosine (transformers').",
    "warmup_steps": "Steps of linear warm-up from 0 (constant ignores it).",
    "batch_size": "Sequences per step.",
    "seq_len": "Tokens per sequence.",
    "rank": "LoRA rank r.",
    "alpha": "LoRA α.",
    "target_modules": "LoRA targets, repeat the flag for each (default: attention q and v).",
    "lora_layers": "all: every layer the emulator keeps; adapter: top/bottom only.",
    "seed": "Seed for the data order and the LoRA's initialisation.",
    "first_step": "Continue the data order after this many batches (a federation's later rounds).",
    "max_eval_tokens": "Held-out tokens evaluated.",
    "precision": "auto: bf16 autocast where the device computes bf16 natively; bf16; fp32.",
}
