"""The layering the docs draw, kept true: a test that fails when a module imports one its layer
must not (at the top of the file or inside a function alike).

    compression/   pure tensors: imports no project package
    soppu/         shared by every side: imports neither server/ nor clients/ (its entry
                   points, cli/ and api.py, may)
    clients/       the Flower ClientApp: imports soppu/ only
    server/        the Flower ServerApp and what runs on the server: never clients/

and inside soppu/, lower layers never import higher ones (an adapter file does not need the
emulator, nor a user's text the base model).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("compression", "soppu", "clients", "server")
FORBIDDEN = {
    "compression": {"soppu", "clients", "server"},
    "soppu": {"clients", "server", "compression"},
    "clients": {"server", "compression"},
    "server": {"clients"},
    "soppu.cli": set(),
}
SOPPU_LAYERS = [
    {"errors"},
    {"userids", "atomic", "precision", "train_config", "fetch", "tensor_file", "cache"},
    {"adapters", "adapter_sets", "data", "lm", "synthetic"},
    {"basemodel", "emulator", "alignment", "generated", "public", "personalize", "messages"},
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
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


ENTRY_POINTS = (("soppu", "cli"), ("soppu", "api.py"), ("soppu", "__main__.py"))  # on top


def owner(path: Path) -> str:
    parts = path.relative_to(ROOT).parts
    return "soppu.cli" if parts[:2] in ENTRY_POINTS else parts[0]


def layer(name: str) -> int | None:
    for depth, members in enumerate(SOPPU_LAYERS):
        if name in members:
            return depth
    return None


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_what_its_layer_must_not(path):
    imported = imports(path)
    wrong = sorted(n for n in imported if n.split(".")[0] in FORBIDDEN[owner(path)])
    assert not wrong, f"{path.relative_to(ROOT)} imports {wrong}"
    if owner(path) == "soppu" and path.parent.name == "soppu":
        mine = layer(path.stem)
        if path.stem in ("__init__", "__main__"):
            return
        assert mine is not None, f"soppu/{path.name} has no layer in SOPPU_LAYERS: give it one"
        upward = sorted(
            n for n in imported if n.startswith("soppu.") and (layer(n.split(".")[1]) or 0) > mine
        )
        assert not upward, f"soppu/{path.name} (layer {mine}) imports higher layers {upward}"


def test_nothing_imports_the_entry_points():
    for path in modules():
        if owner(path) != "soppu.cli":
            entry = sorted(n for n in imports(path) if n.startswith(("soppu.cli", "soppu.api")))
            assert not entry, f"{path.relative_to(ROOT)} imports the entry points {entry}"


def test_every_soppu_module_has_one_layer():
    stems = {p.stem for p in (ROOT / "soppu").glob("*.py")} - {"__init__", "__main__", "api"}
    placed = [name for members in SOPPU_LAYERS for name in members]
    assert sorted(placed) == sorted(set(placed))  # none twice
    assert stems == set(placed), f"unplaced: {stems - set(placed)}; gone: {set(placed) - stems}"


def test_the_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "late.py"
    module.write_text("def f():\n    from server.publish import publish\n    import clients\n")
    assert {"server.publish", "server.publish.publish", "clients"} <= imports(module)
