"""The documentation stays true: the site builds strictly, its Python examples run, and the
README keeps its promises (short, the two commands near the top, links that resolve)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_docs_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "python-api" / "index.html").is_file()
    # the settings reference is generated from the config: every flag with its key and field
    from soppu.server.config import FIELDS, flag

    page = (
        (tmp_path / "cli" / "index.html").read_text().rsplit("Every setting of a federation", 1)[1]
    )
    assert "settings-reference" not in page
    for key, field in FIELDS.items():
        row = re.search(rf"<td><code>{re.escape(flag(key))}</code></td>.*?</tr>", page, re.S)
        assert row and f"<code>{key.replace('_', '-')}</code>" in row.group(0), key
        assert f"<code>{field.name}</code>" in row.group(0), key


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


@pytest.mark.parametrize("index", range(len(python_blocks(ROOT / "docs" / "python-api.md"))))
def test_python_api_examples_run(index, capsys):
    block = python_blocks(ROOT / "docs" / "python-api.md")[index]
    exec(compile(block, f"docs/python-api.md block {index}", "exec"), {})
    assert capsys.readouterr().out.strip()  # each example shows its results


def test_readme_is_short_with_both_commands_near_the_top():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    top = lines[:40]
    assert ci in top  # CI runs exactly the README's test command
    assert any(
        line.startswith("python3 -m venv .venv") and "soppu simulate" in line for line in top
    )


def test_readme_and_docs_links_resolve():
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
