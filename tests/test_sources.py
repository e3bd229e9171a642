"""Every source of users' text gives the same users as the file it stands for: a file, a
Hugging Face dataset (a local dataset folder, read as `datasets` reads a Hub repository), a
Python function's rows, and a source added by one class and one registration line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
from helpers import GENERATED_USERS, generated_rows, write_users_jsonl

from soppu.data import DataError, DataOptions, load_users
from soppu.sources import PREFIXES, open_source
from soppu.sources.base import DataError as BaseDataError


@pytest.fixture
def from_file(tmp_path):
    return load_users(write_users_jsonl(tmp_path / "rows.jsonl", GENERATED_USERS))


def test_a_function_source_gives_the_users_its_rows_make(from_file):
    users = load_users("py:helpers:generated_rows")
    assert users == from_file  # the same rows → the same users, splits and all
    assert set(users) == {"alice", "bob", "carol"}


def test_a_hub_dataset_folder_gives_the_users_its_train_split_holds(tmp_path, from_file):
    folder = tmp_path / "my-dataset"
    folder.mkdir()
    write_users_jsonl(folder / "train.jsonl", GENERATED_USERS)
    (folder / "test.jsonl").write_text(json.dumps({"user_id": "zed", "text": "x" * 5000}) + "\n")
    assert load_users(f"hf:{folder}") == from_file  # the train split only: no 'zed'


def test_a_new_source_is_one_class_and_one_line(monkeypatch, tmp_path, from_file):
    class TabSeparated:  # `tsv:FILE`: one "user<TAB>text" per line
        prefix: ClassVar[str] = "tsv:"

        def __init__(self, spec: str) -> None:
            self.path, self.label = Path(spec), f"tsv:{spec}"

        def rows(self):
            import datasets

            lines = self.path.read_text().splitlines()
            pairs = [line.split("\t", 1) for line in lines]
            return datasets.Dataset.from_list([{"user_id": u, "text": t} for u, t in pairs])

    monkeypatch.setitem(PREFIXES, TabSeparated.prefix, TabSeparated)  # the registration line
    path = tmp_path / "rows.tsv"
    path.write_text("".join(f"{r['user_id']}\t{r['text']}\n" for r in generated_rows()))
    assert load_users(f"tsv:{path}") == from_file


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("py:no_such_module:rows", r"py:no_such_module:rows: cannot import it"),
        ("py:helpers:no_such_function", r"py:helpers:no_such_function: cannot import it"),
        ("py:rows", r"py:rows: give py:MODULE:FUNCTION"),
        ("py:helpers:not_rows", r"py:helpers:not_rows: row 1 is not a mapping"),
        ("hf:", r"hf: needs a dataset name"),
        ("hf:/no/such/dataset", r"hf:/no/such/dataset: cannot load its train split"),
        ("nowhere.jsonl", r"nowhere.jsonl: no such data file"),
        ("notes.txt", r"notes.txt: no such data file"),
    ],
)
def test_a_source_that_cannot_be_read_is_one_line_naming_it(data, message):
    with pytest.raises(DataError, match=message) as caught:
        load_users(data)
    assert "\n" not in str(caught.value)


def test_columns_are_checked_whatever_the_source(from_file):
    with pytest.raises(DataError, match=r"py:helpers:generated_rows: missing column\(s\) who"):
        load_users("py:helpers:generated_rows", DataOptions(user_column="who"))
    assert BaseDataError is DataError  # one error type, wherever it is raised
    assert open_source("py:helpers:generated_rows").label == "py:helpers:generated_rows"


def test_a_real_node_runs_a_function_source_only_from_its_own_config():
    """A server's Setup naming `py:MODULE:FUNCTION` does not make a real node (one with its own
    `user-id`) import and call code; the node's own `data=` may; a simulated node reads what
    its own server names."""
    from soppu import messages
    from soppu.clients import task

    setup = messages.Setup("py:helpers:generated_rows", DataOptions(), ("alice",), "tiny")
    with pytest.raises(DataError, match="runs code: name it in this node's own config"):
        task.my_text({"user-id": "alice"}, setup)
    own = {"user-id": "alice", "data": "py:helpers:generated_rows"}
    assert task.my_text(own, setup).user_id == "alice"
    assert task.my_text({"partition-id": 0}, setup).user_id == "alice"
