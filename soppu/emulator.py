"""The FedBiOT emulator: a compressed stand-in for the base model that clients train against.

The full model's decoder layers split into the *adapter* (the last `top` layers, and
optionally the first `bottom`), kept exactly, and the rest, of which the emulator keeps a
subset at a drop ratio: by default the most important ones (those that change the residual
stream most on public text, ShortGPT's block influence), or an evenly spaced subset.
Embeddings, final norm and head stay. Every emulator layer is some full-model layer, so a LoRA
trained on the emulator plugs into the full model once its keys and `layers_to_transform`
carry the full model's layer indices (`to_full_keys`). With drop 0 the emulator is the full
model itself: what a client in full mode trains against. A *split* plan keeps the top layers
only: the full model's own layers below them run where the full model is, and what they
compute for the client's text, the hidden states entering the top layers, reaches the client
as features (`soppu.features`): its LoRA on those layers then trains exactly as on the full
model.

On disk an emulator is a plain Hugging Face folder (it loads with `from_pretrained`) plus
`soppu_emulator.json`: its version id, the base model and the full-model layer each of its
layers is, and the alignment losses.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from soppu import atomic, lm
from soppu.adapters import LoraState
from soppu.errors import SoppuError

FORMAT = "soppu-emulator/1"
META_NAME = "soppu_emulator.json"


class EmulatorError(SoppuError, ValueError):
    """A bad emulator plan or folder; the message names what is wrong."""


SELECTIONS = ("importance", "even")
# The exact top layers a client's LoRA sits on. An adapter on all projections of the full
# model's top 8 layers, trained on the full model, gained as much as one on q/v of every layer
# (networkx code, 4 users: 29.6% against 27.6%; experiments/split_layers.py), and on an
# emulator whose 8 other layers stand in for the 22 below them it served more than 2 exact
# layers under 14 stand-ins on every population measured (docs/benchmarks.md, "Exact top
# layers on the emulator").
EXACT_TOP = 8


def default_top(num_layers: int) -> int:
    """The adapter's top layers where none are given: `EXACT_TOP`, at most a third of a
    smaller model (a 6-layer model: 2)."""
    return max(1, min(EXACT_TOP, num_layers // 3))


@dataclass(frozen=True)
class EmulatorPlan:
    """Which full-model layers the emulator keeps, in order, and which of them are the adapter.
    `top` 0: `default_top`. The default drop keeps the emulator at about half the model: of a
    30-layer model the top 8 and 8 of the 22 below them."""

    num_layers: int
    top: int = 0
    bottom: int = 0
    drop: float = 0.64
    select: str = "importance"  # which middle layers stay: "importance" or "even"
    split: bool = False  # the top layers only, fed the full model's hidden states below them

    def __post_init__(self) -> None:
        if self.top == 0:  # frozen: resolved once, so the plan (and its id) names its layers
            object.__setattr__(self, "top", default_top(self.num_layers))
        if self.split and self.bottom:
            raise EmulatorError(
                "a split client holds the top layers only: the features enter the first of "
                f"them, so it takes no bottom layers (got bottom {self.bottom})"
            )
        if self.top < 1 or self.bottom < 0 or self.top + self.bottom > self.num_layers:
            raise EmulatorError(
                f"adapter of {self.bottom} bottom + {self.top} top layers does not fit a "
                f"{self.num_layers}-layer model (top ≥ 1)"
            )
        if not 0.0 <= self.drop < 1.0:
            raise EmulatorError(f"drop ratio {self.drop} must be in [0, 1)")
        if self.select not in SELECTIONS:
            raise EmulatorError(f"layer selection {self.select!r} is not one of {SELECTIONS}")

    @property
    def adapter_layers(self) -> list[int]:
        n = self.num_layers
        return list(range(self.bottom)) + list(range(n - self.top, n))

    @property
    def middle(self) -> list[int]:
        return list(range(self.bottom, self.num_layers - self.top))

    @property
    def keep_count(self) -> int:
        if self.split:
            return 0
        return len(self.middle) - round(self.drop * len(self.middle))

    @property
    def needs_importance(self) -> bool:
        return self.select == "importance" and 0 < self.keep_count < len(self.middle)

    def middle_kept(self, importance: Sequence[float] | None = None) -> list[int]:
        """The middle layers kept: the `keep_count` most important (importance per full-model
        layer, from `layer_importance`), or evenly spaced with their ends included."""
        middle, keep = self.middle, self.keep_count
        if keep <= 0:
            return []
        if keep == len(middle):
            return middle
        if self.select == "importance":
            if importance is None or len(importance) != self.num_layers:
                raise EmulatorError("importance selection needs one score per layer")
            return sorted(sorted(middle, key=lambda layer: -importance[layer])[:keep])
        if keep == 1:
            return [middle[len(middle) // 2]]
        step = (len(middle) - 1) / (keep - 1)
        return [middle[round(i * step)] for i in range(keep)]

    def full_layers(self, importance: Sequence[float] | None = None) -> list[int]:
        """Emulator layer j is full-model layer full_layers()[j]."""
        return sorted(set(self.adapter_layers) | set(self.middle_kept(importance)))


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

    importance: list[float] = field(default_factory=list)  # per full-model layer, if measured

    def emulator_index(self, full_layer: int) -> int:
        if full_layer not in self.full_layers:
            raise EmulatorError(f"full-model layer {full_layer} is not in this emulator")
        return self.full_layers.index(full_layer)

    @property
    def emulator_adapter_layers(self) -> list[int]:
        """The adapter layers as the emulator numbers them."""
        return [self.emulator_index(f) for f in self.adapter_layers]

    def lora_on_emulator(self, lora: LoraState) -> LoraState:
        """The same LoRA with the emulator's layer numbers in its keys and config."""
        full = lora.config.get("layers_to_transform")
        if full is None:  # PEFT's "every layer"
            full = range(self.plan["num_layers"])
        layers = [self.emulator_index(f) for f in full]
        config = {**lora.config, "layers_to_transform": layers}
        return LoraState(to_emulator_keys(lora.tensors, self), config)

    def lora_on_full_model(self, lora: LoraState) -> LoraState:
        """The inverse of `lora_on_emulator`."""
        layers = [self.full_layers[j] for j in lora.config["layers_to_transform"]]
        config = {**lora.config, "layers_to_transform": layers}
        return LoraState(to_full_keys(lora.tensors, self), config)

    @property
    def strength_modules(self) -> tuple[str, ...] | None:
        """The layers the emulator stands in for, as `LoraState.scaled`'s modules: its kept
        middle layers, whose weights the server aligned and whose inputs pass through
        dropped layers in the full model; not its top (and bottom) layers, the full model's
        own. An adapter's part on the stand-in layers overshoots on the full model (× 0.5
        better, × 1.5 worse) while its part on the exact top layers does not (× 0.5 worse on
        all five populations measured; experiments/layer_transfer.py), so a served strength
        below 1 scales these only (`RunFolder.strength_modules`). None where nothing is
        stood in for."""
        stand_in = [f for f in self.full_layers if f not in self.adapter_layers]
        if self.exact or not stand_in:
            return None
        return tuple(f"{self.layers_path}.{layer}." for layer in stand_in)

    @property
    def exact(self) -> bool:
        """The client's LoRA computes what it would on the full model: no layer dropped (a
        client in full mode), or split, the dropped layers' output arriving as features.
        Nothing to align or correct."""
        return self.split or len(self.full_layers) == self.plan["num_layers"]

    @property
    def split(self) -> bool:
        """The top layers only, fed the hidden states entering `features_layer`."""
        return bool(self.plan.get("split", False))

    @property
    def features_layer(self) -> int:
        """The full-model layer whose input a split client receives as features."""
        if not self.split:
            raise EmulatorError("only a split emulator takes features")
        return self.full_layers[0]

    @property
    def aligned(self) -> bool:
        return bool(self.alignment.get("config", {}).get("steps"))


def layers_path(model: nn.Module) -> str:
    """The dotted name of the decoder's layer list (`model.layers`, `transformer.h`, ...)."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name:
            return name
    raise EmulatorError(f"{type(model).__name__}: no list of {n} decoder layers found")


def layer_importance(model: nn.Module, batches: Iterable[lm.Batch]) -> list[float]:
    """Per decoder layer, 1 − mean cosine between its input and output hidden states (ShortGPT's
    block influence): a layer that barely turns the residual stream can be dropped cheaply."""
    n = model.config.num_hidden_layers
    device = next(model.parameters()).device
    total, count = torch.zeros(n), 0
    with torch.no_grad():
        for batch in batches:
            out = model(
                input_ids=batch.ids.to(device),
                attention_mask=batch.mask.to(device),
                output_hidden_states=True,
            )
            keep = batch.mask.bool().to(device)
            states = out.hidden_states  # n + 1: the embeddings, then each layer's output
            for layer in range(n):
                cos = F.cosine_similarity(states[layer][keep], states[layer + 1][keep], dim=-1)
                total[layer] += float(1 - cos.mean())
            count += 1
    if count == 0:
        raise EmulatorError("layer importance needs at least one batch of text")
    return (total / count).tolist()


def build(
    model: nn.Module,
    plan: EmulatorPlan,
    base_model: str,
    importance: Sequence[float] | None = None,
) -> tuple[nn.Module, EmulatorInfo]:
    """A fresh emulator model (own weights, the full model untouched) and its description."""
    from transformers import AutoModelForCausalLM

    if plan.num_layers != model.config.num_hidden_layers:
        raise EmulatorError(
            f"plan is for {plan.num_layers} layers, model has {model.config.num_hidden_layers}"
        )
    path = layers_path(model)
    keep = plan.full_layers(importance)
    config = _subset_config(model.config, keep)
    weight = next(model.parameters())
    emulator = AutoModelForCausalLM.from_config(config, dtype=weight.dtype)
    emulator.load_state_dict(_subset_state(model.state_dict(), path, keep), strict=True)
    emulator.to(weight.device).eval().requires_grad_(False)  # where the full model is
    # What PEFT records as the adapters' base (it reads the attribute, not the config).
    emulator.config._name_or_path = emulator.name_or_path = base_model
    info = _describe(emulator, model, plan, path, keep, base_model, importance)
    return emulator, info


def full_model_info(model: nn.Module, base_model: str, top: int = 0) -> EmulatorInfo:
    """The full model described as an emulator that drops nothing, without copying it: what a
    client in full mode trains against."""
    n = model.config.num_hidden_layers
    plan = EmulatorPlan(n, top=top, drop=0.0)
    return _describe(model, model, plan, layers_path(model), list(range(n)), base_model, None)


def _describe(
    emulator: nn.Module,
    full: nn.Module,
    plan: EmulatorPlan,
    path: str,
    keep: list[int],
    base_model: str,
    importance: Sequence[float] | None,
) -> EmulatorInfo:
    info = EmulatorInfo(
        version="",
        base_model=base_model,
        plan=asdict(plan),
        full_layers=keep,
        adapter_layers=plan.adapter_layers,
        layers_path=path,
        params_full=_count(full),
        params_emulator=_count(emulator),
        importance=[round(float(x), 6) for x in importance or []],
    )
    info.version = version_id(emulator, info)
    return info


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


def save(
    emulator: nn.Module,
    info: EmulatorInfo,
    folder: Path,
    *,
    replace: bool = False,
    cache: bool = False,
) -> Path:
    """Write the emulator folder atomically (it appears whole or not at all);
    `replace`/`cache` as in `atomic.building_dir`."""
    with atomic.building_dir(
        Path(folder), replace=replace, cache=cache, kind="emulator"
    ) as building:
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
            raise EmulatorError(f"{key}: layer {index} is not a layer of this emulator")
        start, end = match.span()
        return f"{key[:start]}{match[1]}{path}.{mapping[index]}.{key[end:]}"

    return {rename(key): value for key, value in state.items()}


def to_full_keys(state: dict[str, Any], info: EmulatorInfo) -> dict[str, Any]:
    """LoRA keys on the emulator → the same LoRA on the full model."""
    return remap_layer_keys(state, info.layers_path, dict(enumerate(info.full_layers)))


def to_emulator_keys(state: dict[str, Any], info: EmulatorInfo) -> dict[str, Any]:
    """A full-model LoRA (on layers the emulator keeps) → the same LoRA on the emulator."""
    mapping = {full: j for j, full in enumerate(info.full_layers)}
    return remap_layer_keys(state, info.layers_path, mapping)
