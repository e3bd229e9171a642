"""The rounds in TensorBoard and a plot, rebuilt from the run's records after every round."""

from __future__ import annotations

import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_store import commit_round

from soppu.server.store import RunFolder
from soppu.server.tracking import track


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
    assert "emulator held-out loss/global (federated evaluation)" not in events.Tags()["scalars"]
    png = (run.root / "rounds.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert len(list((run.root / "tensorboard").iterdir())) == 2  # one event file, the stamp
