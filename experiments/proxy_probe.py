"""Does what the adapter taught the emulator transfer to the full model as a change of
log-probabilities? A probe on finished runs.

    python -m experiments.proxy_probe --runs RUN[,RUN...] [--ceilings RUN[,RUN...]] --users 6

An adapter trained on the emulator moves the full model less than it moved the emulator (out
of the alignment text's domain, 30–45% of full mode's gain). Its weights pass through layers
the emulator lacks; its *effect on the emulator's output* need not. Proxy-tuning (Liu et al.,
2024) adds a small tuned model's change of logits to a large model's: full + α·(emu+A − emu).
If that proxy, on each user's held-out text, gains about what full mode gains, then the
server can distil it into a full-model adapter on text it writes itself (no user's text
read), and the gap is the transfer of weights, not what the users taught. If the proxy gains
no more than the adapter plugged in, the emulator learned no more than it passes on.

Per user, on their held-out text (the first `--blocks` blocks): the perplexity change over the
base model of the full model with the personal adapter plugged in, of the emulator with it
(over the bare emulator), of the proxy at each α, and of the same user's full-mode adapter
(the ceiling, from the run in `--ceilings` at the same position); and the bare emulator
against the full model.

Writes experiments/results/proxy_probe_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import math
import statistics
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.lib import RESULTS, provenance, write_results
from soppu import basemodel, lm
from soppu.emulator import load
from soppu.personalize import attached
from soppu.server.prepare_run import choose_users, stored_config
from soppu.server.store import RunFolder


@torch.no_grad()
def log_probs(model, blocks, pad: int, precision: str) -> list[torch.Tensor]:
    """Per batch of 4 blocks, the log-softmax of the next-token logits (float32)."""
    return [
        F.log_softmax(lm.logits(model, batch, precision).float(), dim=-1)
        for batch in lm.batches(blocks, 4, pad)
    ]


def mean_nll(per_batch: list[torch.Tensor], blocks, pad: int) -> float:
    total, count = 0.0, 0
    for logp, batch in zip(per_batch, lm.batches(blocks, 4, pad), strict=True):
        total += float(lm.nll(logp, batch, reduction="sum"))
        count += batch.predicted_tokens
    return total / count


def change(nll: float, base: float) -> float:
    """Perplexity change over the base, in percent (negative: better)."""
    return 100 * (math.exp(nll - base) - 1)


def probe_run(path: Path, ceiling: Path | None, n_users: int, n_blocks: int, alphas) -> dict:
    run = RunFolder(path)
    config = stored_config(run)
    base = basemodel.load(config.base_model or None)
    pad, mixed = base.tokenizer.pad_token_id, config.precision
    emulator, info = load(run.emulator)
    texts_of = choose_users(config)
    per_user = {}
    for user in run.users()[:n_users]:
        blocks = lm.token_blocks(base.tokenizer, texts_of[user].test, config.training.seq_len)
        blocks = blocks[:n_blocks]
        lora = run.latest(user)
        full = log_probs(base.model, blocks, pad, mixed)
        emu = log_probs(emulator, blocks, pad, mixed)
        with attached(base.model, lora):
            full_a = log_probs(base.model, blocks, pad, mixed)
        with attached(emulator, info.lora_on_emulator(lora)):
            emu_a = log_probs(emulator, blocks, pad, mixed)
        nll = partial(mean_nll, blocks=blocks, pad=pad)
        at_base, at_emu = nll(full), nll(emu)
        row = {
            "bare emulator": change(at_emu, at_base),
            "plugged in": change(nll(full_a), at_base),
            "on the emulator": change(nll(emu_a), at_emu),
        }
        for alpha in alphas:
            proxy = [
                F.log_softmax(f + alpha * (ea - e), dim=-1)
                for f, ea, e in zip(full, emu_a, emu, strict=True)
            ]
            row[f"proxy α={alpha:g}"] = change(nll(proxy), at_base)
        if ceiling is not None:
            with attached(base.model, RunFolder(ceiling).latest(user)):
                row["full mode"] = change(nll(log_probs(base.model, blocks, pad, mixed)), at_base)
        per_user[user] = row
        print(f"{path.name} {user}: " + ", ".join(f"{k} {v:+.1f}%" for k, v in row.items()))
    columns = list(next(iter(per_user.values())))
    return {
        "run": path.name,
        "ceiling": ceiling.name if ceiling else None,
        "median": {c: statistics.median(u[c] for u in per_user.values()) for c in columns},
        "per_user": per_user,
    }


def markdown(result: dict) -> str:
    columns = list(result["rows"][0]["median"])
    lines = [
        f"`{result['command']}` at {result['commit']} on {result['date']}.",
        "",
        f"Perplexity change over the base model on each user's held-out text (the first "
        f"{result['blocks']} blocks), median over {result['users']} users; the emulator's over "
        "the bare emulator; the proxy is log p_full + α·(log p_emu+A − log p_emu), renormalised.",
        "",
        "| run | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['run']} | " + " | ".join(f"{r['median'][c]:+.1f}%" for c in columns) + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="finished emulator-mode runs")
    parser.add_argument("--ceilings", default="", help="full-mode runs of the same users")
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--alphas", default="0.5,1,1.5,2")
    parser.add_argument("--name", default="default")
    args = parser.parse_args()
    torch.set_num_threads(2)
    basemodel.quiet_libraries()
    runs = [Path(p) for p in args.runs.split(",")]
    ceilings = [Path(p) for p in args.ceilings.split(",")] if args.ceilings else [None] * len(runs)
    alphas = [float(a) for a in args.alphas.split(",")]
    rows = [
        probe_run(run, ceiling, args.users, args.blocks, alphas)
        for run, ceiling in zip(runs, ceilings, strict=True)
    ]
    result = {**provenance("proxy_probe"), "users": args.users, "blocks": args.blocks, "rows": rows}
    write_results(RESULTS / f"proxy_probe_{args.name}.json", result, markdown(result))


if __name__ == "__main__":
    main()
