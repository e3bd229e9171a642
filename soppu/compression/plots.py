"""Report figures: per-layer error bars with every user as a dot, and parameters before/after."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

from soppu.compression.slots import module_kind

_MAX_DOTS_PER_MODULE = 400  # keep figures readable (and small) for thousands of users


def plot_errors(report: dict[str, Any], path: Path) -> None:
    """Bars: mean relative error per (layer, module kind); dots: each user's error."""
    kinds = sorted({r["kind"] for r in report["modules"]})
    layers = sorted({r["layer"] for r in report["modules"] if r["layer"] is not None})
    positions = {layer: i for i, layer in enumerate(layers)} or {None: 0}
    width = 0.8 / max(len(kinds), 1)
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(max(8.0, 0.35 * len(positions) * max(len(kinds), 1)), 4.5))
    by_module: dict[str, list[float]] = {}
    for item in report["items"]:
        by_module.setdefault(item["module"], []).append(item["error"])
    for ki, kind in enumerate(kinds):
        rows = [r for r in report["modules"] if r["kind"] == kind]
        xs = [positions.get(r["layer"], 0) + (ki - (len(kinds) - 1) / 2) * width for r in rows]
        ax.bar(
            xs,
            [r["mean"] for r in rows],
            width=width * 0.9,
            color=colors(ki),
            alpha=0.55,
            label=f"{kind} (mean)",
        )
        for x, r in zip(xs, rows, strict=True):
            dots = by_module[r["module"]][:_MAX_DOTS_PER_MODULE]
            jitter = [(j / max(len(dots) - 1, 1) - 0.5) * width * 0.6 for j in range(len(dots))]
            ax.scatter([x + d for d in jitter], dots, s=6, color=colors(ki), edgecolors="none")
    ax.set_xticks(range(len(positions)))
    ax.set_xticklabels([str(layer) for layer in positions])
    ax.set_xlabel("layer")
    ax.set_ylabel("relative error ‖D − D̂‖ / ‖D‖")
    t = report["totals"]
    ax.set_title(
        f"Per-layer reconstruction error: {t['users']} users, mean {t['mean']:.3f}, "
        f"{t['ratio']:.1f}× fewer bytes"
    )
    ax.legend(loc="upper right", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    _margins(fig, left=0.9, bottom=0.55, top=0.4)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_params(report: dict[str, Any], path: Path) -> None:
    """Parameters before and after, per module kind and in total."""
    before: dict[str, int] = {}
    after: dict[str, int] = {}
    for slot in report["slots"]:
        kinds = {module_kind(m) for m in slot["modules"]}
        key = kinds.pop() if len(kinds) == 1 else "mixed"
        before[key] = before.get(key, 0) + slot["params_before"]
        after[key] = after.get(key, 0) + slot["params_after"]
    labels = [*sorted(before), "total"]
    b = [before.get(k, 0) for k in labels[:-1]] + [sum(before.values())]
    a = [after.get(k, 0) for k in labels[:-1]] + [sum(after.values())]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], b, width=0.4, label="per-user LoRAs", color="#999999")
    ax.bar([x + 0.2 for x in xs], a, width=0.4, label="shared bases + cores", color="#1f77b4")
    for x, before_n, after_n in zip(xs, b, a, strict=True):
        ax.annotate(
            f"{before_n / max(after_n, 1):.1f}×",
            (x + 0.2, after_n),
            ha="center",
            va="bottom",
            fontsize="small",
        )
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels)
    ax.set_yscale("log")
    # Plain labels: log-axis defaults are TeX-like (10^8), and matplotlib's math parser costs a
    # `soppu add` more than the projection does.
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: _count(value)))
    ax.yaxis.set_minor_formatter(  # 2 and 5 between the decades, or the labels crowd
        FuncFormatter(lambda value, _: _count(value) if f"{value:.0e}"[0] in "25" else "")
    )
    ax.set_ylabel("parameters stored")
    t = report["totals"]  # the headline counts bytes; this plot counts numbers: say both
    ax.set_title(
        f"Parameters before and after joint compression: {sum(b) / max(sum(a), 1):.1f}× "
        f"fewer\n(in bytes, at {t.get('bits', 32)} bits: {t['ratio']:.1f}× fewer)",
        fontsize="medium",
    )
    ax.legend(fontsize="small")
    _margins(fig, left=0.85, bottom=0.4, top=0.4)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _margins(fig, *, left: float, bottom: float, top: float, right: float = 0.2) -> None:
    """Fixed margins in inches: `tight_layout` measured every label and took half of a
    `soppu add`'s time."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(
        left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height
    )


def _count(value: float) -> str:
    """A parameter count as people read it: 20M, 1.5G, 300k."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"
