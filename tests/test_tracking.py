"""The run in TensorBoard, MLflow and a plot, rebuilt from its records after every round,
compression round and the final evaluation."""

from __future__ import annotations

import json
import os
import re

import pytest
from helpers import tiny_population, write_users
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_store import commit_round

from soppu.compression.compress import CompressionConfig
from soppu.server.compress_store import compress_adapters
from soppu.server.config import FederationConfig
from soppu.server.store import RunFolder
from soppu.server.tracking import TrackingError, track
from soppu.server.tracking_mlflow import metric_name


def committed(tmp_path) -> RunFolder:
    """A run after two rounds, with the records run_round commits: each user's losses and
    each round's summary."""
    run = RunFolder(tmp_path / "run")
    rows, summaries = [], []
    for round_, (before, after) in ((1, (5.0, 4.5)), (2, (4.5, 4.25))):
        commit_round(run, round_, {"alice": 1.0, "bob": 2.0})
        for i, user in enumerate(("alice", "bob")):
            rows.append(
                {
                    "round": round_,
                    "user": user,
                    "status": "trained",
                    "train-loss": 3.0,
                    "eval-loss-before": before,
                    "eval-loss-after": after - 0.1 * i,
                }
            )
        summaries.append(
            {
                "round": round_,
                "eval_loss_before": before,
                "eval_loss_after": after,
                "trained": 2,
                "failed": 0,
                "seconds": 10.0,
                "federated_eval_loss": None,
            }
        )
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run.rounds.write_text("".join(json.dumps(r) + "\n" for r in summaries))
    return run


def scalars(run: RunFolder, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run.root / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_every_round_shows_once_in_tensorboard_and_the_plot(tmp_path):
    run = committed(tmp_path)
    track(run)
    track(run)  # a resumed run tracks again: still every round once
    assert scalars(run, "emulator held-out loss/after") == [(1, 4.5), (2, 4.25)]
    assert scalars(run, "users/trained") == [(1, 2.0), (2, 2.0)]
    bob = scalars(run, "user after/bob")
    assert [step for step, _ in bob] == [1, 2] and abs(bob[1][1] - 4.15) < 1e-6
    events = EventAccumulator(str(run.root / "tensorboard"))
    events.Reload()
    assert "emulator held-out loss/federated evaluation" not in events.Tags()["scalars"]
    png = (run.root / "rounds.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert len(list((run.root / "tensorboard").iterdir())) == 2  # one event file, the stamp


def compressed_and_evaluated(run: RunFolder) -> dict:
    """What a compression round after round 2 and the final evaluation leave in the run (a
    real store of two users' adapters); returns the store's totals."""
    paths = write_users(run.root / "adapters", tiny_population(2), rank=4, alpha=8.0)
    config = CompressionConfig(rank=4, bits=32)
    manifest = compress_adapters(paths, run.compressed / "v0001", config, source={"round": 2})
    users = [
        {"user": "alice", "base": 40.0, "global": 36.0, "personal": 34.0, "compressed": 34.5},
        {"user": "bob", "base": 50.0, "global": 45.0, "personal": None, "compressed": 50.0},
    ]
    summary = {"compressed_gain_median": 0.12, "gain_median": 0.15, "helped": 1, "harmed": 0}
    run.evaluation.write_text(json.dumps({"users": users, "summary": summary}))
    return manifest["totals"]


def test_mlflow_holds_every_round_the_compression_and_the_evaluation_once(tmp_path):
    """--log-to mlflow: one MLflow run in RUN/mlflow/mlflow.db, the run's settings as its
    params, the same scalars as TensorBoard by round; tracked again, it holds each point
    once."""
    from mlflow.tracking import MlflowClient

    run = committed(tmp_path)
    run.run_json.write_text(json.dumps({"config": {"rounds": 2, "scheme": "fedavg-ft"}}))
    track(run, ("mlflow",))  # mid-run: RUNNING
    client = MlflowClient(f"sqlite:///{run.root / 'mlflow' / 'mlflow.db'}")
    [running] = client.search_runs(client.get_experiment_by_name("soppu").experiment_id)
    assert running.info.status == "RUNNING" and running.info.run_name == "run"
    totals = compressed_and_evaluated(run)
    # resumed for one more round: MLflow's params cannot change, so the new value is a tag
    run.run_json.write_text(json.dumps({"config": {"rounds": 3, "scheme": "fedavg-ft"}}))
    track(run, ("mlflow",))
    track(run, ("mlflow",))
    assert not (run.root / "tensorboard").exists()  # only the sinks asked for
    client = MlflowClient(f"sqlite:///{run.root / 'mlflow' / 'mlflow.db'}")
    [mlrun] = client.search_runs(client.get_experiment_by_name("soppu").experiment_id)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params == {"rounds": "2", "scheme": "fedavg-ft"}
    assert mlrun.data.tags["resumed rounds"] == "3"

    def history(key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, key)]

    assert history("emulator held-out loss/after") == [(1, 4.5), (2, 4.25)]
    assert history("user after/bob") == [(1, 4.4), (2, pytest.approx(4.15))]
    assert history("compression/ratio in bytes") == [(2, pytest.approx(totals["ratio"]))]
    assert history("compression/ratio in parameters") == [(2, totals["params_ratio"])]
    assert history("evaluation/median gain over base: served") == [(2, 0.12)]
    assert history("user perplexity served/alice") == [(2, 34.5)]
    assert history("user perplexity personal/bob") == []  # not measured: not logged
    assert "evaluation/median gain over base: global" not in mlrun.data.metrics


def test_tensorboard_shows_the_compression_and_the_evaluation_beside_the_rounds(tmp_path):
    run = committed(tmp_path)
    totals = compressed_and_evaluated(run)
    track(run)
    [(step, worst)] = scalars(run, "compression/error worst")
    assert step == 2 and worst == pytest.approx(totals["max"], rel=1e-6)
    assert scalars(run, "evaluation/users helped") == [(2, 1.0)]
    assert scalars(run, "user perplexity global/bob") == [(2, 45.0)]


def test_a_user_id_mlflow_cannot_name_gets_a_name_of_its_own():
    """MLflow takes letters, digits, `_-.: /` and no `.` or `..` part; ids with anything
    else are changed and keep a hash, so two ids never share a metric."""
    assert metric_name("user after/ROMEO") == "user after/ROMEO"
    odd = [metric_name(f"user after/{u}") for u in ("a(b)", "a[b]", "..", "a/b", "ü@x")]
    assert len(set(odd)) == len(odd)
    for name in odd:
        assert re.fullmatch(r"[/\w.\- :]*", name) and os.path.normpath(name) == name, name


def test_a_sink_that_cannot_be_written_is_one_line_and_keeps_the_last_one(tmp_path, monkeypatch):
    """MLflow failing in its child process (here a stand-in `mlflow` that cannot be imported,
    first on the path) is one line naming RUN/mlflow; the store written before stays whole."""
    run = committed(tmp_path)
    track(run, ("mlflow",))
    database = run.root / "mlflow" / "mlflow.db"
    before = database.read_bytes()
    stand_in = tmp_path / "stand-in" / "mlflow"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text("raise ImportError('MLflow is broken here')\n")
    monkeypatch.setenv(
        "PYTHONPATH", f"{stand_in.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    )
    with pytest.raises(TrackingError, match=r"mlflow: MLflow could not be written \(.*broken here"):
        track(run, ("mlflow",))
    assert database.read_bytes() == before
    assert sorted(p.name for p in run.root.iterdir() if "mlflow" in p.name) == ["mlflow"]


def test_log_to_names_its_sinks_and_older_runs_keep_theirs():
    assert FederationConfig(log_to="mlflow, tensorboard").sinks() == ("mlflow", "tensorboard")
    assert FederationConfig(log_to="none").sinks() == ()
    for wrong in ("wandb", "", "none,mlflow"):
        with pytest.raises(ValueError, match="log-to must be none or one or more of"):
            FederationConfig(log_to=wrong)
    # a run folder from before log-to: `tracking = false` meant nothing, true TensorBoard
    assert FederationConfig.from_run_config({"tracking": False}).log_to == "none"
    assert FederationConfig.from_run_config({"tracking": "true"}).log_to == "tensorboard"
