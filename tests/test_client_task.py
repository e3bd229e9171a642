"""The client's side without Flower: receiving the emulator, and finding its user."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_causal_lm

from soppu import messages
from soppu.clients import task
from soppu.data import DataError, DataOptions
from soppu.emulator import EmulatorError, EmulatorPlan, build, save
from soppu.server.prepare_run import emulator_message


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """An emulator saved by the server, and the message it sends (the client's cache empty)."""
    monkeypatch.setenv("SOPPU_CACHE", str(tmp_path / "client-cache"))
    task._EMULATORS.clear()
    emulator, info = build(tiny_causal_lm(6), EmulatorPlan(6, drop=0.5, select="even"), "tiny")
    folder = save(emulator, info, tmp_path / "emulator")
    return emulator, info, messages.emulator_files(emulator_message(folder))


def test_the_client_rebuilds_the_servers_emulator_exactly(shipped):
    emulator, info, (files, state) = shipped
    assert "lm_head.weight" not in state  # tied to the embedding: sent once
    with pytest.raises(task.MissingEmulator):
        task.emulator(info.version)
    assert task.install(files, state) == info.version
    assert task.held_versions() == [info.version]
    model, loaded = task.emulator(info.version)
    assert loaded.full_layers == info.full_layers
    ids = torch.arange(20).view(2, 10)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, emulator(input_ids=ids).logits)
    assert task.install(files, state) == info.version  # a second install is a no-op


def test_tampered_weights_are_refused_and_nothing_is_cached(shipped):
    _, _, (files, state) = shipped
    key = next(k for k in state if "layers.1." in k)
    state[key] = state[key] + 1e-3
    with pytest.raises(EmulatorError, match="do not match its id"):
        task.install(files, state)
    assert task.held_versions() == []
    assert list(task.emulator_root().iterdir()) == []  # no half-built folder left either


def test_a_node_finds_its_user_by_node_config_or_partition():
    setup = messages.Setup("", DataOptions(), ("alice", "bob"), "tiny")
    assert task.my_user({"partition-id": 1, "num-partitions": 2}, setup) == "bob"
    assert task.my_user({"user-id": "carol"}, setup) == "carol"
    with pytest.raises(DataError, match="partition 2 has no user"):
        task.my_user({"partition-id": 2}, setup)
    with pytest.raises(DataError, match="neither user-id nor partition-id"):
        task.my_user({}, setup)
    round_trip = messages.Setup.from_record(setup.to_record())
    assert round_trip == setup
