"""After the run: each user's held-out perplexity, and how much of their gains compression keeps.

For every user in the store (simulation: the server can read the users' held-out text):
base model alone; the global adapter (fedavg); the personal adapter on the emulator (the
client's own measurement, from metrics.jsonl); the personal adapter on the full model; and the
published compressed adapter (`serving/current/users/<user>`) on the full model. Two gains,
both on the full model, and the share of each the compressed adapter keeps:

    gain over the base      1 − personal/base     kept = (base − compressed)/(base − personal)
    gain over the global    1 − personal/global   kept_over_global =
                                                      (global − compressed)/(global − personal)

The second is what a personal adapter is for: most of a population's gain is often shared, and
one global adapter gets it; `kept` then mostly measures the shared part.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from typing import Any

from torch import nn

from server.store import RunFolder
from server.versions import CURRENT
from soppu import atomic, lm
from soppu.adapters import LoraState, read_lora
from soppu.data import UserText
from soppu.personalize import TrainConfig, attached

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
        row["kept_over_global"] = gain_kept(row["global"], row["personal"], row["compressed"])
        rows.append(row)
    result = {"users": rows, "summary": summarise(rows)}
    write(run, result)
    return result


def gain_kept(
    reference: float | None, personal: float | None, compressed: float | None
) -> float | None:
    """Share of the personal adapter's perplexity gain over `reference` the compressed one
    keeps; None where there is no gain to keep."""
    if reference is None or personal is None or compressed is None or reference <= personal:
        return None
    return (reference - compressed) / (reference - personal)


def relative_gain(reference: float | None, tuned: float | None) -> float | None:
    """1 − tuned/reference: the share of the perplexity removed."""
    if reference is None or tuned is None:
        return None
    return 1.0 - tuned / reference


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    improved = [r for r in rows if r["personal"] is not None and r["personal"] < r["base"]]
    with_global = [r for r in rows if r["personal"] is not None and r["global"] is not None]
    summary: dict[str, Any] = {
        "users": len(rows),
        "improved": len(improved),
        "with_global": len(with_global),
        "beats_global": sum(r["personal"] < r["global"] for r in with_global),
    }
    for key in ("kept", "kept_over_global"):
        summary |= _distribution(key, [r[key] for r in rows])
    gains = {
        "gain": [relative_gain(r["base"], r["personal"]) for r in rows],
        "global_gain": [relative_gain(r["base"], r["global"]) for r in rows],
        "emulator_gain": [relative_gain(r["base"], r["emulator"]) for r in rows],
        "compressed_gain": [relative_gain(r["base"], r["compressed"]) for r in rows],
        "personal_over_global": [relative_gain(r["global"], r["personal"]) for r in rows],
    }
    for key, values in gains.items():
        present = [v for v in values if v is not None]
        summary[f"{key}_median"] = statistics.median(present) if present else None
    for column in COLUMNS:
        values = [r[column] for r in rows if r[column] is not None]
        summary[f"{column}_median"] = statistics.median(values) if values else None
    return summary


def _distribution(key: str, values: list[float | None]) -> dict[str, Any]:
    present = sorted(v for v in values if v is not None)
    out: dict[str, Any] = {f"{key}_users": len(present)}
    if present:
        out |= {
            f"{key}_median": statistics.median(present),
            f"{key}_p10": _quantile(present, 0.10),
            f"{key}_p25": _quantile(present, 0.25),
            f"{key}_p75": _quantile(present, 0.75),
            f"{key}_min": present[0],
            f"{key}_max": present[-1],
        }
    return out


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


def write(run: RunFolder, result: dict[str, Any]) -> None:
    atomic.write_json(run.evaluation, result)
    atomic.write_text(run.evaluation.with_suffix(".md"), markdown(result))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ["user", "tokens", *COLUMNS, "kept", "kept_over_global"])
    writer.writeheader()
    writer.writerows(result["users"])
    atomic.write_text(run.evaluation.with_suffix(".csv"), buffer.getvalue())


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| user | tokens | base | global | personal (emulator) | personal | compressed "
        "| kept | kept over global |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["users"]:
        cells = [_f(r[c]) for c in COLUMNS]
        lines.append(
            f"| {r['user']} | {r['tokens']} | "
            + " | ".join(cells)
            + f" | {_pct(r['kept'])} | {_pct(r['kept_over_global'])} |"
        )
    return "\n".join([*lines, "", *summary_lines(result["summary"])]) + "\n"


def summary_lines(s: dict[str, Any]) -> list[str]:
    """The run's verdict in sentences (Markdown), for evaluation.md and the console."""
    lines = [
        f"{s['improved']}/{s['users']} users improved on the full model; median gain over the "
        f"base model {_pct(s.get('gain_median'))} (global adapter "
        f"{_pct(s.get('global_gain_median'))}, compressed {_pct(s.get('compressed_gain_median'))})."
    ]
    if s.get("with_global"):
        lines.append(
            f"The personal adapter beats the global one for {s['beats_global']}/"
            f"{s['with_global']} users (median personal gain over global "
            f"{_pct(s.get('personal_over_global_median'))})."
        )
    for key, what in (("kept", "gain over the base"), ("kept_over_global", "gain over global")):
        if s.get(f"{key}_median") is not None:
            lines.append(
                f"Compression keeps of the {what}: median {_pct(s[f'{key}_median'])}, p25 "
                f"{_pct(s[f'{key}_p25'])}, min {_pct(s[f'{key}_min'])} "
                f"({s[f'{key}_users']} users with such a gain)."
            )
    return lines


def _f(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"
