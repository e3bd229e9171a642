"""Factor-space compression (vlora-style PCA over the users' LoRA factors) against the
pipeline's joint diagonalisation, at matched storage, on a finished run's adapters.

    python -m experiments.factor_space --runs main-walk,pop-scale-fortunes-emulator-generated

Adapters that all start from one global adapter share a gauge (fedavg-ft resets every user to
the global factors each round), and a method on the factors themselves can use that: per module,
A_i ≈ Ā + Σ_j c_ij P_j and B_i ≈ B̄ + Σ_j d_ij Q_j (centred PCA over the users, r components
each), D̂_i = s·B̂_i·Â_i. Storage counts the means, the components and the coefficients; the
joint fit's counts its bases and cores (both in float32 here: 8-bit codes shrink both alike).
A copy of the same adapters in a random gauge per user ((B G, G⁻¹ A), the same deltas) shows
what each method owes to the shared gauge.

Per method and setting: the storage ratio against the users' factors, and the product errors
‖D_i − D̂_i‖ / ‖D_i‖ (pooled over users and modules, and the worst user) and of the personal
part (D_i − D̄ against D̂_i − mean D̂, pooled). Pure tensors; a run takes seconds per setting.
Writes experiments/results/factor_space[_<name>].json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import Tensor

from experiments.lib import RESULTS, RUNS, provenance, write_results
from soppu.adapters import read_adapter
from soppu.compression.compress import CompressionConfig, compress_slot
from soppu.compression.factors import LoRAFactors
from soppu.server.store import RunFolder

Users = dict[str, dict[str, LoRAFactors]]  # user → module → factors


def load_users(run: Path) -> Users:
    folder = RunFolder(run)
    found = {}
    for user in folder.users():
        info = read_adapter(folder.store / user)
        found[user] = {m: LoRAFactors(*info.load(m)) for m in sorted(info.modules)}
    return found


def random_gauge(users: Users, seed: int = 0) -> Users:
    """The same deltas, each user's factors in a random gauge: (B·G, G⁻¹·A)."""
    generator = torch.Generator().manual_seed(seed)
    out: Users = {}
    for user, modules in users.items():
        out[user] = {}
        for module, f in modules.items():
            k = f.rank
            q, _ = torch.linalg.qr(torch.randn(k, k, generator=generator, dtype=torch.float64))
            scale = torch.exp(torch.randn(k, generator=generator, dtype=torch.float64))
            gauge = q * scale
            A = (torch.linalg.inv(gauge) @ f.A.double()).float()
            out[user][module] = LoRAFactors(A, (f.B.double() @ gauge).float(), f.scale)
    return out


def factor_pca(stack: Tensor, r: int) -> tuple[Tensor, int]:
    """Rows of `stack` (N × p) through their mean and top-r principal components; the
    reconstruction and the floats stored (mean, components, coefficients)."""
    mean = stack.mean(0, keepdim=True)
    centred = stack - mean
    if r == 0:
        return mean.expand_as(stack), stack.shape[1]
    U, S, Vh = torch.linalg.svd(centred, full_matrices=False)
    r = min(r, S.numel())
    recon = mean + (U[:, :r] * S[:r]) @ Vh[:r]
    return recon, stack.shape[1] * (1 + r) + stack.shape[0] * r


def errors(deltas: list[Tensor], approx: list[Tensor]) -> tuple[Tensor, Tensor, float, float]:
    """Per user ‖D − D̂‖², ‖D‖²; the personal part's pooled squared error and norm."""
    D, H = torch.stack(deltas), torch.stack(approx)
    err = ((D - H) ** 2).sum((1, 2))
    norm = (D**2).sum((1, 2))
    P = D - D.mean(0)
    Q = H - H.mean(0)
    return err, norm, float(((P - Q) ** 2).sum()), float((P**2).sum())


def measure(users: Users, method: str, setting: float, weights: str) -> dict:
    names = sorted(users)
    modules = sorted(users[names[0]])
    before = after = 0
    per_user_err = torch.zeros(len(names), dtype=torch.float64)
    per_user_norm = torch.zeros(len(names), dtype=torch.float64)
    p_err = p_norm = 0.0
    for module in modules:
        items = [users[u][module] for u in names]
        deltas = [f.delta() for f in items]
        before += sum(f.rank * sum(f.shape) for f in items)
        if method == "joint":
            config = CompressionConfig(energy=setting, bits=32, weights=weights)
            result = compress_slot(items, config)
            approx = [result.reconstruct(i) for i in range(len(items))]
            after += result.params_after()
        else:
            r = int(setting)
            A, a_floats = factor_pca(torch.stack([f.A.double().flatten() for f in items]), r)
            B, b_floats = factor_pca(torch.stack([f.B.double().flatten() for f in items]), r)
            approx = [f.scale * B[i].view_as(f.B) @ A[i].view_as(f.A) for i, f in enumerate(items)]
            after += a_floats + b_floats
        err, norm, pe, pn = errors(deltas, approx)
        per_user_err += err
        per_user_norm += norm
        p_err += pe
        p_norm += pn
    user_errors = (per_user_err / per_user_norm).sqrt()
    return {
        "method": method,
        "setting": setting,
        "ratio": before / after,
        "error_pooled": float((per_user_err.sum() / per_user_norm.sum()).sqrt()),
        "error_worst_user": float(user_errors.max()),
        "personal_error": (p_err / p_norm) ** 0.5 if p_norm else float("nan"),
    }


def run_rows(run: Path, energies: list[float], components: list[int], weights: str) -> list[dict]:
    shared = load_users(run)
    rows = []
    for gauge, users in (("shared", shared), ("random", random_gauge(shared))):
        settings = [("joint", e) for e in energies] + [("factor", r) for r in components]
        for method, setting in settings:
            if gauge == "random" and method == "joint" and setting != 0.98:
                continue  # gauge-free: the same numbers as in the shared gauge
            row = {"run": run.name, "users": len(users), "gauge": gauge}
            rows.append(row | measure(users, method, setting, weights))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = [
        f"`{result['command']}` at {result['commit']} on {result['date']}; the joint fit's "
        f"weights: {result.get('weights', 'uniform')}",
        "",
        "| run | users | gauge | method | setting | storage ratio (fp32) | product error: pooled "
        "| worst user | personal part's error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        setting = f"energy {r['setting']}" if r["method"] == "joint" else f"r = {r['setting']}"
        lines.append(
            f"| {r['run']} | {r['users']} | {r['gauge']} | {r['method']} | {setting} | "
            f"{r['ratio']:.1f}× | {r['error_pooled']:.3f} | {r['error_worst_user']:.3f} | "
            f"{r['personal_error']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="run names under runs/experiments")
    parser.add_argument("--energies", default="0.9,0.95,0.98,0.99,0.999")
    parser.add_argument("--components", default="0,1,2,3")
    parser.add_argument("--weights", default="norm", help="the joint fit's (the federation's)")
    parser.add_argument("--name", default="")
    args = parser.parse_args()
    torch.set_num_threads(2)
    target = RESULTS / ("factor_space" + (f"_{args.name}" if args.name else "") + ".json")
    if target.is_file():
        held = json.loads(target.read_text())
        if (held["runs"], held.get("weights", "uniform")) != (args.runs, args.weights):
            sys.exit(f"{target} holds other runs or weights; choose another --name")
    energies = [float(e) for e in args.energies.split(",")]
    components = [int(r) for r in args.components.split(",")]
    rows = []
    for name in args.runs.split(","):
        rows += run_rows(RUNS / name, energies, components, args.weights)
    result = {**provenance("factor_space.py"), "runs": args.runs, "weights": args.weights}
    result["rows"] = rows
    write_results(target, result, markdown(result))


if __name__ == "__main__":
    main()
