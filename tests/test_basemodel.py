"""Where the base weights adapters were trained on lie, found without preparing anything."""

from __future__ import annotations

import json

from soppu import basemodel


def test_local_weights_finds_a_folder_or_the_prepared_default_and_never_prepares(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("SOPPU_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    assert basemodel.local_weights(str(folder)) == (folder.resolve(), None)
    (folder / "soppu_prepared.json").write_text(json.dumps({"weights_sha256": "ab" * 32}))
    assert basemodel.local_weights(folder) == (folder.resolve(), "ab" * 32)
    assert basemodel.local_weights("someone/not-here") is None
    assert basemodel.local_weights(None) is None  # the default, not prepared in this cache
    assert not (tmp_path / "cache").exists()  # nothing fetched or prepared to find out
