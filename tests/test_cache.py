"""The aligned-emulator cache: one entry per recipe and base model (not per model folder), an
unaligned emulator never cached, listing and pruning that say what they did."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from helpers import write_tiny_model, write_users_jsonl
from typer.testing import CliRunner

from soppu import cache
from soppu.cli import app
from soppu.server.config import FederationConfig
from soppu.server.prepare_run import load_base, prepare


@pytest.fixture
def world(tmp_path, monkeypatch):
    monkeypatch.setenv("SOPPU_CACHE", str(tmp_path / "cache"))
    model = write_tiny_model(tmp_path / "model", layers=6)
    shutil.copytree(model, tmp_path / "same-model-elsewhere")
    write_users_jsonl(tmp_path / "users.jsonl", {f"user{i}": 3000 for i in range(2)})
    write_users_jsonl(tmp_path / "public.jsonl", {"nobody": 6000}, seed=1)
    return tmp_path


def config(world, run: str, model: str, **changes) -> FederationConfig:
    values = dict(
        run_dir=str(world / run),
        base_model=str(world / model),
        data=str(world / "users.jsonl"),
        public=str(world / "public.jsonl"),
        users=2,
        seq_len=32,
        align_steps=2,
        threads=1,
    )
    return FederationConfig.from_run_config({**values, **changes})


def setup_run(cfg: FederationConfig) -> list[str]:
    lines: list[str] = []
    prepare(cfg, load_base(cfg), lines.append)
    return lines


def aligned_entries(world) -> list[cache.Entry]:
    return cache.entries(world / "cache", ["aligned-emulators"])


def test_one_entry_per_recipe_and_model_whatever_its_folder(world):
    first = setup_run(config(world, "run1", "model"))
    assert any("cached afterwards" in line for line in first), first
    second = setup_run(config(world, "run2", "same-model-elsewhere"))
    assert any("reusing the one cached" in line for line in second)
    (entry,) = aligned_entries(world)
    assert "aligned 2 steps" in entry.detail
    run1 = json.loads((world / "run1" / "emulator" / "soppu_emulator.json").read_text())
    run2 = json.loads((world / "run2" / "emulator" / "soppu_emulator.json").read_text())
    assert run1["alignment"] == run2["alignment"]  # the same aligned weights, reused
    assert run2["base_model"] == str(world / "same-model-elsewhere")  # named after its run

    setup_run(config(world, "run3", "model", align_steps=3))  # another recipe: another entry
    assert len(aligned_entries(world)) == 2


def test_an_unaligned_emulator_is_built_into_the_run_and_never_cached(world):
    lines = setup_run(config(world, "run0", "model", align_steps=0))
    assert not any("cached" in line for line in lines)
    assert aligned_entries(world) == []
    assert (world / "run0" / "emulator" / "soppu_emulator.json").is_file()
    assert sorted(p.name for p in world.glob("run0/.*")) == []  # no temp folder left


def test_an_unaligned_entry_is_not_reused_as_aligned(world):
    setup_run(config(world, "run1", "model"))
    (entry,) = aligned_entries(world)
    meta = entry.path / "soppu_emulator.json"
    info = json.loads(meta.read_text())
    info["alignment"] = {}  # as if it had been aligned for 0 steps
    meta.write_text(json.dumps(info))
    lines = setup_run(config(world, "run2", "model"))
    assert not any("reusing" in line for line in lines)
    (again,) = aligned_entries(world)
    assert "aligned 2 steps" in again.detail


def test_list_and_prune_by_last_use(world):
    setup_run(config(world, "run1", "model"))
    setup_run(config(world, "run2", "model", align_steps=3))
    old, recent = aligned_entries(world)
    month_ago = time.time() - 40 * 86400
    (old.path / ".last-used").write_text(f"{month_ago:.0f}\n")
    os.utime(recent.path)

    listed = CliRunner().invoke(app, ["cache", "list"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    assert old.path.name in listed.output and recent.path.name in listed.output

    dry = CliRunner().invoke(app, ["cache", "prune", "--dry-run"])
    assert dry.exit_code == 0 and "would remove 1 entries" in dry.output
    assert len(aligned_entries(world)) == 2
    pruned = CliRunner().invoke(app, ["cache", "prune"])
    assert pruned.exit_code == 0 and f"removed aligned-emulators/{old.path.name}" in pruned.output
    assert [e.path for e in aligned_entries(world)] == [recent.path]
    assert sorted(p.name for p in (world / "cache" / "aligned-emulators").iterdir()) == [
        recent.path.name
    ]
    bad = CliRunner().invoke(app, ["cache", "prune", "--kind", "everything"])
    assert bad.exit_code == 2 and "unknown cache kind 'everything'" in bad.output


def test_progress_estimates_leave_out_the_first_steps_start_up(monkeypatch):
    """A first step of 30 s (start-up) and then 1 s a step: after step 10 of 60 the estimate is
    50 s left, not the ~180 s that counting the first step would say."""
    from soppu.server import prepare_run

    clock = iter([0.0, 0.0, 30.0, *[30.0 + i for i in range(1, 60)]])
    monkeypatch.setattr(prepare_run.time, "perf_counter", lambda: next(clock))
    lines: list[str] = []
    progress = prepare_run.step_logger(lines.append, "align")
    for step in range(0, 11):
        progress(step, 60, 1.0)
    assert lines[1] == "  align 1/60: loss 1.0000 (first step 30.0 s, with start-up)"
    assert lines[2] == "  align 10/60: loss 1.0000 (1.0 s/step, ~50 s left)"
