"""Peer baselines for the compression benchmark: ``lorashare`` 0.1.3 and ``vlora-dev`` 1.0.0.

Both peers compress the LoRA factors A and B *separately* (one shared basis for the A's,
one for the B's, per module), minimising factor reconstruction error; neither looks at
the product B·A, so neither bounds ‖D − D̂‖.

* lorashare (import ``lorashare``, ``SHAREModel.from_adapters``; works on PEFT dirs only):
  per (module, side) it stacks every user's factor as a tall matrix (A transposed to
  n×r, B kept m×r) into d×(N·r), centres the columns, takes ``eigh`` of the d×d scatter
  and keeps the top K eigenvectors V (d×K). Per user it keeps loadings Vᵀ·W (K×r) and
  rebuilds W ≈ V·loadings — the mean used for the basis is *not* stored or added back.
  K is one global integer for all modules (or "auto": the largest K reaching a variance
  threshold in any group), clamped to the smallest feature dimension.
* vlora-dev (import ``vlora``, ``SharedSubspace.from_adapters``; takes in-memory
  ``LoRAWeights``): per (module, side) each user's factor is flattened to one row
  (A → r·n, B → m·r), the N rows are mean-centred and SVD'd; it keeps the mean row and
  the top K right singular vectors. Per user it keeps only K scalars per (module, side).
  K = min(n_components, N), one value for all modules unless ``adaptive_k``.

Neither package keeps a per-user LoRA scale in its compressed state (lorashare keeps the
whole adapter_config, vlora keeps none), so we keep one float per user ourselves and count it.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

Factors = tuple[torch.Tensor, torch.Tensor, float]
User = dict[str, Factors]
Plain = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class PeerResult:
    name: str
    reconstructions: list[dict[str, tuple[torch.Tensor, torch.Tensor, float]]]
    stored_params: int
    seconds: float


# ── shared preparation ────────────────────────────────────────────────────────


def _max_rank(users: list[User]) -> int:
    return max(a.shape[0] for user in users for a, _, _ in user.values())


def _pad(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad A rows / B columns to ``rank``: the product is unchanged.

    Both peers require one rank across users (they stack same-shaped factors), so
    padding is the most favourable way to let them see users of smaller rank.
    """
    extra = rank - a.shape[0]
    if extra == 0:
        return a, b
    a_pad = torch.cat([a, a.new_zeros(extra, a.shape[1])], dim=0)
    b_pad = torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)
    return a_pad, b_pad


def _prepare(user: User, rank: int) -> tuple[float, Plain]:
    """Return the user's scale s0 and factors with any per-module scale ratio folded into B.

    A PEFT adapter has one lora_alpha, so only a user-level scale can travel as metadata;
    when modules share one scale (the usual case) B is passed to the peer untouched.
    """
    first = user[min(user)][2]
    s0 = float(first) if first != 0 else 1.0
    plain: Plain = {}
    for module, (a, b, scale) in user.items():
        a32, b32 = _pad(a.detach().float().cpu(), b.detach().float().cpu(), rank)
        ratio = float(scale) / s0
        plain[module] = (a32.contiguous(), (b32 if ratio == 1.0 else b32 * ratio).contiguous())
    return s0, plain


def _numel(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors.values())


# ── lorashare ─────────────────────────────────────────────────────────────────


def _write_peft_dir(path: Path, factors: Plain, rank: int, scale: float) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    state: dict[str, torch.Tensor] = {}
    for module, (a, b) in factors.items():
        state[f"base_model.model.{module}.lora_A.weight"] = a
        state[f"base_model.model.{module}.lora_B.weight"] = b
    save_file(state, str(path / "adapter_model.safetensors"))
    # lorashare's validate_adapters demands equal r, base model and target_modules.
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": scale * rank,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in factors}),
        "base_model_name_or_path": "soppu-bench",
    }
    (path / "adapter_config.json").write_text(json.dumps(config))


def _read_lorashare(state: dict[str, torch.Tensor], modules: list[str], scale: float) -> User:
    return {
        m: (
            state[f"base_model.model.{m}.lora_A.weight"].float(),
            state[f"base_model.model.{m}.lora_B.weight"].float(),
            scale,
        )
        for m in modules
    }


def lorashare_compress(users: list[User], n_components: int) -> PeerResult:
    """SHARE PCA via ``SHAREModel.from_adapters`` on temporary PEFT dirs.

    Per-module bases are the package's only mode (one basis per module and side; the
    layer_by_layer / chunk_size options only change memory use), so nothing to choose.
    ``seconds`` covers from_adapters alone, which includes its own safetensors reads.
    """
    from lorashare import SHAREModel

    rank = _max_rank(users)
    prepared = [_prepare(u, rank) for u in users]
    names = [f"user_{i:04d}" for i in range(len(users))]
    with tempfile.TemporaryDirectory() as tmp:
        paths: dict[str, str] = {}
        for name, (scale, factors) in zip(names, prepared, strict=True):
            _write_peft_dir(Path(tmp) / name, factors, rank, scale)
            paths[name] = str(Path(tmp) / name)
        start = time.perf_counter()
        share = SHAREModel.from_adapters(paths, num_components=n_components)
        seconds = time.perf_counter() - start
    recon = [
        _read_lorashare(share.reconstruct(name), sorted(users[i]), prepared[i][0])
        for i, name in enumerate(names)
    ]
    # Counted: every shared component matrix (d×K per module and side) + every user's
    # loadings (K×r per module and side) — exactly what save_pretrained writes as tensors —
    # plus one scale per user (lora_alpha in the per-adapter config it also keeps).
    stored = _numel(share.components)
    stored += sum(_numel(loads) for loads in share.all_loadings.values())
    stored += len(users)
    return PeerResult("lorashare", recon, stored, seconds)


# ── vlora-dev ─────────────────────────────────────────────────────────────────


def vlora_compress(users: list[User], n_components: int) -> PeerResult:
    """Flattened-factor SVD via ``SharedSubspace.from_adapters`` on in-memory LoRAWeights.

    We pass ``num_components`` explicitly (a fixed K for all modules, like the other
    peer); vlora caps it at the number of users because each user is one SVD sample.
    """
    from vlora import LoRAWeights, SharedSubspace

    rank = _max_rank(users)
    prepared = [_prepare(u, rank) for u in users]
    names = [f"user_{i:04d}" for i in range(len(users))]
    adapters = [
        LoRAWeights(
            layer_names=sorted(factors),
            lora_a={m: ab[0] for m, ab in factors.items()},
            lora_b={m: ab[1] for m, ab in factors.items()},
            rank=rank,
        )
        for _, factors in prepared
    ]
    start = time.perf_counter()
    sub = SharedSubspace.from_adapters(adapters, task_ids=names, num_components=n_components)
    seconds = time.perf_counter() - start
    recon = []
    for (scale, _), name in zip(prepared, names, strict=True):
        weights = sub.reconstruct(name)
        recon.append({m: (weights.lora_a[m], weights.lora_b[m], scale) for m in weights.lora_a})
    return PeerResult("vlora", recon, _vlora_stored(sub, len(users)), seconds)


def _vlora_stored(sub: object, n_users: int) -> int:
    # Counted: components (K×r·n and K×m·r per module) + mean rows (r·n and m·r per module)
    # + every user's loadings (K per module and side) — the same terms as vlora's own
    # compression_stats() — plus one scale per user, which vlora does not keep at all.
    # Not counted: the K singular values per module and side that vlora also stores; they
    # are needed only for incremental absorb, not to rebuild an adapter.
    stored = _numel(sub.components_a) + _numel(sub.components_b)
    stored += _numel(sub.means_a) + _numel(sub.means_b)
    for task in sub.tasks.values():
        stored += _numel(task.loadings_a) + _numel(task.loadings_b)
    return stored + n_users


# ── self-check ────────────────────────────────────────────────────────────────


def _random_users(n_users: int, modules: list[str], dim: int, rank: int) -> list[User]:
    """Users whose factors share a 6-dim row/column space plus noise, so PCA has work to do."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    spaces = {m: (randn(6, dim), randn(dim, 6)) for m in modules}
    users: list[User] = []
    for _ in range(n_users):
        user: User = {}
        for m, (rows, cols) in spaces.items():
            a = randn(rank, 6) @ rows + 0.1 * randn(rank, dim)
            b = cols @ randn(6, rank) + 0.1 * randn(dim, rank)
            user[m] = (a / dim**0.5, b / dim**0.5, 2.0)
        users.append(user)
    return users


def _product_error(users: list[User], recon: list[User]) -> float:
    errors = []
    for user, rebuilt in zip(users, recon, strict=True):
        for m, (a, b, s) in user.items():
            a_hat, b_hat, s_hat = rebuilt[m]
            delta = s * b @ a
            residual = delta - s_hat * b_hat @ a_hat
            errors.append(float(torch.linalg.norm(residual) / torch.linalg.norm(delta)))
    return sum(errors) / len(errors)


def _main() -> None:
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    users = _random_users(8, modules, dim=64, rank=4)
    raw = sum(a.numel() + b.numel() + 1 for u in users for a, b, _ in u.values())
    print(f"8 users, 2 modules, m=n=64, k=4: raw factor params {raw}")
    for compress in (lorashare_compress, vlora_compress):
        for n_components in (2, 4):
            res = compress(users, n_components)
            err = _product_error(users, res.reconstructions)
            print(
                f"{res.name:9s} K={n_components}: rel product err {err:.4f}  "
                f"stored_params {res.stored_params:6d}  {res.seconds * 1e3:.1f} ms"
            )


if __name__ == "__main__":
    _main()
