"""The FedBiOT emulator: a compressed stand-in for the base model that clients train against.

The full model's decoder layers split into the *adapter* (the last `top` layers, and
optionally the first `bottom`), which users personalise with LoRA, and the rest, of which the
emulator keeps an evenly spaced subset at a drop ratio. Embeddings, final norm and head stay.
Because the adapter layers are the full model's own layers, a LoRA trained on the emulator
plugs into the full model once its keys carry the full model's layer indices (`to_full_keys`).

On disk an emulator is a plain Hugging Face folder (it loads with `from_pretrained`) plus
`soppu_emulator.json`: its version id, the base model and the full-model layer each of its
layers is, and the alignment losses.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from soppu import atomic

FORMAT = "soppu-emulator/1"
META_NAME = "soppu_emulator.json"


class EmulatorError(ValueError):
    """A bad emulator plan or folder; the message names what is wrong."""


@dataclass(frozen=True)
class EmulatorPlan:
    """Which full-model layers the emulator keeps, in order, and which of them are the adapter."""

    num_layers: int
    top: int = 2
    bottom: int = 0
    drop: float = 0.5

    def __post_init__(self) -> None:
        if self.top < 1 or self.bottom < 0 or self.top + self.bottom > self.num_layers:
            raise EmulatorError(
                f"adapter of {self.bottom} bottom + {self.top} top layers does not fit a "
                f"{self.num_layers}-layer model (top ≥ 1)"
            )
        if not 0.0 <= self.drop < 1.0:
            raise EmulatorError(f"drop ratio {self.drop} must be in [0, 1)")

    @property
    def adapter_layers(self) -> list[int]:
        n = self.num_layers
        return list(range(self.bottom)) + list(range(n - self.top, n))

    @property
    def middle_kept(self) -> list[int]:
        """An evenly spaced subset of the non-adapter layers, their ends included."""
        middle = list(range(self.bottom, self.num_layers - self.top))
        keep = len(middle) - round(self.drop * len(middle))
        if keep <= 0:
            return []
        if keep == 1:
            return [middle[len(middle) // 2]]
        step = (len(middle) - 1) / (keep - 1)
        return [middle[round(i * step)] for i in range(keep)]

    @property
    def full_layers(self) -> list[int]:
        """Emulator layer j is full-model layer full_layers[j]."""
        return sorted(set(self.adapter_layers) | set(self.middle_kept))


@dataclass
class EmulatorInfo:
    """What `soppu_emulator.json` records."""

    version: str
    base_model: str
    plan: dict[str, Any]
    full_layers: list[int]
    adapter_layers: list[int]
    layers_path: str
    params_full: int
    params_emulator: int
    alignment: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def emulator_index(self, full_layer: int) -> int:
        return self.full_layers.index(full_layer)

    @property
    def emulator_adapter_layers(self) -> list[int]:
        """The adapter layers as the emulator numbers them."""
        return [self.emulator_index(f) for f in self.adapter_layers]


def layers_path(model: nn.Module) -> str:
    """The dotted name of the decoder's layer list (`model.layers`, `transformer.h`, ...)."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name:
            return name
    raise EmulatorError(f"{type(model).__name__}: no list of {n} decoder layers found")


def build(model: nn.Module, plan: EmulatorPlan, base_model: str) -> tuple[nn.Module, EmulatorInfo]:
    """A fresh emulator model (own weights, the full model untouched) and its description."""
    from transformers import AutoModelForCausalLM

    if plan.num_layers != model.config.num_hidden_layers:
        raise EmulatorError(
            f"plan is for {plan.num_layers} layers, model has {model.config.num_hidden_layers}"
        )
    path = layers_path(model)
    keep = plan.full_layers
    config = _subset_config(model.config, keep)
    emulator = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    emulator.load_state_dict(_subset_state(model.state_dict(), path, keep), strict=True)
    emulator.eval().requires_grad_(False)
    # What PEFT records as the adapters' base (it reads the attribute, not the config).
    emulator.config._name_or_path = emulator.name_or_path = base_model
    info = EmulatorInfo(
        version="",
        base_model=base_model,
        plan=asdict(plan),
        full_layers=keep,
        adapter_layers=plan.adapter_layers,
        layers_path=path,
        params_full=_count(model),
        params_emulator=_count(emulator),
    )
    info.version = version_id(emulator, info)
    return emulator, info


def _subset_config(config, keep: list[int]):
    config = config.__class__.from_dict(config.to_dict())
    config.num_hidden_layers = len(keep)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) > max(keep):
        config.layer_types = [layer_types[i] for i in keep]
    return config


def _subset_state(state: dict[str, torch.Tensor], path: str, keep: list[int]) -> dict:
    pattern = re.compile(rf"^{re.escape(path)}\.(\d+)\.(.*)$")
    position = {full: j for j, full in enumerate(keep)}
    subset = {}
    for key, tensor in state.items():
        match = pattern.match(key)
        if match is None:
            subset[key] = tensor.clone()
        elif int(match[1]) in position:
            subset[f"{path}.{position[int(match[1])]}.{match[2]}"] = tensor.clone()
    return subset


def _count(model: nn.Module) -> int:
    # Tied weights are one tensor; count each once.
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def version_id(emulator: nn.Module, info: EmulatorInfo) -> str:
    """A content id: the same layers with the same weights always get the same version."""
    digest = hashlib.sha256(json.dumps([info.base_model, info.full_layers]).encode())
    for name, tensor in sorted(emulator.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return "emu-" + digest.hexdigest()[:12]


def save(emulator: nn.Module, info: EmulatorInfo, folder: Path, *, replace: bool = False) -> Path:
    """Write the emulator folder atomically (it appears whole or not at all)."""
    with atomic.building_dir(Path(folder), replace=replace) as building:
        emulator.save_pretrained(building)
        atomic.write_json(building / META_NAME, asdict(info))
    return Path(folder)


def read_info(folder: Path) -> EmulatorInfo:
    meta = Path(folder) / META_NAME
    try:
        data = json.loads(meta.read_text())
    except FileNotFoundError:
        raise EmulatorError(f"{folder}: not an emulator (no {META_NAME})") from None
    except json.JSONDecodeError as exc:
        raise EmulatorError(f"{meta}: not valid JSON ({exc})") from None
    if data.get("format") != FORMAT:
        raise EmulatorError(f"{meta}: format {data.get('format')!r}, expected {FORMAT!r}")
    return EmulatorInfo(**data)


def load(folder: Path, *, device: str = "cpu") -> tuple[nn.Module, EmulatorInfo]:
    from transformers import AutoModelForCausalLM

    info = read_info(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.config._name_or_path = model.name_or_path = info.base_model
    return model.to(device).eval().requires_grad_(False), info


def remap_layer_keys(state: dict[str, Any], path: str, mapping: dict[int, int]) -> dict[str, Any]:
    """Rename `<path>.<i>.` to `<path>.<mapping[i]>.` in every key; other keys unchanged."""
    pattern = re.compile(rf"(^|\.){re.escape(path)}\.(\d+)\.")

    def rename(key: str) -> str:
        match = pattern.search(key)
        if match is None:
            return key
        index = int(match[2])
        if index not in mapping:
            raise EmulatorError(f"{key}: layer {index} is not an adapter layer of this emulator")
        start, end = match.span()
        return f"{key[:start]}{match[1]}{path}.{mapping[index]}.{key[end:]}"

    return {rename(key): value for key, value in state.items()}


def to_full_keys(state: dict[str, Any], info: EmulatorInfo) -> dict[str, Any]:
    """LoRA keys on the emulator → the same LoRA on the full model."""
    mapping = {info.emulator_index(f): f for f in info.adapter_layers}
    return remap_layer_keys(state, info.layers_path, mapping)


def to_emulator_keys(state: dict[str, Any], info: EmulatorInfo) -> dict[str, Any]:
    """A full-model LoRA (on adapter layers only) → the same LoRA on the emulator."""
    mapping = dict(zip(info.adapter_layers, info.emulator_adapter_layers, strict=True))
    return remap_layer_keys(state, info.layers_path, mapping)
