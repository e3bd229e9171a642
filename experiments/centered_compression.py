"""Does compressing each user's difference from the global adapter keep more of the
personal gain? Measured on the adapters a `gains.py` run trained, side by side with the
plain compression the pipeline does.

    python -m experiments.centered_compression                       # ≈ 8 minutes
    python -m experiments.centered_compression --run runs/experiments/gains-main-full

Centred: each (user, module) delta D_i is replaced by D_i − G (G the global adapter's
delta), written as one factored delta [s_i B_i, −s_g B_g] · [A_i; A_g], and compressed at
shared rank r; the published adapter is G + Û Σ_i V̂ᵀ, a LoRA of rank r_g + r (the global's
factors stacked on the exported core's). Storage counts the bases, the cores and the global
adapter, stored once. Plain: the pipeline's own compression of D_i.

Per user: held-out perplexity on the full model (the run's users and evaluation blocks, as
gains.py's sweep measures them) and the share kept of the personal gain over the global
adapter and over the base. Writes experiments/results/centered_<run name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from experiments.lib import RESULTS, RUNS, Judge, share_summaries
from soppu import atomic
from soppu.adapters import LoraState, read_adapter
from soppu.compression.compress import CompressionConfig, compress_slot
from soppu.compression.factors import LoRAFactors
from soppu.server.store import RunFolder

Factors = dict[str, LoRAFactors]


def factors(path: Path) -> Factors:
    info = read_adapter(path)
    return {m: LoRAFactors(*info.load(m)) for m in sorted(info.modules)}


def centred(f: LoRAFactors, g: LoRAFactors) -> LoRAFactors:
    """D_i − G as one factored delta of rank k_i + k_g, scale 1."""
    return LoRAFactors(torch.cat([f.A, g.A]), torch.cat([f.scale * f.B, -g.scale * g.B], 1), 1.0)


def compress_all(users: dict[str, Factors], center: Factors | None, rank: int):
    """Per user: module → (A, B) at scale 1; and the parameter counts before and after."""
    names = sorted(users)
    out: dict[str, dict] = {u: {} for u in names}
    after = sum(g.rank * sum(g.shape) for g in center.values()) if center else 0
    for module in sorted(next(iter(users.values()))):
        g = center[module] if center else None
        items = [centred(users[u][module], g) if g else users[u][module] for u in names]
        result = compress_slot(items, CompressionConfig(rank=rank))
        after += result.params_after()
        for i, user in enumerate(names):
            A, B = result.export(i, rank)
            if g:  # the global's factors stacked on the personal ones: G + Û Σ_i V̂ᵀ exactly
                A, B = torch.cat([g.A, A]), torch.cat([g.scale * g.B, B], 1)
            out[user][module] = (A, B)
    before = sum(f.rank * sum(f.shape) for u in names for f in users[u].values())
    return out, before, after


def measure(args: argparse.Namespace) -> dict:
    judge = Judge(args.run)
    folder = RunFolder(args.run)
    lora_config = read_adapter(folder.global_dir).config
    users = {u: factors(folder.root / "store" / u) for u in judge.evaluation}
    center = factors(folder.global_dir)
    rows = []
    for rank in [int(r) for r in args.ranks.split(",")]:
        for scheme, c in (("plain", None), ("centred", center)):
            adapters, before, after = compress_all(users, c, rank)

            def lora_of(user: str, adapters: dict = adapters) -> LoraState:
                r = next(iter(adapters[user].values()))[0].shape[0]
                return LoraState.from_factors(
                    adapters[user], {**lora_config, "r": r, "lora_alpha": r}
                )

            shares = judge.shares(lora_of)
            rows.append(
                {
                    "scheme": scheme,
                    "rank": rank,
                    "ratio": before / after,
                    **share_summaries(shares),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return {"run": str(args.run), "eval_tokens": judge.max_eval_tokens, "rows": rows}


def markdown(result: dict) -> str:
    lines = [
        f"Adapters of `{result['run']}`; the personal gain over global counted for the users "
        "whose personal adapter beats the global one.",
        "",
        "| scheme | shared rank | storage ratio | kept of the gain over base "
        "| kept of the personal gain over global: median | p25 | min |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['scheme']} | {r['rank']} | {r['ratio']:.1f}× | {r['kept_median']:.1%} | "
            f"**{r['kept_over_global_median']:.1%}** | {r['kept_over_global_p25']:.1%} | "
            f"{r['kept_over_global_min']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=RUNS / "gains-main-emulator")
    parser.add_argument("--ranks", default="2,4,8")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = measure(args)
    name = args.run.name
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic.write_text(RESULTS / f"centered_{name}.json", json.dumps(result, indent=2) + "\n")
    atomic.write_text(RESULTS / f"centered_{name}.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
