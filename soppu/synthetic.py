"""Seeded synthetic per-user LoRA adapters with the structure real populations have.

Real users' adapters share a lot (style, format, the base model's preferred directions) and
differ in a smaller personal part. Per slot this draws a shared subspace of dimension
`shared_dim` with decaying importance, a population-wide common delta inside it, each user's own
mixture inside it, a personal component outside it, and a little noise. Each user's factors then
get a random gauge (B·G, G⁻¹·A), as independently trained LoRAs do, so methods that compress A
and B separately see what they would see in practice. `structure="random"` is the unstructured
hard case: independent Gaussian factors.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from soppu.adapters import LoraState, lora_config, write_lora

# (out, in) of the attention projections of SmolLM2-135M (hidden 576, 3 KV heads of 64).
SMOLLM2_SHAPES: dict[str, tuple[int, int]] = {"q_proj": (576, 576), "v_proj": (192, 576)}
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class PopulationSpec:
    users: int = 16
    layers: int = 30
    shapes: Mapping[str, tuple[int, int]] = None  # module name → (out, in); SmolLM2 q/v
    rank: int = 8
    alpha: float = 16.0
    shared_dim: int = 24
    personal: float = 0.35  # energy of the personal part relative to the shared part
    noise: float = 0.02
    structure: str = "shared"  # or "random"
    seed: int = 0
    base_model: str = SMOLLM2_ID

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self.shapes or SMOLLM2_SHAPES)


def module_path(layer: int, name: str) -> str:
    attn = {"q_proj", "k_proj", "v_proj", "o_proj"}
    return f"model.layers.{layer}.{'self_attn' if name in attn else 'mlp'}.{name}"


def population(spec: PopulationSpec) -> Iterator[tuple[str, dict[str, tuple[Tensor, Tensor]]]]:
    """Yield (user id, {module path: (A [k, n], B [m, k])}) for every user."""
    if spec.structure not in ("shared", "random"):
        raise ValueError(f"structure must be 'shared' or 'random', got {spec.structure!r}")
    bases = {
        (layer, name): _slot_basis(spec, shape, _seed(spec.seed, layer, name))
        for layer in range(spec.layers)
        for name, shape in spec.module_shapes().items()
    }
    for user in range(spec.users):
        tensors = {}
        for (layer, name), basis in bases.items():
            gen = torch.Generator().manual_seed(_seed(spec.seed, layer, name, user + 1))
            tensors[module_path(layer, name)] = _user_factors(spec, basis, gen)
        yield f"user{user:04d}", tensors


def write_population(spec: PopulationSpec, out: Path) -> list[Path]:
    """Write every user's adapter as a PEFT dir under `out`; returns the dirs."""
    out = Path(out)
    paths = []
    config = lora_config(
        rank=spec.rank,
        base_model=spec.base_model,
        source={"target_modules": sorted(spec.module_shapes())},
    )
    config["lora_alpha"] = spec.alpha
    for user, tensors in population(spec):
        path = out / user
        write_lora(LoraState.from_factors(tensors, config), path, replace=True)
        paths.append(path)
    return paths


@dataclass
class _SlotBasis:
    U: Tensor  # m × c, orthonormal
    V: Tensor  # n × c
    importance: Tensor  # c, decaying
    common: Tensor  # c × c, the population-wide part


def _slot_basis(spec: PopulationSpec, shape: tuple[int, int], seed: int) -> _SlotBasis:
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    c = min(spec.shared_dim, m, n)
    U, _ = torch.linalg.qr(torch.randn(m, c, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, c, generator=gen))
    importance = 1.0 / torch.arange(1, c + 1, dtype=torch.float32).sqrt()
    common = torch.randn(c, c, generator=gen) * importance[:, None] * importance[None, :]
    return _SlotBasis(U, V, importance, common)


def _user_factors(
    spec: PopulationSpec, basis: _SlotBasis, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    m, n = basis.U.shape[0], basis.V.shape[0]
    k = spec.rank
    if spec.structure == "random":
        return torch.randn(k, n, generator=gen) / n**0.5, torch.randn(m, k, generator=gen) * 0.05
    c = basis.U.shape[1]
    w = basis.importance
    # The user's delta inside the shared subspace: the common part plus their own mixture,
    # both squeezed into rank k (a LoRA can hold no more).
    mix = basis.common + 0.7 * torch.randn(c, c, generator=gen) * w[:, None] * w[None, :]
    left, s, right = torch.linalg.svd(mix)
    B = basis.U @ (left[:, :k] * s[:k].sqrt())
    A = (s[:k].sqrt()[:, None] * right[:k]) @ basis.V.T
    shared_energy = float((B @ A).norm())
    B = B + _personal(m, k, gen, spec.personal * shared_energy / (k**0.5))
    A = A + _personal(k, n, gen, spec.personal / (k**0.5))
    B = B + spec.noise * shared_energy / (m * k) ** 0.5 * torch.randn(m, k, generator=gen)
    G = _gauge(k, gen)
    scale = spec.alpha / k
    return torch.linalg.solve(G, A) / scale**0.5, (B @ G) * 0.02 / scale**0.5


def _personal(rows: int, cols: int, gen: torch.Generator, size: float) -> Tensor:
    return size * torch.randn(rows, cols, generator=gen) / max(rows, cols) ** 0.5


def _gauge(k: int, gen: torch.Generator) -> Tensor:
    """A random well-conditioned invertible k × k matrix (rotation times mild scaling)."""
    Q, _ = torch.linalg.qr(torch.randn(k, k, generator=gen))
    return Q * torch.exp(0.5 * torch.randn(k, generator=gen))[None, :]


def _seed(*parts: object) -> int:
    text = "/".join(str(p) for p in parts)
    value = 0
    for ch in text.encode():
        value = (value * 1_000_003 + ch) % (2**62)
    return value
