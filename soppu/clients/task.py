"""A client's work, without Flower: find its user, hold the emulator, train and evaluate.

A client process may serve many (simulated) nodes, so everything it loads is cached per
process: the users' text per data source, the tokenizer per base model, and the emulator per
version, in memory and on disk (`$SOPPU_CACHE/emulators/<version>/`). The emulator reaches a
node once, in the server's "install" message; a client that restarts finds it on disk. In
full mode the "emulator" the server installs is the full model itself (no layer dropped).

Where the server asks for a repair (`repair-steps`), a node first tunes its emulator on its
user's training text towards what scoring that text answers (`soppu.repair`, its teacher from
`soppu.teachers`), once per emulator version and repair setting; the repaired middle layers
stay on the node (`<version>/repairs/<user>-<setting>.safetensors`) and are that user's
emulator from then on, in training and evaluation. A repair that does not close enough of
the emulator's gap to the full model on the user's validation text is undone (`soppu.repair`'s
check), and the file records only that: the node trains on the emulator as sent and does not
repair again.

A split emulator (`--client-mode split`) holds the top layers only; the hidden states entering
them for the user's text come from the node's feature source (`soppu.features`), asked once
per block where the emulator first meets it.

A client trains on CUDA when the server asks for it (`client-gpus` in the run config) or its
node config says `device=cuda`, and torch sees a GPU; otherwise on the CPU.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file
from torch import nn

from soppu import atomic, cache, features, lm
from soppu.adapters import LoraState
from soppu.basemodel import load_tokenizer, quiet_libraries
from soppu.cache import cache_dir
from soppu.data import SHAKESPEARE, DataError, UserText, load_users
from soppu.emulator import META_NAME, EmulatorError, EmulatorInfo, load, version_id
from soppu.errors import SoppuError
from soppu.messages import Setup
from soppu.personalize import PersonalizeResult, TrainConfig, attached, personalize
from soppu.repair import RepairConfig, RepairReport, TeacherError, middle_state
from soppu.repair import repair as repair_middle_layers
from soppu.sources import runs_code
from soppu.teachers import Teacher
from soppu.userids import check_user_id

quiet_libraries()
# (version, device, repair file name or "") → the emulator; one at a time
_EMULATORS: dict[tuple[str, str, str], tuple[nn.Module, EmulatorInfo]] = {}


class MissingEmulator(LookupError):
    """This node does not hold the emulator version it was asked to use."""


def emulator_root() -> Path:
    return cache_dir() / "emulators"


def my_user(node_config: dict, setup: Setup) -> str:
    """The node's user: `user-id` from its node config, else its simulation partition's."""
    if "user-id" in node_config:
        return check_user_id(str(node_config["user-id"]), "node config user-id")
    if "partition-id" not in node_config:
        raise DataError("node config has neither user-id nor partition-id: cannot tell my user")
    partition = int(node_config["partition-id"])
    if not 0 <= partition < len(setup.users):
        raise DataError(f"partition {partition} has no user: the server sent {len(setup.users)}")
    return setup.users[partition]


def my_text(node_config: dict, setup: Setup) -> UserText:
    user = my_user(node_config, setup)
    data = str(node_config.get("data", setup.data)) or SHAKESPEARE
    if "data" not in node_config and "user-id" in node_config and runs_code(data):
        # A real node runs code only from its own config, never because a server said so.
        raise DataError(
            f"the server asks this node to read {data!r}, which runs code: name it in this "
            "node's own config (data=...) to allow it"
        )
    users = _users(data, json.dumps(setup.options.__dict__, sort_keys=True))
    if user not in users:
        raise DataError(f"{data}: no user {user!r} with enough text on this node")
    return users[user]


@lru_cache(maxsize=2)
def _users(data: str, options_json: str) -> dict[str, UserText]:
    from soppu.data import DataOptions

    return load_users(data, DataOptions(**json.loads(options_json)))


@lru_cache(maxsize=2)
def tokenizer_for(base_model: str):
    return load_tokenizer(base_model)


def held_versions() -> list[str]:
    on_disk = {p.name for p in emulator_root().glob("emu-*") if (p / META_NAME).is_file()}
    return sorted(on_disk | {key[0] for key in _EMULATORS})  # (version, device, repair)


def device_for(requested: str) -> str:
    """ "cuda" only if asked for and torch sees a GPU; anything else trains on the CPU."""
    return "cuda" if requested == "cuda" and torch.cuda.is_available() else "cpu"


FeatureFactory = Callable[[int], features.FeatureSource]  # the split layer → the node's source


def emulator(
    version: str, device: str = "cpu", feature_source: FeatureFactory | None = None
) -> tuple[nn.Module, EmulatorInfo]:
    """The emulator of this version, from memory or this node's disk cache; a split one asks
    this node's `feature_source(layer)` for the features of blocks it has not met."""
    model, info = _cached(version, device, "", lambda model, info: None)
    if info.split:
        if feature_source is None:
            raise features.NoFeatures(f"emulator {version} is split: it needs a feature source")
        # asked every time: the emulator is cached per process, the source is this node's
        features.attach(model, info, feature_source(info.features_layer))
    return model, info


def _cached(
    version: str, device: str, name: str, change: Callable
) -> tuple[nn.Module, EmulatorInfo]:
    """The emulator of this version as `change(model, info)` leaves it, cached under `name`."""
    if (version, device, name) not in _EMULATORS:
        folder = emulator_root() / version
        if not (folder / META_NAME).is_file():
            raise MissingEmulator(f"emulator {version} is not installed on this node")
        _EMULATORS.clear()  # one at a time: a new one replaces the old in memory
        model, info = load(folder, device=device)
        change(model, info)
        _EMULATORS[version, device, name] = model, info
        cache.mark_used(folder)  # what `soppu cache prune` goes by
    return _EMULATORS[version, device, name]


def repaired(
    user: UserText,
    version: str,
    config: RepairConfig,
    seq_len: int,
    base_model: str,
    teacher: Callable[[], Teacher],
    device: str = "cpu",
) -> tuple[nn.Module, EmulatorInfo, RepairReport | None]:
    """This user's repaired emulator: from memory, from the node's disk, or repaired now
    (`teacher()` asked only then), with the report of a repair made now."""
    path = emulator_root() / version / "repairs" / f"{user.user_id}-{config.key()}.safetensors"
    made: list[RepairReport] = []

    def change(model: nn.Module, info: EmulatorInfo) -> None:
        if path.is_file():
            _load_repair(model, info, path)
            return
        tokenizer = tokenizer_for(base_model)
        texts = repair_texts(user, tokenizer, seq_len, config)
        checks = [tokenizer.decode(b) for b in lm.token_blocks(tokenizer, user.validation, seq_len)]
        if not checks:
            raise DataError(f"user {user.user_id!r} has no validation text to check a repair on")
        try:
            ask = teacher()
            answers, check = ask.answer(texts), ask.answer(checks)
        except SoppuError as exc:  # an unreachable server, a refusal, a bad answer
            raise TeacherError(str(exc)) from exc
        report = repair_middle_layers(
            model, info, answers, tokenizer.pad_token_id, config, check=check
        )
        made.append(report)
        path.parent.mkdir(exist_ok=True)
        # Not kept: recorded too, so the node neither repairs again nor loads anything.
        state = middle_state(model, info) if report.kept else {}
        atomic.write_bytes(path, save(state, metadata={"kept": str(report.kept).lower()}))

    model, info = _cached(version, device, path.name, change)
    return model, info, (made[0] if made else None)


def repair_texts(user: UserText, tokenizer, seq_len: int, config: RepairConfig) -> list[str]:
    """The pieces of training text the teacher is asked about: the user's training blocks, a
    seeded choice of `config.pieces` of them where there are more."""
    blocks = lm.token_blocks(tokenizer, user.train, seq_len)
    if not blocks:
        raise DataError(f"user {user.user_id!r} has no training text to repair on")
    return [tokenizer.decode(block) for block in config.chosen(blocks)]


def _load_repair(model: nn.Module, info: EmulatorInfo, path: Path) -> None:
    """A repair the node made before: its middle layers, or nothing where it was not kept."""
    with safe_open(path, "pt") as f:
        kept = (f.metadata() or {}).get("kept")
    state = load_file(path)
    if kept == "false" and not state:
        return
    expected = middle_state(model, info)
    if (
        kept != "true"
        or set(state) != set(expected)
        or any(state[k].shape != v.shape for k, v in expected.items())
    ):
        raise EmulatorError(f"{path}: not this emulator's middle layers; delete it to repair anew")
    model.load_state_dict(state, strict=False)


def install(files: dict[str, str], state: dict[str, torch.Tensor]) -> str:
    """Rebuild the server's emulator folder in the cache; check its content id; return it."""
    info = EmulatorInfo(**json.loads(files[META_NAME]))
    check_user_id(info.version, "emulator version")  # it becomes a directory name
    target = emulator_root() / info.version
    if (target / META_NAME).is_file():
        return info.version
    # Built beside the cache entry and renamed in whole; a killed node's half-built folder is
    # removed by the next install (atomic.building_dir). Two nodes of one machine installing
    # at once take turns, the second replacing the first's entry with the same content.
    with atomic.building_dir(target, cache=True) as building:
        for name, text in files.items():
            (building / Path(name).name).write_text(text)
        save_file({k: v.contiguous() for k, v in state.items()}, building / "model.safetensors")
        model, loaded = load(building)
        if version_id(model, loaded) != info.version:
            raise EmulatorError(f"emulator {info.version}: received weights do not match its id")
    return info.version


def train(
    user: UserText,
    version: str,
    config: TrainConfig,
    start: LoraState | None,
    base_model: str,
    correction: dict[str, torch.Tensor] | None = None,
    device: str = "cpu",
    anchor: LoraState | None = None,
    prox: float = 0.0,
    stop_every: int = 0,
    repair: RepairConfig | None = None,
    teacher: Callable[[], Teacher] | None = None,
    feature_source: FeatureFactory | None = None,
) -> tuple[PersonalizeResult, RepairReport | None]:
    """The user's LoRA trained on their emulator (repaired first where `repair` asks; fed its
    features where it is split), and the report of a repair made in this call."""
    model, info, report = _user_emulator(
        user, version, config, base_model, device, repair, teacher, feature_source
    )
    tokenizer = tokenizer_for(base_model)
    result = personalize(
        user,
        model,
        info,
        tokenizer,
        config,
        start=start,
        correction=correction or None,
        anchor=anchor,
        prox=prox,
        stop_every=stop_every,
    )
    return result, report


def evaluate(
    user: UserText,
    version: str,
    config: TrainConfig,
    lora: LoraState,
    base_model: str,
    device: str = "cpu",
    repair: RepairConfig | None = None,
    teacher: Callable[[], Teacher] | None = None,
    feature_source: FeatureFactory | None = None,
) -> tuple[float, int]:
    """Held-out loss (mean per token) of `lora` on the user's emulator, and the tokens
    evaluated."""
    model, info, _ = _user_emulator(
        user, version, config, base_model, device, repair, teacher, feature_source
    )
    tokenizer = tokenizer_for(base_model)
    blocks = lm.token_blocks(tokenizer, user.test, config.seq_len, config.max_eval_tokens)
    if not blocks:
        raise DataError(f"user {user.user_id!r} has no held-out text to evaluate")
    with attached(model, info.lora_on_emulator(lora)) as peft_model:
        pad = tokenizer.pad_token_id
        ppl = lm.perplexity(peft_model, blocks, pad, config.batch_size, config.precision)
    return math.log(ppl), sum(b.numel() for b in blocks)


def _user_emulator(user, version, config, base_model, device, repair, teacher, feature_source):
    """The emulator this user trains and evaluates on: repaired where `repair` asks."""
    if repair is None:
        return (*emulator(version, device_for(device), feature_source), None)
    if teacher is None:
        raise ValueError("a repair needs a teacher")
    return repaired(user, version, repair, config.seq_len, base_model, teacher, device_for(device))
