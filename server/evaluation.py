"""After the run: each user's held-out perplexity, and how much of their gain compression keeps.

For every user in the store (simulation: the server can read the users' held-out text):
base model alone; the global adapter (fedavg); the personal adapter on the emulator (the
client's own measurement, from metrics.jsonl); the personal adapter on the full model; and the
published compressed adapter (`serving/current/users/<user>`) on the full model. The share of
the gain kept is (base − compressed) / (base − personal), both on the full model.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path
from typing import Any

from torch import nn

from server.publish import CURRENT
from server.store import RunFolder
from soppu import atomic, lm
from soppu.data import UserText
from soppu.personalize import LoraState, TrainConfig, attached, read_lora

COLUMNS = ("base", "global", "emulator", "personal", "compressed")


def evaluate_run(
    run: RunFolder,
    model: nn.Module,
    tokenizer,
    users: dict[str, UserText],
    config: TrainConfig,
    progress=lambda user, done, total: None,
) -> dict[str, Any]:
    """Evaluate every stored user; write RUN/evaluation.{json,md,csv}; return the result."""
    serving = run.serving / CURRENT / "users"
    global_lora = run.global_adapter()
    emulator_loss = _latest_emulator_loss(run)
    stored = [u for u in run.users() if u in users]
    rows = []
    for done, user in enumerate(stored):
        progress(user, done, len(stored))
        blocks = lm.token_blocks(
            tokenizer, users[user].test, config.seq_len, config.max_eval_tokens
        )

        def ppl(lora: LoraState | None, blocks=blocks) -> float | None:
            if lora is None:
                return None
            with attached(model, lora) as peft_model:
                return lm.perplexity(peft_model, blocks, tokenizer.pad_token_id, config.batch_size)

        published = serving / user
        row = {
            "user": user,
            "tokens": sum(b.numel() for b in blocks),
            "base": lm.perplexity(model, blocks, tokenizer.pad_token_id, config.batch_size),
            "global": ppl(global_lora),
            "emulator": math.exp(emulator_loss[user]) if user in emulator_loss else None,
            "personal": ppl(run.latest(user)),
            "compressed": ppl(read_lora(published)) if published.is_dir() else None,
        }
        row["kept"] = gain_kept(row["base"], row["personal"], row["compressed"])
        rows.append(row)
    result = {"users": rows, "summary": summarise(rows)}
    write(run.root, result)
    return result


def gain_kept(base: float, personal: float | None, compressed: float | None) -> float | None:
    """Share of the personal adapter's perplexity gain the compressed one keeps."""
    if personal is None or compressed is None or base - personal <= 0:
        return None  # no gain to keep
    return (base - compressed) / (base - personal)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    kept = sorted(r["kept"] for r in rows if r["kept"] is not None)
    improved = [r for r in rows if r["personal"] is not None and r["personal"] < r["base"]]
    summary: dict[str, Any] = {
        "users": len(rows),
        "improved": len(improved),
        "kept_users": len(kept),
    }
    if kept:
        summary |= {
            "kept_median": statistics.median(kept),
            "kept_p10": _quantile(kept, 0.10),
            "kept_p25": _quantile(kept, 0.25),
            "kept_p75": _quantile(kept, 0.75),
            "kept_min": kept[0],
            "kept_max": kept[-1],
        }
    for column in COLUMNS:
        values = [r[column] for r in rows if r[column] is not None]
        summary[f"{column}_median"] = statistics.median(values) if values else None
    return summary


def _quantile(values: list[float], q: float) -> float:
    position = q * (len(values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def _latest_emulator_loss(run: RunFolder) -> dict[str, float]:
    losses = {}
    for row in run.read_jsonl(run.metrics):
        if row["status"] == "trained":
            losses[row["user"]] = row["eval-loss-after"]  # later rounds overwrite
    return losses


def write(root: Path, result: dict[str, Any]) -> None:
    atomic.write_json(root / "evaluation.json", result)
    atomic.write_text(root / "evaluation.md", markdown(result))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ["user", "tokens", *COLUMNS, "kept"])
    writer.writeheader()
    writer.writerows(result["users"])
    atomic.write_text(root / "evaluation.csv", buffer.getvalue())


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| user | tokens | base | global | personal (emulator) | personal | compressed | kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["users"]:
        cells = [_f(r[c]) for c in COLUMNS]
        lines.append(
            f"| {r['user']} | {r['tokens']} | " + " | ".join(cells) + f" | {_pct(r['kept'])} |"
        )
    s = result["summary"]
    lines += [
        "",
        f"{s['improved']}/{s['users']} users improved on the full model. Share of the gain the "
        f"compressed adapter keeps: median {_pct(s.get('kept_median'))}, p10 "
        f"{_pct(s.get('kept_p10'))}, p25 {_pct(s.get('kept_p25'))}, p75 "
        f"{_pct(s.get('kept_p75'))}, min {_pct(s.get('kept_min'))} "
        f"({s['kept_users']} users with a gain).",
    ]
    return "\n".join(lines) + "\n"


def _f(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"
