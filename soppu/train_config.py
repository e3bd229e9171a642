"""How one user's LoRA is trained: the settings, their defaults and their help (in each
field's metadata, `soppu.settings.setting`), in a module light enough for the command line
to read without torch (`soppu personalize`'s training flags are derived from it; a
federation's come from `soppu/server/config.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from soppu.settings import flags, helps, setting

LORA_LAYERS = ("all", "adapter")
# transformers' `get_scheduler` names (`TrainingArguments.lr_scheduler_type`), per training run
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
PRECISIONS = ("auto", "bf16", "fp32")  # soppu.precision's, kept here free of torch


@dataclass(frozen=True)
class TrainConfig:
    steps: int = setting(30, "Training steps.")
    lr: float = setting(1e-3, "Learning rate.")
    lr_scheduler_type: str = setting(
        "constant",
        "constant, constant_with_warmup, linear or cosine (transformers').",
    )
    # linear warm-up from 0 (a fresh AdamW's first step is ±lr in every parameter); "constant"
    # ignores it, as in transformers
    warmup_steps: int = setting(0, "Steps of linear warm-up from 0 (constant ignores it).")
    batch_size: int = setting(4, "Sequences per step.")
    seq_len: int = setting(128, "Tokens per sequence.")
    # --lora-rank and --lora-alpha, as `soppu simulate` names them: --rank is compression's
    rank: int = setting(8, "LoRA rank r.", flag="lora_rank")
    alpha: float = setting(16.0, "LoRA α.", flag="lora_alpha")
    target_modules: tuple[str, ...] | None = setting(
        None,
        "LoRA targets, repeat the flag for each (default: attention q and v).",
    )
    lora_layers: str = setting(
        "all",
        "all: every layer the emulator keeps; adapter: top/bottom only.",
    )
    seed: int = setting(0, "Seed for the data order and the LoRA's initialisation.")
    first_step: int = setting(
        0,
        "Continue the data order after this many batches (a federation's later rounds).",
    )
    max_eval_tokens: int = setting(
        2048, "Held-out tokens evaluated (from the start of the held-out text)."
    )
    precision: str = setting(
        "auto",
        "auto: bf16 autocast where the device computes bf16 natively (the LoRA stays fp32); "
        "bf16; fp32.",
    )

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


TRAIN_HELP = helps(TrainConfig)  # each field's help, for `soppu personalize`'s flags
TRAIN_FLAGS = flags(TrainConfig)  # its flags that are not the field's name
