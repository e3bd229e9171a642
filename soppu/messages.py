"""What the server and the clients say to each other, as Flower records.

The two sides meet only through these messages, so both encode and decode here:

    query "hello"    server → client: setup (data, users)      client → server: its user id and
                                                                 the emulator versions it holds
    query "install"  server → client: the emulator's weights   client → server: version installed
    train            server → client: setup, training config,  client → server: the LoRA (fp32),
                     the repair asked for (absent: none),       metrics (with a repair made now),
                     the starting LoRA (absent: start fresh),   its user and emulator;
                     the gradient correction (absent: none),    with an anchor and 2 tracks
                     an anchor (schemes with a pull: the        also the shared copy trained
                     global adapter, which the personal one     from the anchor
                     is pulled to and, with config "tracks"
                     2 (Ditto), the shared copy starts from)
    evaluate         server → client: setup, a LoRA, the repair client → server: held-out loss

A LoRA travels as an ArrayRecord of its PEFT tensors (full-model layer numbers) beside its
adapter_config as JSON; the emulator as an ArrayRecord of its state dict beside its model
config and `soppu_emulator.json`, so the client can rebuild the very folder the server saved.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from soppu.adapters import LoraState
from soppu.data import DataOptions
from soppu.repair import RepairConfig
from soppu.train_config import TrainConfig

SETUP, CONFIG, LORA, METRICS, EMULATOR = "setup", "config", "lora", "metrics", "emulator"
CORRECTION = "correction"  # the emulator's gradient bias at the starting LoRA, LoRA-shaped
ANCHOR, SHARED = "anchor", "shared"  # schemes with a pull: the global LoRA; Ditto: its update
HELLO, INSTALL = "hello", "install"
NEEDS_EMULATOR = 4090  # error code: this node does not hold the emulator version it was sent
NO_REPAIR = 4091  # error code: the repair asked for cannot be made (no teacher, or a bad answer)
NO_FEATURES = 4092  # error code: a split client has no features for its text (no source, a bad one)


@dataclass(frozen=True)
class Setup:
    """What every client needs to find its user and text, sent with every message."""

    data: str  # a data file the clients can read, or "" for the embedded Shakespeare users
    options: DataOptions
    users: tuple[str, ...] = ()  # simulation: partition i is users[i]
    base_model: str = ""

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "data": self.data,
                "options": json.dumps(asdict(self.options)),
                "users": json.dumps(list(self.users)),
                "base-model": self.base_model,
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Setup:
        return cls(
            data=str(record["data"]),
            options=DataOptions(**json.loads(str(record["options"]))),
            users=tuple(json.loads(str(record["users"]))),
            base_model=str(record["base-model"]),
        )


def train_config_record(config: TrainConfig, **extra: Any) -> ConfigRecord:
    values = {f"train.{k}": v for k, v in asdict(config).items() if k != "target_modules"}
    values["train.target_modules"] = json.dumps(config.target_modules)
    return ConfigRecord({**values, **extra})


def train_config_from(record: ConfigRecord) -> TrainConfig:
    values = {}
    for f in fields(TrainConfig):
        raw = record[f"train.{f.name}"]
        if f.name == "target_modules":
            targets = json.loads(str(raw))
            values[f.name] = tuple(targets) if targets else None
        else:
            values[f.name] = raw
    return TrainConfig(**values)


def repair_fields(steps: int, lr: float) -> dict[str, Any]:
    """The config entries that ask a client to repair its emulator (none: no repair)."""
    return {"repair-steps": steps, "repair-lr": lr} if steps > 0 else {}


def repair_from(record: ConfigRecord) -> RepairConfig | None:
    """The repair a train or evaluate message asks for, with the round's batch, seed and
    precision; None where it asks for none. Its numbers are checked (RepairConfig)."""
    if int(record.get("repair-steps", 0)) <= 0:
        return None
    return RepairConfig(
        steps=int(record["repair-steps"]),
        lr=float(record["repair-lr"]),
        batch_size=int(record["train.batch_size"]),
        seed=int(record["train.seed"]),
        precision=str(record["train.precision"]),
    )


def lora_record(lora: LoraState) -> ArrayRecord:
    return tensors_record(lora.tensors)


def tensors_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """fp32 on the CPU: ArrayRecord refuses bfloat16, and the other side may have no GPU."""
    values = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    return ArrayRecord(torch_state_dict=values)


def lora_from(arrays: ArrayRecord, config_json: str) -> LoraState:
    return LoraState(tensors_from(arrays), json.loads(config_json))


def tensors_from(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in arrays.to_torch_state_dict().items()}


def metrics_record(values: dict[str, float | int]) -> MetricRecord:
    return MetricRecord({k: v for k, v in values.items() if v is not None})


def emulator_content(folder_files: dict[str, str], state: dict[str, torch.Tensor]) -> RecordDict:
    """The emulator as a message: its JSON files by name and its tensors (tied ones once)."""
    unique: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in state.items():
        if tensor.data_ptr() in seen:
            continue  # a tied weight (the head sharing the embedding) travels once
        seen.add(tensor.data_ptr())
        unique[name] = tensor.detach().float().contiguous()
    return RecordDict(
        {
            EMULATOR: ArrayRecord(torch_state_dict=unique),
            CONFIG: ConfigRecord({f"file.{n}": text for n, text in folder_files.items()}),
        }
    )


def emulator_files(content: RecordDict) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    config = content.config_records[CONFIG]
    files = {k.removeprefix("file."): str(v) for k, v in config.items() if k.startswith("file.")}
    return files, content.array_records[EMULATOR].to_torch_state_dict()
