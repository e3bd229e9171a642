"""Per-user text: Shakespeare parsing, reading users' own files with flwr-datasets, the split
by position, and clear refusals of bad data."""

from __future__ import annotations

import json

import pytest
from helpers import write_users_jsonl

from soppu.data import DataError, DataOptions, load_users, parse_play, pick_user, split_by_position

PLAY = """# Hamlet

## ACT I

### SCENE I. Elsinore.

_Enter BERNARDO and FRANCISCO_

**BERNARDO**{br}
Who's there?

**FRANCISCO**{br}
Nay, answer me: stand,{br}
and unfold yourself.

_Exit_

Long live the king!

**MARCELLUS & BERNARDO**{br}
Longer, longer.

**LADY MACBETH**{br}
Out, damned spot!
""".replace("{br}", "  ")  # Markdown line breaks, as in the plays


def test_parse_play_keys_users_by_play_and_role():
    speeches, public = parse_play(PLAY, "hamlet")
    assert speeches == [
        ("hamlet.BERNARDO", "Who's there?"),
        ("hamlet.FRANCISCO", "Nay, answer me: stand,\nand unfold yourself.\nLong live the king!"),
        ("hamlet.LADY_MACBETH", "Out, damned spot!"),
    ]
    assert public == ["Enter BERNARDO and FRANCISCO", "Exit", "Longer, longer."]


def test_split_holds_out_the_last_part_at_a_line_break():
    text = "\n".join(f"line {i:02d} of what the user said" for i in range(10))
    user = split_by_position("u", text, 0.2)
    # The cut falls at the last line break before 80%: lines 7-9 are held out.
    assert user.train.endswith("line 06 of what the user said")
    assert user.test.startswith("line 07") and user.test.endswith("line 09 of what the user said")
    assert user.train + "\n" + user.test == text


def test_validation_sits_between_train_and_test_and_is_in_neither():
    text = "\n".join(f"line {i:02d} of what the user said" for i in range(20))
    user = split_by_position("u", text, 0.2, 0.1)
    # Each cut falls at the last line break before its share (599 chars: 80% is 479, the
    # end of line 15; 70% is 419, the end of line 13): test is 15–19, validation 13–14.
    assert user.train.endswith("line 12 of what the user said")
    assert user.validation == "line 13 of what the user said\nline 14 of what the user said"
    assert user.test.startswith("line 15")
    assert "\n".join([user.train, user.validation, user.test]) == text
    with pytest.raises(DataError, match=r"validation fraction 0\.8"):
        split_by_position("u", text, 0.2, 0.8)


def test_reads_users_from_jsonl_csv_and_parquet(tmp_path):
    import pandas as pd

    source = write_users_jsonl(tmp_path / "u.jsonl", {"alice": 3000, "bob": 2000, "tiny": 200})
    frame = pd.read_json(source, lines=True)
    frame.rename(columns={"user_id": "who", "text": "said"}).to_csv(tmp_path / "u.csv", index=False)
    frame.to_parquet(tmp_path / "u.parquet")
    expected = {"alice", "bob"}  # tiny is under min_chars
    by_json = load_users(source)
    assert set(by_json) == expected
    assert by_json["alice"].chars >= 2900 and len(by_json["alice"].test) < len(
        by_json["alice"].train
    )
    csv = load_users(tmp_path / "u.csv", DataOptions(user_column="who", text_column="said"))
    assert {u: v.chars for u, v in csv.items()} == {u: v.chars for u, v in by_json.items()}
    assert set(load_users(tmp_path / "u.parquet")) == expected
    assert set(load_users(source, DataOptions(min_chars=100))) == expected | {"tiny"}


def test_iid_partitioner_makes_users_from_unlabelled_text(tmp_path):
    source = write_users_jsonl(tmp_path / "u.jsonl", {"a": 4000, "b": 4000})
    users = load_users(source, DataOptions(partitioner="iid", num_users=4, min_chars=500))
    assert list(users) == ["user-0000", "user-0001", "user-0002", "user-0003"]
    with pytest.raises(DataError, match="needs --num-users"):
        load_users(source, DataOptions(partitioner="iid"))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"user": "a", "text": "x"}], r"missing column\(s\) user_id \(it has user, text\)"),
        ([{"user_id": "a", "text": "x"}, {"user_id": "", "text": "y"}], "row 2 has an empty"),
        ([{"user_id": "../etc", "text": "x" * 2000}], r"row 1\).* is a path"),
        ([{"user_id": "a", "text": "short"}], "no user has at least 1000 characters"),
    ],
)
def test_bad_rows_are_refused_naming_the_file(tmp_path, rows, message):
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message) as error:
        load_users(path)
    assert str(path) in str(error.value)


def test_unreadable_and_missing_files_are_refused(tmp_path):
    garbage = tmp_path / "users.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="cannot read it as parquet"):
        load_users(garbage)
    with pytest.raises(DataError, match="no such data file"):
        load_users(tmp_path / "missing.jsonl")
    (tmp_path / "users.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown format"):
        load_users(tmp_path / "users.txt")


def test_unknown_user_gets_close_matches(tmp_path):
    users = load_users(write_users_jsonl(tmp_path / "u.jsonl", {"hamlet.HAMLET": 2000}))
    with pytest.raises(DataError, match=r"did you mean hamlet\.HAMLET"):
        pick_user(users, "hamlet.HAMLE", "u.jsonl")
