"""MLflow for the run's tracking: one MLflow run in a SQLite store (MLflow's local default;
its file store refuses new runs since 3.x), RUN/mlflow/mlflow.db, brought up to date in place.

    python -m soppu.server.tracking_mlflow TARGET < {"name", "params", "scalars", "finished"}

In place, not rebuilt and swapped like TensorBoard's folder: a reader such as `mlflow ui`
keeps its SQLite connections open, and would go on reading a replaced file. Each call logs
only the points the store lacks, so tracking after every round shows each round once; a
point whose value changed (an evaluation run again) is added at its step, as MLflow keeps a
metric's history.

`soppu.server.tracking` runs this as a child process: MLflow's store keeps a database engine
for the life of the process, and logs and reports usage of its own (off unless
MLFLOW_DISABLE_TELEMETRY says otherwise: a federation's runs are private), none of which
belongs in the server.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from soppu import atomic

PARAMS_PER_BATCH, METRICS_PER_BATCH = 100, 1000  # MLflow's limits for one log_batch
EXPERIMENT = "soppu"


def write(target: Path, name: str, params: dict[str, Any], scalars: list, finished: bool) -> None:
    """Bring TARGET/mlflow.db up to date: experiment "soppu", one run `name` with `params`
    and every (tag, value, step) in `scalars`; FINISHED once `finished`."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    target.mkdir(parents=True, exist_ok=True)
    with atomic.lock(target, f"the MLflow store {target}"):
        client = MlflowClient(f"sqlite:///{target.resolve() / 'mlflow.db'}")
        run = _the_run(client, target, name)
        _log_params(client, run, params)
        _log_metrics(client, run, scalars)
        if finished and run.info.status != "FINISHED":
            client.set_terminated(run.info.run_id, "FINISHED")


def _the_run(client: Any, target: Path, name: str) -> Any:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        location = (target / "artifacts").resolve().as_uri()
        experiment_id = client.create_experiment(EXPERIMENT, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    found = client.search_runs([experiment_id], max_results=1)
    return found[0] if found else client.create_run(experiment_id, run_name=name)


def _log_params(client: Any, run: Any, params: dict[str, Any]) -> None:
    """MLflow's params cannot change: a setting a resumed run changed (its rounds, say)
    is a tag `resumed <key>` with the new value."""
    from mlflow.entities import Param, RunTag

    stated = run.data.params
    new = [Param(k, str(v)) for k, v in sorted(params.items()) if k not in stated]
    changed = [
        RunTag(f"resumed {k}", str(v))
        for k, v in sorted(params.items())
        if k in stated and stated[k] != str(v)
    ]
    for start in range(0, len(new), PARAMS_PER_BATCH):
        client.log_batch(run.info.run_id, params=new[start : start + PARAMS_PER_BATCH])
    for start in range(0, len(changed), PARAMS_PER_BATCH):
        client.log_batch(run.info.run_id, tags=changed[start : start + PARAMS_PER_BATCH])


def _log_metrics(client: Any, run: Any, scalars: list) -> None:
    from mlflow.entities import Metric

    by_key: dict[str, list[tuple[float, int]]] = {}
    for tag, value, step in scalars:
        by_key.setdefault(metric_name(tag), []).append((float(value), int(step)))
    missing = []
    for key, points in by_key.items():
        have = {(m.value, m.step) for m in client.get_metric_history(run.info.run_id, key)}
        missing += [Metric(key, v, 0, s) for v, s in dict.fromkeys(points) if (v, s) not in have]
    for start in range(0, len(missing), METRICS_PER_BATCH):
        client.log_batch(run.info.run_id, metrics=missing[start : start + METRICS_PER_BATCH])


def metric_name(tag: str) -> str:
    """A tag as an MLflow metric name: letters, digits, `_-.: ` and `/` between parts that
    are neither empty nor dots only. A tag that had to change (a user id with other
    characters) keeps a hash of itself, so no two users share a name."""
    parts = [re.sub(r"[^\w\-. :]", "_", part) for part in tag.split("/")]
    safe = "/".join(part if part.strip(".") else "_" for part in parts)
    return safe if safe == tag else f"{safe}_{hashlib.sha1(tag.encode()).hexdigest()[:6]}"


if __name__ == "__main__":
    payload = json.load(sys.stdin)
    write(
        Path(sys.argv[1]),
        payload["name"],
        payload["params"],
        payload["scalars"],
        payload["finished"],
    )
