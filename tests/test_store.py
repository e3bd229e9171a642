"""The adapter store: strict about what it keeps, and exact about rounds across crashes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from soppu.adapters import AdapterError, LoraState, read_lora
from soppu.server.config import ClientTraining, FederationConfig, RoundSchedule
from soppu.server.prepare_run import resolve_config
from soppu.server.store import COMMITTED, RoundStage, RunFolder, check_reply, recover, snapshot
from soppu.userids import UnsafeUserId

KEY_A = "base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.5.self_attn.q_proj.lora_B.weight"
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}


def lora(value: float = 1.0) -> LoraState:
    return LoraState({KEY_A: torch.full((2, 8), value), KEY_B: torch.full((8, 2), value)}, CONFIG)


SHAPES = {KEY_A: torch.Size([2, 8]), KEY_B: torch.Size([8, 2])}


@pytest.mark.parametrize("user", ["../evil", "", "/etc", "a b", "..", "x\n"])
def test_refuses_unsafe_user_ids(user):
    with pytest.raises(UnsafeUserId):
        check_reply(user, lora(), SHAPES, "reply")


def test_refuses_wrong_shapes_keys_and_nan():
    bad_shape = LoraState({KEY_A: torch.ones(2, 9), KEY_B: torch.ones(8, 2)}, CONFIG)
    with pytest.raises(AdapterError, match=r"lora_A.weight has shape \(2, 9\), expected \(2, 8\)"):
        check_reply("alice", bad_shape, SHAPES, "reply from alice")
    with pytest.raises(AdapterError, match="keys differ"):
        check_reply("alice", LoraState({KEY_A: torch.ones(2, 8)}, CONFIG), SHAPES, "reply")
    with pytest.raises(AdapterError, match="NaN or inf"):
        check_reply("alice", lora(float("nan")), SHAPES, "reply")
    check_reply("alice", lora(), SHAPES, "reply")  # a good one passes


def commit_round(run: RunFolder, round_: int, users: dict[str, float]) -> RoundStage:
    stage = RoundStage(run, round_)
    for user, value in users.items():
        stage.add(user, lora(value), {"round": round_})
    rows = [{"round": round_, "user": u, "status": "trained"} for u in users]
    stage.commit(rows, {"round": round_})
    return stage


def test_commit_moves_a_round_into_place(tmp_path):
    run = RunFolder(tmp_path / "run")
    commit_round(run, 1, {"alice": 1.0, "bob": 2.0})
    commit_round(run, 2, {"alice": 3.0})
    assert run.state()["round"] == 2
    assert run.users() == ["alice", "bob"]
    assert float(run.latest("alice").tensors[KEY_A][0, 0]) == 3.0
    assert float(run.latest("bob").tensors[KEY_A][0, 0]) == 2.0  # not sampled: kept
    assert [(r["round"], r["user"]) for r in run.read_jsonl(run.metrics)] == [
        (1, "alice"),
        (1, "bob"),
        (2, "alice"),
    ]
    assert not run.staging.exists()


def test_recover_finishes_an_interrupted_commit(tmp_path):
    run = RunFolder(tmp_path / "run")
    commit_round(run, 1, {"alice": 1.0, "bob": 1.0})
    # Round 2 crashed half-way through its commit: marker written, alice moved, bob not.
    stage = RoundStage(run, 2)
    for user in ("alice", "bob"):
        stage.add(user, lora(2.0), {"round": 2})
    rows = [{"round": 2, "user": u, "status": "trained"} for u in ("alice", "bob")]
    (stage.dir / "rows.json").write_text(json.dumps({"rows": rows, "summary": {"round": 2}}))
    (stage.dir / COMMITTED).write_text("")
    shutil.rmtree(run.store / "alice")
    (stage.dir / "users" / "alice").rename(run.store / "alice")
    # ... and bob's old adapter had been moved aside just before the crash.
    (run.store / "bob").rename(run.store / ".bob.old")

    state = recover(run)
    assert state["round"] == 2
    for user in ("alice", "bob"):
        assert float(read_lora(run.store / user).tensors[KEY_B][0, 0]) == 2.0
    keys = [(r["round"], r["user"]) for r in run.read_jsonl(run.metrics)]
    assert keys == [(1, "alice"), (1, "bob"), (2, "alice"), (2, "bob")]
    assert not (run.store / ".bob.old").exists() and not run.staging.exists()


def test_recover_after_a_crash_while_cleaning_up_a_committed_round(tmp_path):
    run = RunFolder(tmp_path / "run")
    commit_round(run, 1, {"alice": 1.0})
    # Round 2 was applied and its state written; the crash came while deleting its stage,
    # which had lost rows.json but still held the marker.
    stage = RoundStage(run, 2)
    stage.add("alice", lora(2.0), {"round": 2})
    stage.commit([{"round": 2, "user": "alice", "status": "trained"}], {"round": 2})
    stage.dir.mkdir(parents=True)
    (stage.dir / COMMITTED).write_text("")
    assert recover(run)["round"] == 2
    assert float(run.latest("alice").tensors[KEY_A][0, 0]) == 2.0
    assert [(r["round"], r["user"]) for r in run.read_jsonl(run.metrics)] == [
        (1, "alice"),
        (2, "alice"),
    ]
    assert not run.staging.exists()


def test_recover_discards_a_round_that_never_committed(tmp_path):
    run = RunFolder(tmp_path / "run")
    commit_round(run, 1, {"alice": 1.0})
    stage = RoundStage(run, 2)
    stage.add("alice", lora(9.0), {"round": 2})  # staged, never committed
    assert recover(run)["round"] == 1
    assert float(run.latest("alice").tensors[KEY_A][0, 0]) == 1.0
    assert not run.staging.exists()


def test_snapshot_is_a_consistent_copy(tmp_path):
    run = RunFolder(tmp_path / "run")
    commit_round(run, 1, {"alice": 1.0, "bob": 2.0})
    paths = snapshot(run, tmp_path / "snap")
    commit_round(run, 2, {"alice": 5.0})  # the store moves on; the snapshot does not
    assert float(read_lora(paths["alice"]).tensors[KEY_A][0, 0]) == 1.0
    with pytest.raises(AdapterError, match="no adapters stored"):
        snapshot(RunFolder(tmp_path / "empty"), tmp_path / "snap2")


def test_resume_keeps_the_runs_settings(tmp_path):
    config = FederationConfig(run_dir=str(tmp_path / "run"), schedule=RoundSchedule(rounds=2))
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        resolve_config(config, resume=True)
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    run.run_json.write_text(json.dumps({"config": config.flat()}))
    with pytest.raises(FileExistsError, match="pass --resume"):
        resolve_config(config, resume=False)
    more = FederationConfig(run_dir=config.run_dir, schedule=RoundSchedule(rounds=5))
    assert resolve_config(more, resume=True).schedule.rounds == 5  # more rounds: allowed
    other = FederationConfig(run_dir=config.run_dir, training=ClientTraining(lr=0.1))
    with pytest.raises(ValueError, match=r"keeps its settings; lr \(run: 0.0, now: 0.1\)"):
        resolve_config(other, resume=True)


def test_a_compression_round_adds_users_who_joined_and_recompresses_when_one_changed(tmp_path):
    """Users who first reply after a compression round are projected onto its bases (the
    others' bytes kept); once a stored user retrains, everyone is compressed again."""
    import json

    from helpers import tiny_causal_lm, tiny_population, write_users
    from safetensors.torch import load_file

    from soppu import emulator as E
    from soppu.compression import CompressionConfig
    from soppu.server.compression_round import compress_run

    run = RunFolder(tmp_path / "run")
    E.save(
        *E.build(tiny_causal_lm(layers=2), E.EmulatorPlan(2, top=1, drop=0.0), "t"), run.emulator
    )
    population = tiny_population(5, k=4, layers=2, shared=6)

    def train(users, round_):
        write_users(run.store, {u: population[u] for u in users}, rank=4, alpha=8, replace=True)
        for user in users:
            (run.store / user / "training.json").write_text(json.dumps({"round": round_}))
        run.set_state(round=round_)

    config = CompressionConfig(rank=6)
    train(["user00", "user01", "user02"], 1)
    first, _ = compress_run(run, config)
    train(["user03"], 2)
    second, _ = compress_run(run, config)
    added = json.loads((second / "manifest.json").read_text())["added"]
    assert added["users"] == ["user03"] and added["refit_slots"] == []
    for slot in json.loads((first / "manifest.json").read_text())["slots"]:
        old, grown = load_file(first / slot["file"]), load_file(second / slot["file"])
        for name, tensor in old.items():
            assert torch.equal(grown[name][: tensor.shape[0]], tensor), name
    train(["user00"], 3)
    third, _ = compress_run(run, config)
    manifest = json.loads((third / "manifest.json").read_text())
    assert "added" not in manifest and len(manifest["users"]) == 4
    train(["user04"], 4)  # a newcomer, but the round asks for another rank: everyone again
    fourth, _ = compress_run(run, CompressionConfig(rank=8))
    manifest = json.loads((fourth / "manifest.json").read_text())
    assert "added" not in manifest and manifest["config"]["rank"] == 8
