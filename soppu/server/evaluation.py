"""After the run: each user's held-out perplexity, what they are served, and how sure we are.

For every user in the store (simulation: the server can read the users' held-out text):
base model alone; the global adapter (schemes that have one); the personal adapter on the
emulator (the client's own measurement, from metrics.jsonl); the personal adapter on the full
model; and the published adapter (`serving/current/users/<user>`, the compressed form of what
the user is served: personal, global or none, chosen on their validation text) on the full
model.

Every comparison is paired on the same held-out blocks, with a 95% bootstrap interval
(`soppu/intervals.py`): served over base (helped, harmed or unchanged only where the
interval excludes 0), personal over global, and what compression costs the served choice.
What compression keeps of a gain is reported only where that gain is significant:

    kept              (base − published) / (base − chosen)       chosen significantly > base
    kept_over_global  (global − published) / (global − personal)  personal significantly >
                                                                  global, and served
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from typing import Any

from torch import Tensor, nn

from soppu import atomic, lm
from soppu.adapters import LoraState, read_lora
from soppu.data import UserText
from soppu.intervals import paired_gain
from soppu.personalize import TrainConfig, scored
from soppu.server.store import RunFolder
from soppu.server.versions import CURRENT, ServingVersion

COLUMNS = ("base", "global", "emulator", "personal", "compressed")
# paired comparisons, each (reference, new): the gain of new over reference with its interval
COMPARISONS = {
    "served_over_base": ("base", "compressed"),  # what the user gets, against no adapter
    "personal_over_global": ("global", "personal"),  # what a personal adapter is for
    "compression": ("chosen", "compressed"),  # what compression costs the served choice
    "chosen_over_base": ("base", "chosen"),  # the served choice before compression
}
VERDICTS = {"better": "helped", "worse": "harmed", "same": "unchanged"}


def evaluate_run(
    run: RunFolder,
    model: nn.Module,
    tokenizer,
    users: dict[str, UserText],
    config: TrainConfig,
    progress=lambda user, done, total: None,
) -> dict[str, Any]:
    """Evaluate every stored user; write RUN/evaluation.{json,md,csv}; return the result."""
    serving = ServingVersion(run.serving / CURRENT)
    global_lora = run.global_adapter()
    emulator_loss = _latest_emulator_loss(run)
    served, sources = run.selection_choices(), run.served_sources()
    stored = [u for u in run.users() if u in users]
    rows = []
    for done, user in enumerate(stored):
        progress(user, done, len(stored))
        blocks = lm.token_blocks(
            tokenizer, users[user].test, config.seq_len, config.max_eval_tokens
        )
        published = serving.user_dir(user)

        def score(lora: LoraState | None, blocks=blocks) -> Scores:
            return scored(model, lora, blocks, tokenizer.pad_token_id, config.batch_size)

        personal = run.latest(user)
        scores = {
            "base": score(None),
            "global": score(global_lora) if global_lora is not None else None,
            "personal": score(personal),
            "compressed": score(read_lora(published)) if published.is_dir() else None,
        }
        label = served.get(user, "personal")
        if label not in scores:  # the choice before compression: at a strength, or a blend
            scores[label] = score(sources[user].lora())
        row = user_row(user, scores, label, seed=done)
        row["emulator"] = math.exp(emulator_loss[user]) if user in emulator_loss else None
        rows.append(row)
    result = {"users": rows, "summary": summarise(rows)}
    write(run, result)
    return result


Scores = tuple[Tensor, Tensor] | None  # per-block NLL sums and token counts; None: no such model


def user_row(user: str, scores: dict[str, Scores], served: str, seed: int = 0) -> dict[str, Any]:
    """A user's perplexities, what they are served, and every paired comparison's gain with
    its interval; the kept shares only where the gain they divide by is significant."""
    scores = {**scores, "chosen": scores.get(served)}
    counts = scores["base"][1]
    ppl = {name: _ppl(s) for name, s in scores.items()}
    row: dict[str, Any] = {
        "user": user,
        "tokens": int(counts.sum()),
        **{c: ppl.get(c) for c in COLUMNS if c != "emulator"},
        "served": served,
        "chosen": ppl.get("chosen"),  # what is served, before compression (at its strength)
    }
    gains = {}
    for key, (reference, new) in COMPARISONS.items():
        if scores.get(reference) is not None and scores.get(new) is not None:
            gain = paired_gain(scores[reference][0], scores[new][0], counts, seed=seed)
            gains[key] = gain.as_dict()
    row["gains"] = gains
    row["verdict"] = (
        VERDICTS[gains["served_over_base"]["verdict"]] if "served_over_base" in gains else None
    )
    significant = gains.get("chosen_over_base", {}).get("verdict") == "better"
    row["kept"] = gain_kept(row["base"], ppl["chosen"], row["compressed"]) if significant else None
    personal_wins = gains.get("personal_over_global", {}).get("verdict") == "better"
    row["kept_over_global"] = (
        gain_kept(row["global"], row["personal"], row["compressed"])
        if personal_wins and served == "personal"  # a scaled one is not the personal column
        else None
    )
    return row


def _ppl(scores: Scores) -> float | None:
    if scores is None:
        return None
    return math.exp(float(scores[0].sum()) / max(int(scores[1].sum()), 1))


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
    over_global = [r["gains"].get("personal_over_global", {}).get("verdict") for r in rows]
    summary: dict[str, Any] = {
        "users": len(rows),
        "improved": len(improved),
        "with_global": len(with_global),
        "beats_global": sum(r["personal"] < r["global"] for r in with_global),
        "beats_global_significantly": over_global.count("better"),
        "behind_global_significantly": over_global.count("worse"),
        **{verdict: sum(r["verdict"] == verdict for r in rows) for verdict in VERDICTS.values()},
        "served_counts": {
            choice: sum(r["served"] == choice for r in rows)
            for choice in sorted({r["served"] for r in rows})
        },
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
    intervals = [f"{key}_{part}" for key in COMPARISONS for part in ("point", "low", "high")]
    columns = ["user", "tokens", *COLUMNS, "served", "chosen", "verdict", *intervals]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, [*columns, "kept", "kept_over_global"])
    writer.writeheader()
    for row in result["users"]:
        flat = {k: v for k, v in row.items() if k != "gains"}
        for key, gain in row["gains"].items():
            flat |= {f"{key}_{part}": gain[part] for part in ("point", "low", "high")}
        writer.writerow(flat)
    atomic.write_text(run.evaluation.with_suffix(".csv"), buffer.getvalue())


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| user | tokens | base | global | personal (emulator) | personal | served "
        "| published | served over base (95% interval) | personal over global "
        "| kept | kept over global |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["users"]:
        cells = [_f(r[c]) for c in COLUMNS]
        lines.append(
            f"| {r['user']} | {r['tokens']} | "
            + " | ".join(cells[:-1])
            + f" | {r['served']} | {cells[-1]} | {gain_text(r['gains'].get('served_over_base'))} "
            f"| {gain_text(r['gains'].get('personal_over_global'))} "
            f"| {_pct(r['kept'])} | {_pct(r['kept_over_global'])} |"
        )
    return "\n".join([*lines, "", *summary_lines(result["summary"])]) + "\n"


def gain_text(gain: dict[str, Any] | None) -> str:
    """The gain and its interval in percent, as `+12.3% [+10.1, +14.2]`."""
    if gain is None:
        return "–"
    return f"{gain['point']:+.1%} [{gain['low'] * 100:+.1f}, {gain['high'] * 100:+.1f}]"


def summary_lines(s: dict[str, Any]) -> list[str]:
    """The run's verdict in sentences (Markdown), for evaluation.md and the console."""
    served = ", ".join(f"{choice} {n}" for choice, n in s.get("served_counts", {}).items())
    lines = [
        f"Served (chosen on each user's validation text: {served}), on the full model: "
        f"{s['helped']} helped, {s['harmed']} harmed, {s['unchanged']} unchanged of "
        f"{s['users']} users (a user counts only where the paired 95% interval over their "
        "held-out blocks excludes 0).",
        f"Median gain over the base model: served {_pct(s.get('compressed_gain_median'))}, "
        f"personal {_pct(s.get('gain_median'))} ({s['improved']}/{s['users']} lower than the "
        f"base), global adapter {_pct(s.get('global_gain_median'))}.",
    ]
    if s.get("with_global"):
        lines.append(
            f"The personal adapter beats the global one significantly for "
            f"{s['beats_global_significantly']}/{s['with_global']} users and falls behind it "
            f"for {s['behind_global_significantly']} (median personal gain over global "
            f"{_pct(s.get('personal_over_global_median'))}; {s['beats_global']} ahead at all)."
        )
    for key, what in (("kept", "gain over the base"), ("kept_over_global", "gain over global")):
        if s.get(f"{key}_median") is not None:
            lines.append(
                f"Compression keeps of the {what}: median {_pct(s[f'{key}_median'])}, p25 "
                f"{_pct(s[f'{key}_p25'])}, min {_pct(s[f'{key}_min'])} "
                f"({s[f'{key}_users']} users with a significant such gain)."
            )
    return lines


def _f(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"
