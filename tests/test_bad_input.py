"""The bad-input matrix: every case ends in one `error:` line naming the file and the problem,
never a traceback, and leaves every byte of the existing store and serving dir as it was."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import tiny_population, write_users
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from soppu.cli import app
from soppu.compression import CompressionConfig
from soppu.server.compress_store import compress_adapters
from soppu.server.publish import publish


def checksums(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Good adapters, a store made from them and a serving dir published from it."""
    root = tmp_path_factory.mktemp("world")
    write_users(root / "adapters", tiny_population(3, k=4), rank=4, alpha=8)
    compress_adapters(
        {p.name: p for p in (root / "adapters").iterdir()}, root / "store", CompressionConfig(4)
    )
    publish(root / "store", root / "serving")
    return root


def set_config(**changes) -> Callable[[Path], None]:
    def edit(adapter: Path) -> None:
        path = adapter / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


def raw_config(text: str) -> Callable[[Path], None]:
    return lambda adapter: (adapter / "adapter_config.json").write_text(text)


def scale_weights(factor: float) -> Callable[[Path], None]:
    def edit(adapter: Path) -> None:
        path = adapter / "adapter_model.safetensors"
        state = load_file(path)
        save_file({k: v * factor for k, v in state.items()}, path)

    return edit


def truncate_weights(adapter: Path) -> None:
    path = adapter / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])


NESTED = "[" * 100_000 + "]" * 100_000

# (case, edit of one copied adapter, what the error line must say)
ADAPTER_CASES = [
    ("alpha NaN", raw_config('{"peft_type": "LORA", "r": 4, "lora_alpha": NaN}'), "lora_alpha"),
    (
        "alpha inf",
        raw_config('{"peft_type": "LORA", "r": 4, "lora_alpha": Infinity}'),
        "lora_alpha",
    ),
    ("alpha 1e300", set_config(lora_alpha=1e300), "lora_alpha"),
    ("r 1e999", raw_config('{"peft_type": "LORA", "r": 1e999, "lora_alpha": 8}'), "r must be"),
    ("r 4.5", set_config(r=4.5), "r must be"),
    ("r as text", set_config(r="4"), "r must be"),
    ("rank_pattern regex", set_config(rank_pattern={"(q_proj": 4}), "not a regex"),
    ("rank_pattern value", set_config(rank_pattern={"q_proj": -1}), "rank_pattern"),
    ("deeply nested", raw_config(NESTED), "nested too deeply"),
    ("not an object", raw_config("[1, 2]"), "JSON object"),
    ("huge finite weights", scale_weights(1e30), "no trained LoRA reaches"),
    ("NaN weights", scale_weights(math.nan), "non-finite"),
    ("truncated weights", truncate_weights, "safetensors"),
    ("DoRA", set_config(use_dora=True), "DoRA"),
]


def run_cli(*args) -> tuple[int, str, BaseException | None]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output, result.exception


def assert_one_clear_line(code: int, output: str, exception, *needles: str) -> None:
    assert code != 0, output
    assert isinstance(exception, SystemExit), f"{exception!r}\n{output}"
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for needle in needles:
        assert needle in errors[0], output


@pytest.mark.parametrize("case, edit, says", ADAPTER_CASES, ids=[c[0] for c in ADAPTER_CASES])
def test_a_bad_adapter_is_one_line_and_nothing_changes(world, tmp_path, case, edit, says):
    adapters = tmp_path / "adapters"
    for user in ("user00", "user01"):
        (adapters / user).mkdir(parents=True)
        for file in (world / "adapters" / user).iterdir():
            (adapters / user / file.name).write_bytes(file.read_bytes())
    edit(adapters / "user01")
    before = checksums(world)
    code, output, exc = run_cli("compress", adapters, "--out", world / "store", "--overwrite")
    assert_one_clear_line(code, output, exc, "user01", says)
    code, output, exc = run_cli(
        "add", world / "store", adapters / "user01", "--out", tmp_path / "s"
    )
    assert_one_clear_line(code, output, exc, "user01", says)
    assert checksums(world) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"]


def copy_store(world: Path, into: Path) -> Path:
    store = into / "store"
    for file in (world / "store").rglob("*"):
        if file.is_file():
            (store / file.relative_to(world / "store")).parent.mkdir(parents=True, exist_ok=True)
            (store / file.relative_to(world / "store")).write_bytes(file.read_bytes())
    return store


def edit_manifest(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(store: Path) -> None:
        manifest = json.loads((store / "manifest.json").read_text())
        change(manifest)
        (store / "manifest.json").write_text(json.dumps(manifest))

    return edit


STORE_CASES = [
    ("no slots", edit_manifest(lambda m: m.pop("slots")), "'slots'"),
    ("slot without file", edit_manifest(lambda m: m["slots"][0].pop("file")), "lacks file"),
    ("users not a list", edit_manifest(lambda m: m.update(users="x")), "'users'"),
    ("a list", lambda s: (s / "manifest.json").write_text("[]"), "format"),
    ("deeply nested", lambda s: (s / "manifest.json").write_text(NESTED), "nested too deeply"),
    ("slot file changed", lambda s: next((s / "slots").iterdir()).write_bytes(b"x"), "checksum"),
    ("codes of no width", edit_manifest(lambda m: m["slots"][0].update(bits=5)), "bits 5"),
    ("an unknown codec", edit_manifest(lambda m: m["slots"][0].update(codec="lz4")), "'lz4'"),
]


@pytest.mark.parametrize("case, edit, says", STORE_CASES, ids=[c[0] for c in STORE_CASES])
def test_a_bad_store_is_one_line_and_the_serving_dir_is_untouched(
    world, tmp_path, case, edit, says
):
    store = copy_store(world, tmp_path)
    edit(store)
    before = checksums(world)
    code, output, exc = run_cli("publish", store, "--to", world / "serving")
    assert_one_clear_line(code, output, exc, str(store), says)
    code, output, exc = run_cli("add", store, world / "adapters", "--out", tmp_path / "grown")
    assert_one_clear_line(code, output, exc, str(store), says)
    assert checksums(world) == before
    assert sorted((world / "serving").iterdir()) == sorted(
        [world / "serving" / "current", world / "serving" / "v0001"]
    )


def test_bad_targets_are_refused_before_any_work(world, tmp_path):
    before = checksums(world)
    adapters = world / "adapters"
    new = write_users(tmp_path / "new", {"new00": tiny_population(1)["user00"]}, rank=4, alpha=8)
    new = new["new00"]
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "serving" / "current").mkdir(parents=True)
    cases = [
        (("compress", adapters, "--out", adapters, "--overwrite"), "holds the input"),
        (("compress", adapters, "--out", world, "--overwrite"), "holds the input"),
        (("compress", adapters, "--out", tmp_path / "dangling"), "symlink"),
        (("compress", adapters, "--out", tmp_path / ("n" * 256)), "max 255"),
        (("compress", adapters, "--out", tmp_path / "a-file", "--overwrite"), "is a file"),
        (("compress", adapters, "--out", tmp_path / "theirs", "--overwrite"), "not written by"),
        (("compress", adapters, "--out", world / "store"), "already exists"),
        (("publish", world / "store", "--to", tmp_path / "serving"), "not the symlink"),
        (("publish", world / "store", "--to", tmp_path / "a-file"), "is a file"),
        (("add", world / "store", new, "--out", world / "store", "--overwrite"), "holds the input"),
    ]
    for args, says in cases:
        code, output, exc = run_cli(*args)
        assert_one_clear_line(code, output, exc, says)
    assert checksums(world) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a-file",
        "dangling",
        "new",
        "serving",
        "theirs",
    ]
    assert [p.name for p in (tmp_path / "serving").iterdir()] == ["current"]


def test_a_path_with_brackets_is_printed_as_it_is(world, tmp_path):
    odd = tmp_path / "[bold]runs[/bold]"
    code, output, exc = run_cli("compress", odd / "nowhere", "--out", odd / "store")
    assert_one_clear_line(code, output, exc, "[bold]runs[/bold]/nowhere")
    code, output, _ = run_cli("compress", world / "adapters", "--out", odd / "store", "--rank", 4)
    assert code == 0, output
    assert str(odd / "store") in output


def test_threads_below_one_is_a_usage_error(world, tmp_path):
    for threads in ("0", "-1"):
        result = CliRunner().invoke(
            app,
            [
                "compress",
                str(world / "adapters"),
                "--out",
                str(tmp_path / "s"),
                "--threads",
                threads,
            ],
        )
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert "--threads" in result.output
    assert not (tmp_path / "s").exists()


def test_overwrite_replaces_only_what_the_same_verb_wrote(world, tmp_path):
    """--overwrite never turns a serving version, a user's adapter or a serving dir into a
    store, and publish never writes versions into a store: one line each, no byte changed,
    for folders stamped with their kind and for those written before kinds were stamped."""
    import shutil

    adapters = world / "adapters"
    someone = write_users(tmp_path / "mine", {"me": tiny_population(1)["user00"]}, rank=4, alpha=8)
    legacy = tmp_path / "legacy-version"  # a serving version stamped before kinds existed
    shutil.copytree(world / "serving" / "v0001", legacy)
    (legacy / ".soppu").write_text('{"written_by": "soppu"}')
    before = checksums(world), checksums(tmp_path)
    cases = [
        (
            ("compress", adapters, "--out", world / "serving" / "v0001", "--overwrite"),
            "is a serving version",
        ),
        (("compress", adapters, "--out", someone["me"], "--overwrite"), "is an adapter"),
        (("compress", adapters, "--out", legacy, "--overwrite"), "is a serving version"),
        (
            ("add", world / "store", someone["me"], "--out", legacy, "--overwrite"),
            "is a serving version",
        ),
        (("publish", world / "store", "--to", world / "store"), "is a compressed store"),
        (("publish", world / "store", "--to", legacy), "is a serving version"),
    ]
    for args, says in cases:
        code, output, exc = run_cli(*args)
        assert_one_clear_line(code, output, exc, says, "not")
    assert (checksums(world), checksums(tmp_path)) == before
    # A store still replaces a store.
    code, output, _ = run_cli("compress", adapters, "--out", tmp_path / "store", "--rank", "4")
    assert code == 0, output
    code, output, _ = run_cli(
        "compress", adapters, "--out", tmp_path / "store", "--rank", "4", "--overwrite"
    )
    assert code == 0, output


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("serve", "SERVING", "--port", "70000"), "--port"),
        (("serve", "SERVING", "--port", "0"), "--port"),
        (("serve", "SERVING", "--max-batch", "0"), "--max-batch"),
        (("serve", "SERVING", "--max-wait-ms", "1e12"), "--max-wait-ms"),
        (("serve", "SERVING", "--max-wait-ms", "-1"), "--max-wait-ms"),
        (("compress", "ADAPTERS", "--out", "OUT", "--tol", "-1"), "--tol"),
        (("compress", "ADAPTERS", "--out", "OUT", "--max-iters", "0"), "--max-iters"),
    ],
)
def test_numeric_flags_out_of_range_are_refused_at_parse_time(world, tmp_path, args, says):
    """Nothing starts: click names the flag and the range (exit 2), no folder is written."""
    where = {"SERVING": world / "serving", "ADAPTERS": world / "adapters", "OUT": tmp_path / "o"}
    result = CliRunner().invoke(app, [str(where.get(a, a)) for a in args])
    assert result.exit_code == 2 and says in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_compression_settings_out_of_range_are_refused_by_the_config():
    for bad, says in [
        ({"tol": -1.0}, "tol"),
        ({"tol": float("nan")}, "tol"),
        ({"max_iters": 0}, "max_iters"),
        ({"device": "meta"}, "device"),
    ]:
        with pytest.raises(ValueError, match=says):
            CompressionConfig(rank=4, **bad)


def test_inspect_and_report_on_what_they_cannot_read_say_so_in_one_line(world, tmp_path):
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "a-file").write_text("{}")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "manifest.json").write_text('{"format": "soppu-compressed/1"}')
    (tmp_path / "empty" / "report").mkdir(parents=True)
    (tmp_path / "empty" / "report" / "report.json").write_text("")
    cases = [
        (("inspect", fifo), "not a folder"),
        (("inspect", tmp_path / "a-file"), "not a folder"),
        (("inspect", tmp_path / "store"), "manifest.json"),
        (("report", tmp_path / "empty"), "report.json"),
    ]
    for args, says in cases:
        code, output, exc = run_cli(*args)
        assert_one_clear_line(code, output, exc, says)


def test_a_full_disk_is_one_line_and_nothing_changes(world, tmp_path, monkeypatch):
    """ENOSPC in the middle of writing a store: one line naming the file, no store left
    half-written, the existing store and serving dir as they were."""
    import errno

    from soppu.server import compressed_store

    before = checksums(world)

    def full(tensors, filename, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(compressed_store, "save_file", full)  # what writes slot files
    for target in (tmp_path / "new-store", world / "store"):
        extra = ("--overwrite",) if target.exists() else ()
        code, output, exc = run_cli(
            "compress", world / "adapters", "--out", target, "--rank", "4", *extra
        )
        assert_one_clear_line(code, output, exc, "No space left on device", "unchanged")
    assert not (tmp_path / "new-store").exists()
    assert checksums(world) == before
    assert not [p for p in world.iterdir() if p.name.startswith(".")], list(world.iterdir())


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["full-disk", "read-only"])
@pytest.mark.parametrize("verb", ["compress", "publish", "synth", "report"])
def test_a_target_that_cannot_be_written_is_one_line_and_nothing_changes(
    world, tmp_path, monkeypatch, code, verb
):
    """Every file the CLI writes starts as a temporary file beside its target (or a slot file
    through safetensors): when the disk is full or read-only, one line names where, nothing
    is half-written and what was there stays as it was."""
    import tempfile

    from soppu.server import compressed_store

    before = checksums(world)
    paths = sorted(world.rglob("*"))

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(kwargs.get("dir") or args[-1]))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(compressed_store, "save_file", refuse)
    target = tmp_path / "target"
    args = {
        "compress": ("compress", world / "adapters", "--out", target, "--rank", "4"),
        "publish": ("publish", world / "store", "--to", world / "serving"),
        "synth": ("synth", target, "--users", "2", "--layers", "1", "--lora-rank", "2"),
        "report": ("report", world / "store", "--out", target),
    }[verb]
    exit_code, output, exc = run_cli(*args)
    assert_one_clear_line(exit_code, output, exc, os.strerror(code), "unchanged")
    assert checksums(world) == before
    assert not target.exists() or not any(target.rglob("*")), list(target.rglob("*"))
    assert sorted(world.rglob("*")) == paths  # no temporary file left anywhere
