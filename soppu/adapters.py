"""One PEFT LoRA adapter: its type in memory (`LoraState`), its one strict reader (headers up
front and tensors lazily, `read_adapter`; or whole, `read_lora`), its one writer
(`write_lora`, atomic, with the optional `training.json`) and its one validator for LoRAs that
arrive as tensors (`check_lora`).

An adapter dir is `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight` [k, n] and `.lora_B.weight` [m, k] (some tools put
`.default.` before `weight`; accepted on input, never written). Headers are read up front so
a population (`adapter_sets`) can be validated before any work; tensors are read one module
at a time. Pickled weights are never loaded.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from soppu import atomic
from soppu.errors import SoppuError
from soppu.tensor_file import DTYPES, Span, Stamp, read_layout, read_spans
from soppu.userids import UnsafeUserId, check_user_id

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TRAINING_NAME = "training.json"  # beside the two PEFT files; PEFT, LoRAX and vLLM ignore it
PICKLED_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")


class AdapterError(SoppuError, ValueError):
    """A bad adapter: the message names the file and what is wrong with it."""


@dataclass(frozen=True)
class ModuleInfo:
    key_a: str
    key_b: str
    rank: int
    shape: tuple[int, int]  # (out m, in n) of the delta
    scale: float  # lora_alpha / r, or lora_alpha / √r with rsLoRA
    spans: tuple[Span, Span]  # where lora_A's and lora_B's bytes lie in the file


@dataclass
class AdapterInfo:
    """What an adapter holds, from its config and safetensors header; no tensors loaded."""

    user: str
    path: Path
    config: dict[str, Any]
    modules: dict[str, ModuleInfo] = field(default_factory=dict)
    stamp: Stamp = (0, 0)  # the weights file's (size, mtime) when its header was read

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_NAME

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def load(self, module: str) -> tuple[Tensor, Tensor, float]:
        """(A, B, scale) of one module as float32, read lazily from the safetensors file."""
        return self.load_many([module])[module]

    def load_many(self, modules: Iterable[str]) -> dict[str, tuple[Tensor, Tensor, float]]:
        """(A, B, scale) of several modules from one open of the file; NaN or ±inf refused.

        Read at the offsets the validated header gave (`tensor_file`): a thousand users'
        files are read once per chunk of slots, and `safe_open` per read cost more than the
        compression of those slots."""
        path = self.weights_path
        infos = [(module, self.modules[module]) for module in modules]
        if not infos:
            return {}
        try:
            spans = [span for _, info in infos for span in info.spans]
            tensors = read_spans(path, spans, self.stamp)
        except OSError as exc:
            raise AdapterError(f"{path}: cannot read ({exc})") from exc
        if not is_sane(torch.cat([t.reshape(-1) for t in tensors])):  # one check for the lot
            names = [f"{module}.{side}" for module, _ in infos for side in ("lora_A", "lora_B")]
            for name, tensor in zip(names, tensors, strict=True):
                require_sane(f"{path}: {name}", tensor)
        return {
            module: (tensors[2 * j], tensors[2 * j + 1], info.scale)
            for j, (module, info) in enumerate(infos)
        }

    def check_finite(self) -> None:
        """Stream every tensor once (one file open); NaN or ±inf anywhere is refused."""
        try:
            with safe_open(self.weights_path, framework="pt") as handle:
                for module, info in self.modules.items():
                    for side, key in (("lora_A", info.key_a), ("lora_B", info.key_b)):
                        tensor = handle.get_tensor(key)
                        require_sane(f"{self.weights_path}: {module}.{side}", tensor)
        except (SafetensorError, OSError) as exc:
            raise AdapterError(f"{self.weights_path}: cannot read ({exc})") from exc


# Largest |weight| accepted: a real LoRA factor is ≪ 1; past this, B @ A and the Gram
# products of compression overflow float32 (max 3.4e38).
MAX_WEIGHT = 1e6


def is_sane(tensor: Tensor) -> bool:
    """No NaN, no ±inf, no |w| past MAX_WEIGHT: one reduction (max |w| is NaN if any value
    is, inf if any is)."""
    return not tensor.numel() or float(tensor.abs().max()) <= MAX_WEIGHT


def require_sane(where: str, tensor: Tensor) -> None:
    """Refuse NaN, ±inf and weights no trained LoRA has; `where` names the file and tensor."""
    if is_sane(tensor):
        return
    finite = torch.isfinite(tensor)
    if not finite.all():
        bad = int((~finite).sum())
        raise AdapterError(f"{where} has {bad} non-finite values (NaN or inf)")
    raise AdapterError(
        f"{where} holds |w| = {float(tensor.abs().max()):.3g}, past the {MAX_WEIGHT:g} no "
        "trained LoRA reaches (a corrupt or mis-scaled file)"
    )


def read_adapter(path: Path, user: str | None = None) -> AdapterInfo:
    """Read and check one adapter dir's config and header. The user id defaults to its name."""
    path = Path(path)
    user = user if user is not None else path.name
    try:
        check_user_id(user, source=str(path))
    except UnsafeUserId as exc:
        raise AdapterError(str(exc)) from exc
    return _read_checked(path, user)


def _read_checked(path: Path, user: str | None) -> AdapterInfo:
    """Every check of a dir but its name's (a starting adapter's dir may be called anything)."""
    if not path.is_dir():
        raise AdapterError(f"{path}: not a directory (expected a PEFT adapter dir)")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [name for name in PICKLED_NAMES if (path / name).exists()]
        if pickled:
            raise AdapterError(
                f"{path / pickled[0]}: pickled weights are never loaded (unpickling runs "
                f"arbitrary code); save the adapter with safetensors ({WEIGHTS_NAME})"
            )
        raise AdapterError(f"{weights}: missing")
    config = _read_config(path / CONFIG_NAME)
    info = AdapterInfo(user=user or path.name, path=path, config=config)
    info.modules, info.stamp = _read_modules(weights, config)
    return info


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AdapterError(f"{path}: missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc})") from exc
    except RecursionError:
        raise AdapterError(f"{path}: nested too deeply to be an adapter config") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{path}: peft_type is {peft_type}; only LoRA adapters are supported")
    if config.get("use_dora"):
        raise AdapterError(f"{path}: DoRA adapters (use_dora) are not supported")
    _positive(path, "r", config.get("r"), integer=True)
    _positive(path, "lora_alpha", config.get("lora_alpha"), integer=False)
    for key in ("rank_pattern", "alpha_pattern"):
        _check_patterns(path, key, config.get(key) or {}, integer=key == "rank_pattern")
    if config.get("modules_to_save"):
        raise AdapterError(f"{path}: modules_to_save is set; only LoRA deltas can be compressed")
    return config


# A LoRA scale or rank past these is a corrupt file, and would overflow float32 downstream.
MAX_RANK = 65536
MAX_ALPHA = 1e6


def _positive(path: Path, key: str, value: Any, *, integer: bool) -> None:
    kinds = (int,) if integer else (int, float)
    limit = MAX_RANK if integer else MAX_ALPHA
    if (
        not isinstance(value, kinds)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not 0 < value <= limit
    ):
        what = "a positive integer" if integer else "a positive finite number"
        raise AdapterError(f"{path}: {key} must be {what} up to {limit:g}, got {value!r}")


def _check_patterns(path: Path, key: str, patterns: Any, *, integer: bool) -> None:
    if not isinstance(patterns, dict):
        raise AdapterError(f"{path}: {key} must be an object of pattern → value")
    for pattern, value in patterns.items():
        try:
            re.compile(pattern)
        except re.error as exc:
            raise AdapterError(f"{path}: {key} {pattern!r} is not a regex ({exc})") from None
        _positive(path, f"{key}[{pattern!r}]", value, integer=integer)


def _read_modules(weights: Path, config: dict[str, Any]) -> tuple[dict[str, ModuleInfo], Stamp]:
    try:
        with safe_open(weights, framework="pt"):  # safetensors validates the header
            pass
        layout, stamp = read_layout(weights)  # ... which then gives each tensor's place
    except (SafetensorError, OSError, ValueError, KeyError, struct.error) as exc:
        raise AdapterError(f"{weights}: not a readable safetensors file ({exc})") from exc
    shapes = {key: span.shape for key, span in layout.items()}
    dtypes = {key: span.dtype for key, span in layout.items()}
    pairs: dict[str, dict[str, str]] = {}
    for key in shapes:
        match = _KEY.match(key)
        if not match:
            raise AdapterError(f"{weights}: unexpected tensor {key!r} (only lora_A/lora_B)")
        if dtypes[key] not in DTYPES:
            raise AdapterError(f"{weights}: {key} has dtype {dtypes[key]}, expected a float")
        pairs.setdefault(match["module"], {})[match["side"]] = key
    if not pairs:
        raise AdapterError(f"{weights}: holds no LoRA tensors")
    modules = {
        module: _module_info(weights, config, module, keys, shapes, layout)
        for module, keys in pairs.items()
    }
    return modules, stamp


def _module_info(
    weights: Path,
    config: dict[str, Any],
    module: str,
    keys: dict[str, str],
    shapes: dict,
    layout: Mapping[str, Span],
) -> ModuleInfo:
    if set(keys) != {"A", "B"}:
        missing = "lora_B" if "A" in keys else "lora_A"
        raise AdapterError(f"{weights}: {module} has no {missing} weight")
    a_shape, b_shape = shapes[keys["A"]], shapes[keys["B"]]
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
        raise AdapterError(
            f"{weights}: {module} lora_A {list(a_shape)} and lora_B {list(b_shape)} "
            "do not form B @ A (expected [k, in] and [out, k])"
        )
    rank = a_shape[0]
    expected = int(_pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
    if rank != expected:
        raise AdapterError(f"{weights}: {module} has rank {rank} but the config says r={expected}")
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    spans = (layout[keys["A"]], layout[keys["B"]])
    return ModuleInfo(keys["A"], keys["B"], rank, (b_shape[0], a_shape[1]), scale, spans)


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches the end of the module path."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


# Fields a plain LoRA config carries; anything else from the sources is dropped on export.
_TARGETING_KEYS = ("target_modules", "layers_to_transform", "layers_pattern", "fan_in_fan_out")


def lora_config(
    *, rank: int, base_model: str | None, source: Mapping[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    """A PEFT LoraConfig dict with one r and lora_alpha = r (scale 1), as LoRAX and vLLM want."""
    source = source or {}
    config = {
        "peft_type": "LORA",
        "task_type": source.get("task_type", "CAUSAL_LM"),
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "target_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "fan_in_fan_out": False,
    }
    config.update({key: source[key] for key in _TARGETING_KEYS if key in source})
    config.update(extra)
    return config


_PREFIX = "base_model.model."  # PEFT's prefix of every LoRA state-dict key


@dataclass
class LoraState:
    """A LoRA in memory: PEFT state-dict keys (`base_model.model.<module>.lora_A.weight`, no
    adapter name) with the full model's layer numbers, and its PEFT config."""

    tensors: dict[str, Tensor]
    config: dict

    @staticmethod
    def from_factors(factors: Mapping[str, tuple[Tensor, Tensor]], config: Mapping) -> LoraState:
        """From module → (A [k, n], B [m, k])."""
        tensors = {}
        for module, (A, B) in factors.items():
            tensors[f"{_PREFIX}{module}.lora_A.weight"] = A
            tensors[f"{_PREFIX}{module}.lora_B.weight"] = B
        return LoraState(tensors, dict(config))

    def scaled(self, scale: float, modules: Iterable[str] | None = None) -> LoraState:
        """This adapter with its update ΔW = B A scaled by `scale`: B scaled, A and the
        config kept, so it is a plain PEFT adapter still. `modules`: the module-name prefixes
        ("model.layers.12.") whose update is scaled, the rest kept as trained; where the
        adapter has none of them (or None), every module's."""
        if scale == 1.0:
            return self
        marks = tuple(f"{_PREFIX}{m}" for m in modules or ())
        if not any(k.startswith(marks) for k in self.tensors):
            marks = ("",)
        tensors = {
            k: v * scale if ".lora_B." in k and k.startswith(marks) else v
            for k, v in self.tensors.items()
        }
        return LoraState(tensors, self.config)

    def peft_config(self):
        from peft import LoraConfig

        values = {k: v for k, v in self.config.items() if k in LoraConfig.__dataclass_fields__}
        return LoraConfig(**values)


def blend(shared: LoraState, own: LoraState, weight: float) -> LoraState:
    """ΔW_shared + weight·(ΔW_own − ΔW_shared), exactly, as one plain PEFT LoRA: the two
    LoRAs side by side (rank r_shared + r_own), each part's scaling and weight folded into
    its B, lora_alpha = r so that PEFT's scaling is 1. Both must target the same modules and
    carry no rank or alpha patterns (SOPPU's own adapters never do)."""
    if set(shared.tensors) != set(own.tensors):
        raise AdapterError("blend: the two LoRAs target different modules")
    for lora in (shared, own):
        if lora.config.get("rank_pattern") or lora.config.get("alpha_pattern"):
            raise AdapterError("blend: LoRAs with rank or alpha patterns are not blended")
    rank = shared.config["r"] + own.config["r"]
    tensors = {}
    for a_key in (k for k in shared.tensors if k.endswith(".lora_A.weight")):
        b_key = a_key.replace(".lora_A.", ".lora_B.")
        tensors[a_key] = torch.cat([shared.tensors[a_key], own.tensors[a_key]], dim=0)
        tensors[b_key] = torch.cat(
            [
                (1 - weight) * _scaling(shared.config) * shared.tensors[b_key],
                weight * _scaling(own.config) * own.tensors[b_key],
            ],
            dim=1,
        )
    config = {**shared.config, "r": rank, "lora_alpha": rank, "use_rslora": False}
    return LoraState(tensors, config)


def _scaling(config: Mapping[str, Any]) -> float:
    """PEFT's scaling of a LoRA without patterns: alpha / r (rsLoRA: alpha / √r)."""
    root = math.sqrt(config["r"]) if config.get("use_rslora") else config["r"]
    return config["lora_alpha"] / root


def read_lora(path: Path) -> LoraState:
    """An adapter dir whole, in memory, with every check `read_adapter` makes and every
    value checked (finite, sane); keys written by other tools lose their adapter name."""
    path = Path(path)
    info = _read_checked(path, user=None)
    try:
        raw = load_file(info.weights_path)
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{info.weights_path}: cannot read ({exc})") from exc
    tensors = {}
    for key, tensor in raw.items():
        require_sane(f"{info.weights_path}: {key}", tensor)
        tensors[_ADAPTER_NAME.sub(r"\1.weight", key)] = tensor.float()
    return LoraState(tensors, info.config)


_ADAPTER_NAME = re.compile(r"(\.lora_[AB])\.[^.]+\.weight$")


def lora_files(lora: LoraState, training: Mapping | None = None) -> dict[str, bytes]:
    """The files of a PEFT adapter dir, as bytes: config, weights (float32) and, if given,
    `training.json` (what trained it; PEFT, LoRAX and vLLM ignore it)."""
    state = {k: v.detach().float().contiguous() for k, v in lora.tensors.items()}
    files = {
        CONFIG_NAME: (json.dumps(dict(lora.config), indent=2) + "\n").encode(),
        WEIGHTS_NAME: safetensors_bytes(state, metadata={"format": "pt"}),
    }
    if training is not None:
        files[TRAINING_NAME] = (json.dumps(dict(training), indent=2) + "\n").encode()
    return files


def write_lora(
    lora: LoraState,
    path: Path,
    training: Mapping | None = None,
    *,
    replace: bool = False,
    cache: bool = False,
) -> Path:
    """Write a PEFT adapter dir atomically: it appears whole or not at all; `replace` and
    `cache` as in `atomic.building_dir`."""
    with atomic.building_dir(Path(path), replace=replace, cache=cache, kind="adapter") as tmp:
        for name, data in lora_files(lora, training).items():
            (tmp / name).write_bytes(data)
    return Path(path)


def check_lora(lora: LoraState, template: Mapping[str, torch.Size], source: str) -> None:
    """Refuse a LoRA whose keys or shapes differ from `template`'s, or whose values are not
    sane (NaN, inf, past MAX_WEIGHT); `source` names where it came from."""
    missing = sorted(set(template) - set(lora.tensors))
    extra = sorted(set(lora.tensors) - set(template))
    if missing or extra:
        raise AdapterError(f"{source}: LoRA keys differ: missing {missing[:3]}, extra {extra[:3]}")
    for key, tensor in lora.tensors.items():
        if tuple(tensor.shape) != tuple(template[key]):
            raise AdapterError(
                f"{source}: {key} has shape {tuple(tensor.shape)}, expected {tuple(template[key])}"
            )
        require_sane(f"{source}: {key}", tensor)
