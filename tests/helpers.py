"""Test helpers: tiny random adapters and populations, made on the fly."""

from __future__ import annotations

from pathlib import Path

import torch

from compression import LoRAFactors
from soppu.adapters import lora_config, write_adapter


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
        write_adapter(root / user, tensors, config, replace=replace)
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
