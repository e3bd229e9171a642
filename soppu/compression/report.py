"""The reconstruction-error report: per module, per slot, per user, and totals.

Every error compares a user's delta with that same user's reconstruction; nothing here ever
compares one user's delta with another user's reconstruction. Relative error is
‖D_i − D̂_i‖/‖D_i‖; its square is what Compress-then-Serve's "≈0.6 squared keeps ≈99% of task
quality" refers to. The personal-part error measures what a shared basis may silently lose:
‖(D_i − D̄) − (D̂_i − D̄̂)‖/‖D_i − D̄‖ with the mean taken over the module's users.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from soppu.compression.compress import SlotResult
from soppu.compression.residuals import relative
from soppu.compression.slots import Slot, layer_index, module_kind, module_sort_key

REPORT_FILES = ("report.json", "report.csv", "report.md", "errors.png", "params.png")


def slot_entry(slot: Slot, result: SlotResult, seconds: float) -> dict[str, Any]:
    """A fitted slot's report entry (see `slot_record`)."""
    fit = result.fit
    errors, personal = result.errors.tolist(), result.personal_errors.tolist()
    float_errors = relative(result.sq_errors_float, result.sq_norms).tolist()
    return slot_record(
        slot,
        ranks=fit.ranks,
        sigma=fit.sigma,
        params=(result.params_before(), result.params_after()),
        bits=result.stored.bits,
        bytes_after=result.bytes_after(),
        max_core_rank=result.max_core_rank(),
        per_item=[
            item_record(user, module, errors[i], float_errors[i], personal[i])
            for i, (user, module) in enumerate(slot.items)
        ],
        fit={
            "bracket": fit.bracket.as_dict(),
            "iterations": fit.iterations,
            "converged": fit.converged,
            "seconds": seconds,
        },
    )


def slot_record(
    slot: Slot,
    *,
    ranks: tuple[int, int],
    sigma: str,
    params: tuple[int, int],
    bits: int,
    bytes_after: int,
    max_core_rank: int,
    per_item: list[dict[str, Any]],
    fit: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One slot's numbers (JSON-able), the one shape every writer of a report uses; `params`:
    (the users' LoRA parameters, what the store holds); `fit`: the fit's bracket, iterations,
    convergence and seconds (None where no fit ran: users projected onto stored bases)."""
    before, after = params
    bytes_before = 4 * before  # the users' LoRA factors as float32, as a federation keeps them
    fit = fit or {"bracket": None, "iterations": 0, "converged": True}
    return {
        "slot": slot.name,
        "shape": list(slot.shape),
        "modules": slot.modules,
        "rank": rank_label(ranks),
        "ranks": list(ranks),
        "sigma": sigma,
        "items": len(slot.items),
        "params_before": before,
        "params_after": after,
        "bits": bits,
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "ratio": bytes_before / bytes_after if bytes_after else math.inf,  # counted in bytes
        **fit,
        "max_core_rank": max_core_rank,
        "per_item": per_item,
    }


def item_record(
    user: str, module: str, error: float, error_float: float, personal: float | None
) -> dict[str, Any]:
    """One (user, module)'s errors: of what is stored (after quantisation, if any), of the
    fit's own before it, and of the personal part (None where not measured)."""
    return {
        "user": user,
        "module": module,
        "error": error,
        "error_float": error_float,
        "personal_error": _clean(personal),
    }


def rank_label(ranks: tuple[int, int]) -> int | str:
    """A slot's rank as people read it: 16, or 16×24 for a rectangular core."""
    r_u, r_v = ranks
    return r_u if r_u == r_v else f"{r_u}×{r_v}"


def build_report(entries: Sequence[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """Aggregate slot entries into modules, users and totals."""
    items = [dict(item, slot=e["slot"], rank=e["rank"]) for e in entries for item in e["per_item"]]
    by_module: dict[str, list[dict]] = {}
    for item in items:
        by_module.setdefault(item["module"], []).append(item)
    modules = [
        _module_row(module, rows)
        for module, rows in sorted(by_module.items(), key=lambda kv: module_sort_key(kv[0]))
    ]
    before = sum(e["params_before"] for e in entries)
    after = sum(e["params_after"] for e in entries)
    bytes_before = sum(e["bytes_before"] for e in entries)
    bytes_after = sum(e["bytes_after"] for e in entries)
    errors = torch.tensor([it["error"] for it in items], dtype=torch.float64)
    float_errors = torch.tensor([it["error_float"] for it in items], dtype=torch.float64)
    personal = _finite([it["personal_error"] for it in items])
    totals = {
        "users": len({it["user"] for it in items}),
        "modules": len(modules),
        "slots": len(entries),
        "params_before": before,
        "params_after": after,
        "params_ratio": before / after if after else math.inf,
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "ratio": bytes_before / bytes_after if bytes_after else math.inf,  # counted in bytes
        "bits": entries[0]["bits"] if entries else 32,
        **_stats(errors),
        "float_mean": float(float_errors.mean()) if len(items) else 0.0,  # before quantising
        "personal_mean": _mean(personal),
        "personal_max": max(personal) if personal else None,
        "seconds": sum(e["seconds"] for e in entries),
        # A requested rank no slot side can use: that side keeps all it spans (exactly).
        "capped_slots": sum(
            1 for e in entries if config.get("rank") and min(e["ranks"]) < config["rank"]
        ),
    }
    slots = [{k: v for k, v in e.items() if k != "per_item"} for e in entries]
    return {"config": config, "totals": totals, "slots": slots, "modules": modules, "items": items}


def _module_row(module: str, rows: list[dict]) -> dict[str, Any]:
    errors = torch.tensor([r["error"] for r in rows], dtype=torch.float64)
    personal = _finite([r["personal_error"] for r in rows])
    return {
        "module": module,
        "layer": layer_index(module),
        "kind": module_kind(module),
        "slot": rows[0]["slot"],
        "rank": rows[0]["rank"],
        "users": len(rows),
        **_stats(errors),
        "personal_mean": _mean(personal),
        "personal_max": max(personal) if personal else None,
    }


def _stats(errors: torch.Tensor) -> dict[str, float]:
    if errors.numel() == 0:
        return {k: 0.0 for k in ("mean", "median", "p95", "max", "mean_sq")}
    return {
        "mean": float(errors.mean()),
        "median": float(errors.median()),
        "p95": float(torch.quantile(errors, 0.95)),
        "max": float(errors.max()),
        "mean_sq": float((errors**2).mean()),
    }


def _finite(values: list) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _clean(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    """Write report.json, report.csv, report.md, errors.png and params.png into `out`.

    Files are written in place; callers that need all-or-nothing build `out` atomically.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Compact: a whole model's report holds an item per (user, module), 60,000 for 1,000
    # users, and the indenting encoder is pure Python; report.md and .csv are the readable ones.
    (out / "report.json").write_text(json.dumps(report) + "\n")
    (out / "report.csv").write_text(report_csv(report))
    (out / "report.md").write_text(report_markdown(report))
    from soppu.compression.plots import plot_errors, plot_params  # matplotlib only when rendering

    plot_errors(report, out / "errors.png")
    plot_params(report, out / "params.png")
    return [out / name for name in REPORT_FILES]


def report_csv(report: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "user",
            "module",
            "layer",
            "kind",
            "slot",
            "rank",
            "rel_error",
            "rel_error_sq",
            "personal_error",
        ]
    )
    for it in report["items"]:
        writer.writerow(
            [
                it["user"],
                it["module"],
                layer_index(it["module"]),
                module_kind(it["module"]),
                it["slot"],
                it["rank"],
                f"{it['error']:.6g}",
                f"{it['error'] ** 2:.6g}",
                "" if it["personal_error"] is None else f"{it['personal_error']:.6g}",
            ]
        )
    return buffer.getvalue()


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def report_markdown(report: dict[str, Any]) -> str:
    # One page of Markdown written top to bottom: long, but read as the page it makes.
    t = report["totals"]
    lines = [
        "# Reconstruction-error report",
        "",
        f"{t['users']} users, {t['modules']} modules in {t['slots']} slots. "
        f"Parameters {t['params_before']:,} → {t['params_after']:,}; bytes "
        f"{t['bytes_before']:,} → {t['bytes_after']:,} at {t['bits']} bits "
        f"(**{t['ratio']:.1f}×** smaller). Relative product error ‖D−D̂‖/‖D‖: "
        f"mean {t['mean']:.4f}, median {t['median']:.4f}, p95 {t['p95']:.4f}, "
        f"max {t['max']:.4f} (mean squared {t['mean_sq']:.4f}"
        + (f"; {t['float_mean']:.4f} before quantising" if t["bits"] != 32 else "")
        + f"); personal-part error mean {_fmt(t['personal_mean'])}.",
        "",
        "## Per module",
        "",
        "| layer | module | rank | users | mean | median | p95 | max | mean² | personal mean |"
        " personal max |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["modules"]:
        lines.append(
            f"| {_fmt(r['layer'])} | {r['kind']} | {r['rank']} | {r['users']} | {_fmt(r['mean'])} "
            f"| {_fmt(r['median'])} | {_fmt(r['p95'])} | {_fmt(r['max'])} | {_fmt(r['mean_sq'])} "
            f"| {_fmt(r['personal_mean'])} | {_fmt(r['personal_max'])} |"
        )
    lines += [
        "",
        "## Per slot: storage and the certificate",
        "",
        "Bracket values are weighted relative errors √(Σ wᵢ‖Dᵢ−D̂ᵢ‖² / Σ wᵢ‖Dᵢ‖²): no shared "
        "basis of this rank can go below *lower*; the HOSVD start guarantees *upper*.",
        "",
        "| slot | shape | rank | σ | params before | after | bytes after | ratio | lower "
        "| achieved | hosvd | upper | iters |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report["slots"]:
        b = s["bracket"]  # None where users were added onto old bases without a fit
        bounds = (
            " | ".join(f"{b[key]:.4f}" for key in ("lower", "achieved", "hosvd", "upper"))
            if b
            else "– | – | – | –"
        )
        lines.append(
            f"| {s['slot']} | {s['shape'][0]}×{s['shape'][1]} | {s['rank']} | {s['sigma']} "
            f"| {s['params_before']:,} | {s['params_after']:,} | {s['bytes_after']:,} "
            f"| {s['ratio']:.1f}× | {bounds} | {s['iterations']} |"
        )
    drifts = [s for s in report["slots"] if "drift" in s]
    if drifts:
        lines += [
            "",
            "## Added users",
            "",
            "Drift: the share of the new users' energy outside a slot's bases.",
            "",
            "| slot | drift | refit |",
            "|---|---:|---|",
            *(
                f"| {s['slot']} | {s['drift']:.4f} | {'yes' if s['refit'] else 'no'} |"
                for s in drifts
            ),
        ]
    return "\n".join(lines) + "\n"
