"""The run as people watch it: TensorBoard, MLflow and a plot, made from the run's own
records after every committed round, every compression round and the final evaluation.

    RUN/tensorboard/   `tensorboard --logdir RUN/tensorboard`
    RUN/mlflow/        `mlflow ui --backend-store-uri sqlite:///RUN/mlflow/mlflow.db`: one
                       MLflow run named after the run folder, its settings as params
                       (soppu/server/tracking_mlflow.py)
    RUN/rounds.png     each user's held-out loss per round, one line per user

The same scalars go to each sink, by step (the round):

    per round           the emulator's held-out loss before, after and federated; users
                        trained and failed; seconds of the round and of its correction
    per user and round  held-out loss on the client's model before and after, training loss
    per compression     ratio in bytes and in parameters, error mean and worst, users
    final evaluation    median gains over the base model (served, personal, global), users
                        helped and harmed; per user the perplexity of base, global, personal
                        and served

Each is made from the records each time, so every round shows once: TensorBoard's folder
and the plot rebuilt whole and replaced atomically, MLflow's store brought up to date in place
(a reader keeps it open).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soppu import atomic
from soppu.errors import SoppuError
from soppu.server.compressed_store import CompressedStore
from soppu.server.store import RunFolder
from soppu.server.versions import Versions

ROUND_SCALARS = {
    "eval_loss_before": "emulator held-out loss/before",
    "eval_loss_after": "emulator held-out loss/after",
    "federated_eval_loss": "emulator held-out loss/federated evaluation",
    "trained": "users/trained",
    "failed": "users/failed",
    "seconds": "seconds/round",
    "correction_seconds": "seconds/gradient correction",
}
USER_SCALARS = {"eval-loss-before": "before", "eval-loss-after": "after", "train-loss": "training"}
COMPRESSION_SCALARS = {
    "ratio": "compression/ratio in bytes",
    "params_ratio": "compression/ratio in parameters",
    "mean": "compression/error mean",
    "max": "compression/error worst",
    "users": "compression/users",
}
EVALUATION_SCALARS = {
    "compressed_gain_median": "evaluation/median gain over base: served",
    "gain_median": "evaluation/median gain over base: personal",
    "global_gain_median": "evaluation/median gain over base: global",
    "helped": "evaluation/users helped",
    "harmed": "evaluation/users harmed",
}
PERPLEXITIES = {"base": "base", "global": "global", "personal": "personal", "compressed": "served"}


class TrackingError(SoppuError, OSError):
    """A sink could not be written (a full disk, MLflow missing or failing)."""


@dataclass(frozen=True)
class Scalar:
    tag: str
    value: float
    step: int


def track(run: RunFolder, sinks: Sequence[str] = ("tensorboard",)) -> None:
    """Bring each sink and RUN/rounds.png up to date with what the run has committed (the
    TensorBoard folder and the plot rebuilt, MLflow's store added to); no sinks: nothing."""
    if not sinks or not run.read_jsonl(run.rounds):
        return
    found = scalars(run)
    if "tensorboard" in sinks:
        _tensorboard(run.root / "tensorboard", found)
    if "mlflow" in sinks:
        _mlflow(run, found)
    _plot(run.root / "rounds.png", run.read_jsonl(run.metrics))


def scalars(run: RunFolder) -> list[Scalar]:
    """Everything the run has recorded that a sink shows, in the order it happened."""
    return [*_rounds(run), *_compressions(run), *_evaluation(run)]


def _rounds(run: RunFolder) -> Iterator[Scalar]:
    for summary in run.read_jsonl(run.rounds):
        yield from _pick(summary, ROUND_SCALARS, summary["round"])
    for row in run.read_jsonl(run.metrics):
        if row.get("status") == "trained":
            tags = {key: f"user {kind}/{row['user']}" for key, kind in USER_SCALARS.items()}
            yield from _pick(row, tags, row["round"])


def _compressions(run: RunFolder) -> Iterator[Scalar]:
    for name in Versions(run.compressed).names():
        manifest = CompressedStore(run.compressed / name).manifest()
        round_ = manifest.get("source", {}).get("round")
        if isinstance(round_, int):  # a store made by `soppu compress` outside the run: no round
            yield from _pick(manifest["totals"], COMPRESSION_SCALARS, round_)


def _evaluation(run: RunFolder) -> Iterator[Scalar]:
    result = _read_json(run.evaluation)
    if not result:
        return
    step = run.state().get("round", 0)
    summary = result.get("summary", {})
    yield from _pick(summary, EVALUATION_SCALARS, step)
    for row in result.get("users", []):
        tags = {key: f"user perplexity {kind}/{row['user']}" for key, kind in PERPLEXITIES.items()}
        yield from _pick(row, tags, step)


def _pick(record: dict[str, Any], tags: dict[str, str], step: int) -> Iterator[Scalar]:
    for key, tag in tags.items():
        value = record.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            yield Scalar(tag, float(value), step)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # not written yet, or being replaced: the next track() shows it


def _tensorboard(target: Path, found: list[Scalar]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with atomic.building_dir(target, cache=True) as building:
        writer = SummaryWriter(log_dir=str(building))
        for scalar in found:
            writer.add_scalar(scalar.tag, scalar.value, scalar.step)
        writer.close()


def _mlflow(run: RunFolder, found: list[Scalar]) -> None:
    """RUN/mlflow, brought up to date by a child process (`soppu.server.tracking_mlflow`
    says why)."""
    target = run.root / "mlflow"
    payload = {
        "name": run.root.resolve().name,
        "params": (_read_json(run.run_json) or {}).get("config", {}),
        "scalars": [[s.tag, s.value, s.step] for s in found],
        "finished": run.evaluation.is_file(),
    }
    done = subprocess.run(
        [sys.executable, "-m", "soppu.server.tracking_mlflow", str(target)],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
    )
    if done.returncode:
        why = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise TrackingError(f"{target}: MLflow could not be written ({why})")


def _plot(target: Path, metrics: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in metrics if r.get("status") == "trained"]
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
