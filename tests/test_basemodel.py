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


def test_a_default_prepared_by_another_transformers_is_prepared_again(tmp_path, monkeypatch):
    """A folder prepared under transformers 5 names `TokenizersBackend`, which 4.x lacks: it
    does not count as prepared there (so `prepare_default_model` makes it again), and one
    naming a class this transformers has does."""
    monkeypatch.setenv("SOPPU_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "models" / basemodel._MODEL_DIR
    folder.mkdir(parents=True)
    (folder / "soppu_prepared.json").write_text(json.dumps({"weights_sha256": "ab" * 32}))
    (folder / "config.json").write_text("{}")
    for name, readable in (("PreTrainedTokenizerFast", True), ("NoSuchTokenizerClass", False)):
        (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": name}))
        found = basemodel.local_weights(None)
        assert (found is not None) == readable, name
    (folder / "tokenizer_config.json").write_text("not json")
    assert basemodel.local_weights(None) is None
