"""Nothing lost: --overwrite rules, writers serialised, killed writers' leftovers cleaned,
files readable by other accounts, the users' text not."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import tiny_population, write_users

from soppu import atomic
from soppu.compression import CompressionConfig
from soppu.server.compress_store import compress_adapters
from soppu.server.publish import publish
from soppu.server.versions import Versions

ROOT = Path(__file__).parents[1]


def checksums(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def adapters(tmp_path):
    return write_users(tmp_path / "adapters", tiny_population(3, k=4), rank=4, alpha=8)


def test_overwrite_never_replaces_the_inputs(adapters, tmp_path):
    before = checksums(tmp_path / "adapters")
    for out in (tmp_path / "adapters", tmp_path / "adapters" / "user00", tmp_path):
        with pytest.raises(atomic.WriteRefused, match="holds the input"):
            compress_adapters(adapters, out, CompressionConfig(rank=4), replace=True)
    assert checksums(tmp_path / "adapters") == before


def test_overwrite_replaces_only_what_soppu_wrote(adapters, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    (tmp_path / "a-file").write_text("keep me too")
    config = CompressionConfig(rank=4)
    with pytest.raises(atomic.WriteRefused, match="not written by SOPPU"):
        compress_adapters(adapters, theirs, config, replace=True)
    with pytest.raises(atomic.WriteRefused, match="is a file"):
        compress_adapters(adapters, tmp_path / "a-file", config, replace=True)
    assert (theirs / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "a-file").read_text() == "keep me too"

    compress_adapters(adapters, tmp_path / "store", config)
    compress_adapters(adapters, tmp_path / "store", CompressionConfig(rank=8), replace=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "adapters", "store", "theirs"]


def test_a_dangling_symlink_or_an_overlong_name_is_refused_before_any_work(adapters, tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(atomic.WriteRefused, match="is a symlink"):
        compress_adapters(adapters, tmp_path / "link", CompressionConfig(rank=4))
    with pytest.raises(atomic.WriteRefused, match="max 255"):
        compress_adapters(adapters, tmp_path / ("s" * 256), CompressionConfig(rank=4))
    long = tmp_path / ("s" * 255)  # the longest name there is still works
    compress_adapters(adapters, long, CompressionConfig(rank=4))
    assert (long / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["adapters", "link", long.name])


def test_two_publishers_at_once_make_two_versions(adapters, tmp_path):
    compress_adapters(adapters, tmp_path / "store", CompressionConfig(rank=4))
    made, errors = [], []

    def one() -> None:
        try:
            made.append(publish(tmp_path / "store", tmp_path / "serving").name)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(made) == ["v0001", "v0002", "v0003"]
    assert Versions(tmp_path / "serving").names() == ["v0001", "v0002", "v0003"]
    assert os.readlink(tmp_path / "serving" / "current") == "v0003"
    assert sorted(p.name for p in (tmp_path / "serving").iterdir()) == [
        "current",
        "v0001",
        "v0002",
        "v0003",
    ]


def test_a_second_writer_waits_and_then_refuses_to_clobber(tmp_path):
    target = tmp_path / "out"
    entered, release = threading.Event(), threading.Event()

    def first() -> None:
        with atomic.building_dir(target) as tmp:
            (tmp / "who").write_text("first")
            entered.set()
            release.wait(60)

    thread = threading.Thread(target=first)
    thread.start()
    entered.wait(60)
    outcome = []

    def second() -> None:
        try:
            with atomic.building_dir(target) as tmp:
                (tmp / "who").write_text("second")
        except atomic.TargetExists as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=second)
    waiter.start()
    waiter.join(1.0)
    assert waiter.is_alive()  # blocked on the first writer's lock
    release.set()
    thread.join()
    waiter.join(60)
    assert outcome and (target / "who").read_text() == "first"


KILLED_WRITER = """
import sys, time
from pathlib import Path
from soppu import atomic
with atomic.building_dir(Path(sys.argv[1]), replace=True) as tmp:
    (tmp / "half").write_bytes(b"x" * 1000)
    print("building", flush=True)
    time.sleep(600)
"""


def test_a_killed_writers_temp_folder_is_cleaned_by_the_next_writer(tmp_path):
    target = tmp_path / "store"
    with atomic.building_dir(target) as tmp:
        (tmp / "whole").write_text("v1")
    stranger = tmp_path / ".someone-elses.building"  # ours by name only: never touched
    stranger.mkdir()
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(target)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert writer.stdout.readline().strip() == "building"
    assert atomic.clean_leftovers(tmp_path) == []  # alive: its lock is held
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".store.")]
    assert any(p.name.endswith(".building") for p in leftovers)
    assert (target / "whole").read_text() == "v1"  # the kill left the old one whole

    with atomic.building_dir(target, replace=True) as tmp:
        (tmp / "whole").write_text("v2")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".someone-elses.building", "store"]
    assert (target / "whole").read_text() == "v2"


def test_published_files_are_readable_by_others_and_the_users_text_is_not(adapters, tmp_path):
    previous = os.umask(0o022)
    try:
        compress_adapters(adapters, tmp_path / "store", CompressionConfig(rank=4))
        version = publish(tmp_path / "store", tmp_path / "serving")
        with atomic.building_dir(tmp_path / "data", private=True) as tmp:
            (tmp / "users.jsonl").write_text("{}")
        atomic.write_text(tmp_path / "state.json", "{}")
    finally:
        os.umask(previous)
    for root in (tmp_path / "store", version):
        for path in [root, *root.rglob("*")]:
            expected = 0o755 if path.is_dir() else 0o644
            assert path.stat().st_mode & 0o777 == expected, path
    assert (tmp_path / "state.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "data" / "users.jsonl").stat().st_mode & 0o777 == 0o600


def test_publish_refuses_a_current_that_is_a_real_folder(adapters, tmp_path):
    compress_adapters(adapters, tmp_path / "store", CompressionConfig(rank=4))
    (tmp_path / "serving" / "current").mkdir(parents=True)
    with pytest.raises(atomic.WriteRefused, match="not the symlink"):
        publish(tmp_path / "store", tmp_path / "serving")
    assert sorted(p.name for p in (tmp_path / "serving").iterdir()) == ["current"]


def test_replacing_swaps_in_one_step_and_leaves_nothing_beside(tmp_path):
    target = tmp_path / "out"
    for text in ("one", "two", "three"):
        with atomic.building_dir(target, replace=True) as tmp:
            (tmp / "value").write_text(text)
    assert (target / "value").read_text() == "three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
