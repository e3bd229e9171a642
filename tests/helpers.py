"""Test helpers: tiny random adapters and populations, made on the fly."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from soppu.adapters import LoraState, lora_config, write_lora
from soppu.compression import LoRAFactors


def random_factors(
    count: int, m: int, n: int, k: int, *, seed: int = 0, shared: int = 0, scale: float = 1.0
) -> list[LoRAFactors]:
    """Random LoRA deltas; with shared > 0 they live in common subspaces of that dimension."""
    gen = torch.Generator().manual_seed(seed)
    if shared:
        Ub = torch.linalg.qr(torch.randn(m, shared, generator=gen))[0]
        Vb = torch.linalg.qr(torch.randn(n, shared, generator=gen))[0]
    items = []
    for _ in range(count):
        if shared:
            B = Ub @ torch.randn(shared, k, generator=gen)
            A = torch.randn(k, shared, generator=gen) @ Vb.T
        else:
            B, A = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
        items.append(LoRAFactors(A, B, scale))
    return items


def write_users(
    root: Path,
    users: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]],
    *,
    rank: int,
    alpha: float,
    base_model: str = "tiny-llama",
    replace: bool = False,
    **extra,
) -> dict[str, Path]:
    config = lora_config(
        rank=rank, base_model=base_model, source={"target_modules": ["q_proj", "v_proj"]}, **extra
    )
    config["lora_alpha"] = alpha
    paths = {}
    for user, tensors in users.items():
        write_lora(LoraState.from_factors(tensors, config), root / user, replace=replace)
        paths[user] = root / user
    return paths


TINY_SHAPES = {"q_proj": (64, 64), "v_proj": (32, 64)}


def tiny_population(count: int, *, k: int = 4, layers: int = 2, seed: int = 0, shared: int = 6):
    """{user: {module path: (A, B)}} with the tiny Llama's q/v shapes."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    bases = {}
    for layer in range(layers):
        for name, (m, n) in TINY_SHAPES.items():
            bases[(layer, name)] = (
                torch.linalg.qr(torch.randn(m, shared, generator=gen))[0],
                torch.linalg.qr(torch.randn(n, shared, generator=gen))[0],
            )
    for u in range(count):
        tensors = {}
        for (layer, name), (Ub, Vb) in bases.items():
            B = Ub @ torch.randn(shared, k, generator=gen) + 0.05 * torch.randn(
                Ub.shape[0], k, generator=gen
            )
            A = torch.randn(k, shared, generator=gen) @ Vb.T
            tensors[f"model.layers.{layer}.self_attn.{name}"] = (A * 0.3, B * 0.3)
        out[f"user{u:02d}"] = tensors
    return out


SAMPLE_TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. "
)


def tiny_tokenizer(vocab_size: int = 300):
    """A real byte-level BPE tokenizer, trained in milliseconds on a sentence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([SAMPLE_TEXT * 4], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_causal_lm(layers: int = 6, vocab_size: int = 300, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def write_tiny_model(path: Path, layers: int = 6) -> Path:
    """A tiny random Llama with a real tokenizer, saved as a plain HF folder."""
    tiny_causal_lm(layers).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_users_jsonl(path: Path, users: dict[str, int], seed: int = 0) -> Path:
    """JSONL rows (user_id, text): each user gets `chars` characters in several rows."""
    import json
    import random

    rng = random.Random(seed)
    words = SAMPLE_TEXT.split()
    rows = []
    for user, chars in users.items():
        written = 0
        while written < chars:
            line = " ".join(rng.choice(words) for _ in range(12))
            rows.append({"user_id": user, "text": line})
            written += len(line) + 1
    rng.shuffle(rows)  # users' rows interleave, as in real logs
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_served(root: Path) -> tuple[Path, Path]:
    """A tiny 2-layer Llama and a serving dir holding 4 users (v0001)."""
    model = write_tiny_model(root / "model", layers=2)
    paths = write_users(
        root / "adapters", tiny_population(4, k=4, layers=2), rank=4, alpha=8, base_model=str(model)
    )
    from soppu.compression import CompressionConfig
    from soppu.server.compression_round import compress_and_publish

    compress_and_publish(paths, root / "store", root / "serving", CompressionConfig(rank=16))
    return root, model


@contextmanager
def lorax_client(into: Path) -> Iterator[type]:
    """`lorax.Client` from the lorax-client 0.6.3 wheel on PyPI, imported from the wheel itself
    (pure Python), unchanged."""
    import subprocess
    import sys

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "-d",
            str(into),
            "lorax-client==0.6.3",
        ],
        check=True,
        timeout=120,
    )
    wheel = str(next(Path(into).glob("lorax_client-*.whl")))
    sys.path.insert(0, wheel)
    try:
        from lorax import Client

        yield Client
    finally:
        sys.path.remove(wheel)


def generated_rows() -> list[dict[str, str]]:
    """Rows for `--data py:helpers:generated_rows` (the function source): the rows
    `write_users_jsonl` writes for three users, in the same order."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = write_users_jsonl(Path(tmp) / "rows.jsonl", GENERATED_USERS)
        return [json.loads(line) for line in path.read_text().splitlines()]


GENERATED_USERS = {"alice": 3000, "bob": 2000, "carol": 1500}


def not_rows() -> list[str]:
    return ["a row must be a mapping of columns"]
