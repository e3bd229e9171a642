"""The rounds as people watch them: TensorBoard event files and a plot, made from the run's
own records (`rounds.jsonl`, `metrics.jsonl`) after every committed round.

    RUN/tensorboard/   `tensorboard --logdir RUN/tensorboard`: per round the emulator's
                       held-out loss before and after, users trained and failed, seconds; per
                       user their held-out loss before and after and their training loss
    RUN/rounds.png     the same losses per round, one line per user

Both are rebuilt whole from the records each time (each atomically), so a resumed run, whose
last round may have been run twice, shows every round once.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from soppu import atomic
from soppu.server.store import RunFolder

ROUND_SCALARS = {
    "eval_loss_before": "emulator held-out loss/before",
    "eval_loss_after": "emulator held-out loss/after",
    "federated_eval_loss": "emulator held-out loss/global (federated evaluation)",
    "trained": "users/trained",
    "failed": "users/failed",
    "seconds": "seconds/round",
    "correction_seconds": "seconds/gradient correction",
}
USER_SCALARS = {
    "eval-loss-before": "before",
    "eval-loss-after": "after",
    "train-loss": "training",
}


def track(run: RunFolder) -> None:
    """Rebuild RUN/tensorboard and RUN/rounds.png from what the run has committed."""
    rounds = run.read_jsonl(run.rounds)
    rows = [r for r in run.read_jsonl(run.metrics) if r.get("status") == "trained"]
    if not rounds:
        return
    _tensorboard(run.root / "tensorboard", rounds, rows)
    _plot(run.root / "rounds.png", rows)


def _tensorboard(target: Path, rounds: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with atomic.building_dir(target, cache=True) as building:
        writer = SummaryWriter(log_dir=str(building))
        for summary in rounds:
            for key, tag in ROUND_SCALARS.items():
                if isinstance(summary.get(key), int | float):
                    writer.add_scalar(tag, summary[key], summary["round"])
        for row in rows:
            for key, kind in USER_SCALARS.items():
                if isinstance(row.get(key), int | float):
                    writer.add_scalar(f"user {kind}/{row['user']}", row[key], row["round"])
        writer.close()


def _plot(target: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    users = sorted({r["user"] for r in rows})
    for user in users:
        mine = sorted((r for r in rows if r["user"] == user), key=lambda r: r["round"])
        xs = [r["round"] for r in mine]
        line = axes.plot(xs, [r["eval-loss-after"] for r in mine], marker="o", label=user)[0]
        axes.plot(xs, [r["eval-loss-before"] for r in mine], ls=":", color=line.get_color())
    axes.set_xlabel("round")
    axes.set_ylabel("held-out loss on the client's model (dotted: before the round)")
    axes.set_title("Each user's held-out loss per round")
    axes.xaxis.get_major_locator().set_params(integer=True)
    if len(users) <= 12:
        axes.legend(fontsize="small", loc="best")
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=110)
    plt.close(figure)
    atomic.write_bytes(target, image.getvalue())
