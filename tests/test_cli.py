"""The `soppu` command line end to end on a tiny population, and its error handling."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
from helpers import tiny_population, write_users
from typer.testing import CliRunner

from soppu.adapters import AdapterInfo
from soppu.cli import app
from soppu.compression import CompressionConfig
from soppu.server.compress_store import compress_adapters

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_compress_publish_report_inspect(tmp_path):
    code, out = invoke("synth", tmp_path / "adapters", "--users", 6, "--layers", 2)
    assert code == 0, out
    code, out = invoke(
        "compress",
        tmp_path / "adapters",
        "--out",
        tmp_path / "store",
        "--rank",
        12,
        "--sigma",
        "diag",
        "--weights",
        "norm",
        "--threads",
        1,
    )
    assert code == 0, out
    assert "Per-layer reconstruction error" in out and "q_proj" in out
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["config"]["sigma"] == "diag" and manifest["config"]["weights"] == "norm"
    assert len(manifest["users"]) == 6 and len(manifest["slots"]) == 4

    code, out = invoke("publish", tmp_path / "store", "--to", tmp_path / "serving")
    assert code == 0, out
    assert "v0001" in out and (tmp_path / "serving" / "current").is_symlink()

    for stale in (tmp_path / "store" / "report").iterdir():
        stale.unlink()
    (tmp_path / "store" / "report" / "report.json").write_text(
        (tmp_path / "serving" / "v0001" / "report" / "report.json").read_text()
    )
    code, out = invoke("report", tmp_path / "store")
    assert code == 0, out
    written = sorted(p.name for p in (tmp_path / "store" / "report").iterdir())
    assert written == ["errors.png", "params.png", "report.csv", "report.json", "report.md"]
    csv_lines = (tmp_path / "store" / "report" / "report.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 6 * 4  # one row per (user, module)
    assert (tmp_path / "store" / "report" / "errors.png").read_bytes()[:4] == b"\x89PNG"

    for path, expected in [
        (tmp_path / "adapters", "folder of 6 PEFT adapters"),
        (tmp_path / "adapters" / "user0001", "PEFT LoRA adapter"),
        (tmp_path / "store", "compressed store"),
        (tmp_path / "serving", "current → v0001"),
        (tmp_path / "serving" / "v0001", "serving version v0001"),
    ]:
        code, out = invoke("inspect", path)
        assert code == 0 and expected in out, out

    # `report` takes what `inspect` describes: a folder of versions (its newest), a run (its
    # served version)
    shutil.copytree(tmp_path / "store", tmp_path / "compressed" / "v0001")
    for path in (tmp_path / "compressed", tmp_path):
        code, out = invoke("report", path)
        assert code == 0 and "report.json" in out, out

    # a vLLM command a shell runs as printed: every user's dir, a LoRA rank vLLM accepts
    version = tmp_path / "serving" / "v0001"
    manifest = json.loads((version / "manifest.json").read_text())
    code, out = invoke("inspect", version)
    assert "base weights: " in out
    words = shlex.split(next(line for line in out.splitlines() if "vLLM:" in line).split(":", 1)[1])
    assert words[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    rank = int(words[words.index("--max-lora-rank") + 1])
    assert rank >= manifest["export_rank"] and rank in (1, 8, 16, 32, 64, 128, 256, 320, 512)
    modules = dict(w.split("=", 1) for w in words[words.index("--lora-modules") + 1 :])
    assert sorted(modules) == sorted(manifest["users"])
    assert all((Path(where) / "adapter_config.json").is_file() for where in modules.values())


def test_energy_target_picks_ranks_per_slot(tmp_path):
    invoke("synth", tmp_path / "adapters", "--users", 5, "--layers", 1)
    code, out = invoke(
        "compress",
        tmp_path / "adapters",
        "--out",
        tmp_path / "store",
        "--max-error",
        0.2,
        "--threads",
        1,
    )
    assert code == 0, out
    report = json.loads((tmp_path / "store" / "report" / "report.json").read_text())
    for slot in report["slots"]:
        assert slot["bracket"]["achieved"] <= 0.2 + 1e-6


def test_a_rank_above_the_span_is_capped_exact_and_said_once(tmp_path):
    """6 users of rank 4 span 24 directions: --rank 32 gives the lossless result."""
    invoke("synth", tmp_path / "adapters", "--users", 6, "--layers", 1, "--lora-rank", 4)
    code, out = invoke("compress", tmp_path / "adapters", "--out", tmp_path / "store", "--rank", 32)
    assert code == 0, out
    assert out.count("rank 32 is more than") == 1 and "nothing is lost" in out
    report = json.loads((tmp_path / "store" / "report" / "report.json").read_text())
    assert report["totals"]["max"] <= 1e-5
    assert all(max(slot["ranks"]) <= 24 for slot in report["slots"])


def test_bad_input_is_one_clear_error_and_exit_2(tmp_path):
    (tmp_path / "pool" / "mallory").mkdir(parents=True)
    (tmp_path / "pool" / "mallory" / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    (tmp_path / "pool" / "mallory" / "adapter_model.bin").write_bytes(b"pickle")
    code, out = invoke("compress", tmp_path / "pool", "--out", tmp_path / "store", "--rank", 4)
    assert code == 2
    assert "error:" in out and "adapter_model.bin: pickled weights are never loaded" in out
    assert not (tmp_path / "store").exists()
    code, out = invoke("publish", tmp_path / "nowhere", "--to", tmp_path / "serving")
    assert code == 2 and "manifest.json: missing" in out
    code, out = invoke("compress", tmp_path / "pool", "--out", tmp_path / "s", "--rank", 0)
    assert code == 2 and "rank must be ≥ 1" in out


def test_demo_runs_the_whole_flow(tmp_path):
    code, out = invoke(
        "demo", "--out", tmp_path / "run", "--users", 4, "--layers", 1, "--rank", 8, "--threads", 1
    )
    assert code == 0, out
    assert (tmp_path / "run" / "serving" / "current" / "users" / "user0003").is_dir()
    assert (tmp_path / "run" / "compressed" / "v0001" / "manifest.json").is_file()


@pytest.mark.parametrize("budget", [10**9, 1], ids=["one chunk", "a slot at a time"])
def test_compression_reads_every_tensor_once(tmp_path, monkeypatch, budget):
    """Each (user, module) is read exactly once, NaN check included, with one open of a
    user's file per chunk of slots; a chunk too big for the budget is read lazily."""
    from soppu.server import compress_store

    paths = write_users(tmp_path, tiny_population(4, layers=3), rank=4, alpha=4)
    opens, reads = [], []
    real = AdapterInfo.load_many

    def spy(self, modules):
        modules = list(modules)
        opens.append(self.user)
        reads.extend((self.user, m) for m in modules)
        return real(self, modules)

    monkeypatch.setattr(AdapterInfo, "load_many", spy)
    monkeypatch.setattr(AdapterInfo, "check_finite", lambda self: pytest.fail("read twice"))
    monkeypatch.setattr(compress_store, "CHUNK_BYTES", budget)
    compress_adapters(paths, tmp_path / "store", CompressionConfig(rank=4))
    assert sorted(reads) == sorted({(u, m) for u in paths for m in _modules(paths)})
    assert len(reads) == 4 * 6
    assert len(opens) == (4 if budget > 1 else 4 * 6)


def _modules(paths):
    from soppu.adapters import read_adapter

    return read_adapter(next(iter(paths.values()))).modules


def test_nan_found_while_reading_leaves_nothing_behind(tmp_path):
    import torch

    users = tiny_population(3, layers=1)
    users["user01"]["model.layers.0.self_attn.v_proj"][1][0, 0] = float("nan")
    write_users(tmp_path / "adapters", users, rank=4, alpha=4)
    code, out = invoke("compress", tmp_path / "adapters", "--out", tmp_path / "store", "--rank", 4)
    assert code == 2 and "user01" in out and "non-finite" in out
    assert not (tmp_path / "store").exists()
    assert torch.isnan(users["user01"]["model.layers.0.self_attn.v_proj"][1]).any()


def test_the_per_user_table_fits_80_columns_and_names_every_user(monkeypatch):
    """At 80 columns (any log), every row still says which user it is (a long id folds) and
    no header is cut."""
    from soppu.cli import common
    from soppu.cli.federation import print_evaluation

    gain = {"point": 0.189, "low": 0.161, "high": 0.214, "verdict": "better"}
    users = ["measure-for-measure.DUKE_VINCENTIO", "hamlet.HAMLET"]
    row = {"base": 93.7, "global": 75.6, "emulator": 165.1, "personal": 75.9, "compressed": 76.0}
    result = {
        "users": [
            {"user": u, **row, "served": "personal", "gains": {"served_over_base": gain}}
            for u in users
        ],
        "summary": {
            "served_counts": {"personal": 2},
            "helped": 2,
            "harmed": 0,
            "unchanged": 0,
            "users": 2,
            "improved": 2,
        },
    }
    # the private field, so that undoing it restores "follow the terminal" (None), not the
    # width read at patch time, which would pin every later test's console to 80
    monkeypatch.setattr(common.console, "_width", 80)
    with common.console.capture() as captured:
        print_evaluation(result)
    lines = captured.get().splitlines()
    table = lines[1 : lines.index(next(line for line in lines if line.startswith("emu+own")))]
    assert table and all(len(line) <= 80 for line in table), table
    header = table[0]
    for label in ("user", "base", "global", "emu+own", "own", "pub", "served", "gain [95%]"):
        assert label in header, header
    folded = "".join(line.split()[0] for line in table[2:] if line.split())
    assert all(u.replace(" ", "") in folded for u in users), folded


def test_after_a_run_the_summary_lines_are_printed_once(monkeypatch):
    """The server logs the evaluation's summary as it ends; the command's closing tables then
    leave it out rather than print it twice."""
    from soppu.cli import common
    from soppu.cli.federation import print_evaluation
    from soppu.server.evaluation import summary_lines

    gain = {"point": 0.1, "low": 0.05, "high": 0.15, "verdict": "better"}
    row = {"base": 10.0, "global": 9.0, "emulator": 12.0, "personal": 8.9, "compressed": 8.9}
    summary = {"served_counts": {"personal": 1}, "helped": 1, "harmed": 0, "unchanged": 0}
    result = {
        "users": [{"user": "u", **row, "served": "personal", "gains": {"served_over_base": gain}}],
        "summary": {**summary, "users": 1, "improved": 1},
    }
    first = summary_lines(result["summary"])[0]
    monkeypatch.setattr(common.console, "_width", 200)  # as above
    with common.console.capture() as captured:
        print_evaluation(result, summary=False)
    assert first not in captured.get() and "gain [95%]" in captured.get()
    with common.console.capture() as captured:
        print_evaluation(result)
    assert captured.get().count(first) == 1


HELP_OF_EVERY_VERB = """
import json, click, typer
from typer.testing import CliRunner
from soppu.cli import app

def verbs(command, path):
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from verbs(sub, [*path, name])
    else:
        yield path, command

out = {}
for path, command in verbs(typer.main.get_command(app), []):
    names = [o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")]
    text = CliRunner().invoke(app, [*path, "--help"]).output
    out[" ".join(path)] = {"names": names, "help": text}
print(json.dumps(out))
"""


@pytest.mark.parametrize("columns", [80, 120])
def test_every_verbs_help_names_every_option_whole_at_any_width(columns):
    """At 80 columns (any log) Typer's rich panels would cut long option names
    (`--compress-refit-a…`); there the help is click's plain layout, from 100 columns rich's.
    Either way every option is named whole and every bracket of the help text is shown."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": str(columns)}
    shown = subprocess.run(
        [sys.executable, "-c", HELP_OF_EVERY_VERB], env=env, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    helps = json.loads(shown.stdout)
    assert {"simulate", "personalize", "emulator build", "serve", "keys add"} <= set(helps)
    for verb, entry in helps.items():
        lines = entry["help"].splitlines()
        assert all(len(line) <= columns for line in lines), verb
        words = set(entry["help"].replace(",", " ").split())
        missing = [n for n in entry["names"] if n not in words and n != "--help"]
        assert not missing, (verb, missing)
        assert "…" not in entry["help"] and "\\[" not in entry["help"], verb
    assert "hf:DATASET[@SUBSET]" in helps["simulate"]["help"]
    assert ("│" in helps["simulate"]["help"]) == (columns >= 100)
