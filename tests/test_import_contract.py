"""The layering the docs draw, kept true: a test that fails when a module imports one its layer
must not (at the top of the file or inside a function alike).

    soppu/compression/   pure tensors: imports nothing else of soppu
    soppu/               the shared core: imports none of compression/, server/, clients/
    soppu/clients/       the Flower ClientApp: the core only
    soppu/server/        the Flower ServerApp and what runs on the server: never clients/
    soppu/cli/, api.py   the entry points, on top: they may import anything, nothing imports them

and inside the core, lower layers never import higher ones (an adapter file does not need the
emulator, nor a user's text the base model).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "soppu"
PARTS = ("compression", "clients", "server")  # subpackages with a contract of their own
FORBIDDEN = {
    "compression": {"core", "clients", "server"},
    "core": {"clients", "server", "compression"},
    "clients": {"server", "compression"},
    "server": {"clients"},
    "entry": set(),
}
ENTRY_POINTS = ("cli", "api.py", "__main__.py")
SOPPU_LAYERS = [
    {"errors", "settings"},
    {"userids", "atomic", "precision", "train_config", "fetch", "tensor_file", "cache", "sources"}
    | {"intervals"},
    {"completions"},  # the serving API as a client asks it
    {"adapters", "adapter_sets", "data", "lm", "synthetic"},
    {"basemodel", "emulator", "alignment", "generated", "public", "personalize", "messages"}
    | {"repair", "teachers", "features"},
]


def imports(path: Path) -> set[str]:
    """Every absolute module name `path` imports, wherever the statement sits."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def owner(path: Path) -> str:
    """The part of soppu a module belongs to: a subpackage, the entry points, or the core."""
    first = path.relative_to(PACKAGE).parts[0]
    return "entry" if first in ENTRY_POINTS else first if first in PARTS else "core"


def part(name: str) -> str | None:
    """The part of soppu an imported module name is in (None: not soppu)."""
    pieces = name.split(".")
    if pieces[0] != "soppu":
        return None
    if len(pieces) == 1 or pieces[1] in ("cli", "api", "__main__"):
        return "entry" if len(pieces) > 1 else "core"
    return pieces[1] if pieces[1] in PARTS else "core"


def layer(name: str) -> int | None:
    for depth, members in enumerate(SOPPU_LAYERS):
        if name in members:
            return depth
    return None


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_what_its_layer_must_not(path):
    imported = imports(path)
    wrong = sorted(n for n in imported if part(n) in FORBIDDEN[owner(path)])
    assert not wrong, f"{path.relative_to(ROOT)} imports {wrong}"
    if owner(path) == "core":
        name = path.relative_to(PACKAGE).parts[0].removesuffix(".py")  # a module or a package
        if name == "__init__":
            return
        mine = layer(name)
        assert mine is not None, f"soppu/{name} has no layer in SOPPU_LAYERS: give it one"
        upward = sorted(
            n
            for n in imported
            if part(n) == "core" and "." in n and (layer(n.split(".")[1]) or 0) > mine
        )
        assert not upward, f"{path.relative_to(ROOT)} (layer {mine}) imports higher ones {upward}"


def test_nothing_imports_the_entry_points():
    for path in modules():
        if owner(path) != "entry":
            entry = sorted(n for n in imports(path) if part(n) == "entry")
            assert not entry, f"{path.relative_to(ROOT)} imports the entry points {entry}"


def test_soppu_imports_neither_experiments_nor_tests():
    for path in modules():
        outside = sorted(n for n in imports(path) if n.split(".")[0] in ("experiments", "tests"))
        assert not outside, f"{path.relative_to(ROOT)} imports {outside}"


EXPERIMENTS = ROOT / "experiments"


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.py")), ids=lambda p: p.stem)
def test_every_experiment_is_a_module_of_the_experiments_package(path, monkeypatch):
    """`python -m experiments.NAME` from the project root: each imports its peers and the
    shared `experiments.lib` as modules of the package, never through a bare name or sys.path."""
    peers = {p.stem for p in EXPERIMENTS.glob("*.py")} | {"federation", "helpers"}
    bare = sorted(n for n in imports(path) if n.split(".")[0] in peers)
    assert not bare, f"{path.relative_to(ROOT)} imports {bare} by a bare name"
    assert "sys.path" not in path.read_text(), f"{path.relative_to(ROOT)} edits sys.path"
    monkeypatch.syspath_prepend(str(ROOT))
    importlib.import_module(f"experiments.{path.stem}")


def test_every_soppu_module_has_one_layer():
    stems = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__", "api"}
    stems |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")} - {*PARTS, "cli"}
    placed = [name for members in SOPPU_LAYERS for name in members]
    assert sorted(placed) == sorted(set(placed))  # none twice
    assert stems == set(placed), f"unplaced: {stems - set(placed)}; gone: {set(placed) - stems}"


def test_the_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "late.py"
    module.write_text("def f():\n    from soppu.server.publish import publish\n    import soppu\n")
    assert {"soppu.server.publish", "soppu.server.publish.publish", "soppu"} <= imports(module)
    assert part("soppu.server.publish.publish") == "server" and part("soppu.lm") == "core"
    assert part("soppu.cli.common") == "entry" and part("torch") is None


def test_packages_named_like_our_parts_ahead_on_the_path_change_nothing(tmp_path):
    """Python 3.14's standard library has a `compression` package (PEP 784) and other
    distributions install `server` or `clients`: stand-ins that fail on import, put first on
    sys.path, must not be reached by the CLI, the Python API or Flower's apps."""
    import os
    import subprocess
    import sys

    for name in PARTS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the stand-in {name}')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    code = (
        "import sys; assert sys.path[1] == sys.argv[1], sys.path\n"
        "from soppu.compression import CompressionConfig, compress_slot\n"
        "import soppu.api, soppu.server.server_app, soppu.clients.client_app\n"
        "print(CompressionConfig(rank=2).sigma, compress_slot.__module__)\n"
    )
    api = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert api.returncode == 0, api.stderr
    assert api.stdout.split() == ["full", "soppu.compression.compress"]
    cli = subprocess.run(
        [sys.executable, "-m", "soppu", "compress", "--help"], env=env, capture_output=True
    )
    assert cli.returncode == 0, cli.stderr
