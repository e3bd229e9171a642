"""New users into a store without a refit: old users' bytes untouched, the new users' cores
optimal on the old bases, the drift flag raised by a user unlike the others, refits where it
is, and bad additions refused before anything is written."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from helpers import tiny_population, write_users
from safetensors.torch import load_file
from typer.testing import CliRunner

from soppu.adapters import AdapterError
from soppu.cli import app
from soppu.compression import CompressionConfig
from soppu.compression.storage import SlotStorage
from soppu.server.add_users import add_adapters
from soppu.server.compress_store import compress_adapters
from soppu.server.compressed_store import CompressedStore


def _digest(folder):
    return {
        p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _delta(store, user, module):
    manifest = CompressedStore(store).manifest()
    for entry in manifest["slots"]:
        for i, (u, m) in enumerate(entry["items"]):
            if (u, m) == (user, module):
                slot = CompressedStore(store).slot(entry)
                return slot.form.Qu.double() @ slot.core(i).double() @ slot.form.Qv.double().T
    raise KeyError((user, module))


# by storage bits: the error a core on the stored bases may add to the projection of D, and
# the drift of users who lie in the old span (4-bit bases' rounding leaves a little of their
# energy outside the stored span, well under the refit threshold's default 0.2)
CODE_ERROR = {32: 0.02, 8: 0.02, 4: 0.2}
SPAN_DRIFT = {32: 0.05, 8: 0.05, 4: 0.1}


@pytest.fixture(params=[32, 8, 4], ids=["float", "8-bit", "4-bit"])
def stored(tmp_path, request):
    """6 users sharing 6-dim subspaces per slot, compressed at rank 6 (their span)."""
    population = tiny_population(8, k=4, layers=2, shared=6)
    old = {u: population[u] for u in list(population)[:6]}
    new = {u: population[u] for u in list(population)[6:]}
    paths = write_users(tmp_path / "old", old, rank=4, alpha=8)
    compress_adapters(paths, tmp_path / "store", CompressionConfig(rank=6, bits=request.param))
    return tmp_path, old, new, write_users(tmp_path / "new", new, rank=4, alpha=8), request.param


def test_new_users_get_optimal_cores_and_old_users_keep_their_bytes(stored):
    tmp_path, old, new, new_paths, bits = stored
    before = _digest(tmp_path / "store")
    manifest = add_adapters(tmp_path / "store", new_paths, tmp_path / "grown")
    assert _digest(tmp_path / "store") == before  # the input store is never touched
    assert manifest["users"] == sorted([*old, *new])
    assert manifest["added"]["users"] == sorted(new) and manifest["added"]["refit_slots"] == []
    old_slot = _stored(tmp_path / "store", CompressedStore(tmp_path / "store").manifest())
    grown = _stored(tmp_path / "grown", manifest)
    for name, tensor in old_slot.items():  # bases identical, old rows' codes identical
        assert torch.equal(grown[name][: tensor.shape[0]], tensor) or name.startswith(("U", "V"))
        if name.startswith(("U", "V")):
            assert torch.equal(grown[name], tensor)
    report = json.loads((tmp_path / "grown" / "report" / "report.json").read_text())
    for user, tensors in new.items():  # the new users lie (nearly) in the old span
        for module, (A, B) in tensors.items():
            D = (8 / 4) * B.double() @ A.double()
            rebuilt = _delta(tmp_path / "grown", user, module)
            # the best a core on these bases can do: the projection of D
            Qu = CompressedStore(tmp_path / "grown").slot(_entry(manifest, module)).form.Qu.double()
            Qv = CompressedStore(tmp_path / "grown").slot(_entry(manifest, module)).form.Qv.double()
            best = Qu @ (Qu.T @ D @ Qv) @ Qv.T
            assert float((rebuilt - best).norm() / D.norm()) < CODE_ERROR[bits]  # codes only
    errors = {(i["user"], i["module"]): i["error"] for i in report["items"]}
    old_report = json.loads((tmp_path / "store" / "report" / "report.json").read_text())
    for item in old_report["items"]:  # old users' numbers are what they were
        assert errors[item["user"], item["module"]] == item["error"]
    assert all(0 <= s["drift"] < SPAN_DRIFT[bits] for s in report["slots"])


def _stored(store, manifest):
    """The first slot's tensors as stored: floats, or codes (4-bit ones inflated) and scales."""
    entry = manifest["slots"][0]
    storage = SlotStorage.from_file(
        entry["core_form"],
        entry.get("bits", 32),
        load_file(store / entry["file"]),
        entry.get("shapes", {}),
        entry.get("codec", "raw"),
    )
    coded = {f"{k}.codes": q.codes for k, q in storage.quantized.items()}
    return storage.floats | coded | {f"{k}.scales": q.scales for k, q in storage.quantized.items()}


def _entry(manifest, module):
    return next(e for e in manifest["slots"] if any(m == module for _, m in e["items"]))


def test_a_user_unlike_the_others_raises_the_drift_flag_and_refits_that_slot(stored):
    tmp_path, old, _new, _, _ = stored
    gen = torch.Generator().manual_seed(99)
    stranger = {
        module: (
            torch.randn(4, A.shape[1], generator=gen),
            torch.randn(B.shape[0], 4, generator=gen),
        )
        for module, (A, B) in next(iter(old.values())).items()
    }
    paths = write_users(tmp_path / "stranger", {"stranger": stranger}, rank=4, alpha=8)
    flagged = add_adapters(tmp_path / "store", paths, tmp_path / "flagged")
    assert flagged["added"]["drift_max"] > 0.5 and flagged["added"]["refit_slots"] == []
    refit = add_adapters(tmp_path / "store", paths, tmp_path / "refit", refit_above=0.3)
    assert sorted(refit["added"]["refit_slots"]) == sorted(s["name"] for s in refit["slots"])
    before = {
        i["user"]: i["error"] for i in _items(tmp_path / "flagged") if i["user"] == "stranger"
    }
    after = {i["user"]: i["error"] for i in _items(tmp_path / "refit") if i["user"] == "stranger"}
    assert after["stranger"] < before["stranger"]


def _items(store):
    return json.loads((store / "report" / "report.json").read_text())["items"]


def test_bad_additions_are_refused_by_name_before_anything_is_written(stored):
    tmp_path, old, new, _new_paths, _ = stored
    again = write_users(tmp_path / "again", {"user00": old["user00"]}, rank=4, alpha=8)
    with pytest.raises(AdapterError, match="already holds user00"):
        add_adapters(tmp_path / "store", again, tmp_path / "out")
    other = write_users(tmp_path / "other", new, rank=4, alpha=8, base_model="another-model")
    with pytest.raises(AdapterError, match="base model another-model"):
        add_adapters(tmp_path / "store", other, tmp_path / "out")
    fewer = {u: dict(list(t.items())[:2]) for u, t in new.items()}
    with pytest.raises(AdapterError, match="modules differ"):
        add_adapters(
            tmp_path / "store",
            write_users(tmp_path / "f", fewer, rank=4, alpha=8),
            tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()


def test_cli_add_reports_errors_and_drift(stored):
    tmp_path, _old, _new, _, _ = stored
    result = CliRunner().invoke(
        app, ["add", str(tmp_path / "store"), str(tmp_path / "new"), "--out", str(tmp_path / "cli")]
    )
    assert result.exit_code == 0, result.output
    assert "added 2 users" in result.output and "no slot refit" in result.output
    assert "Per-layer reconstruction error" in result.output


def test_factored_cores_take_new_users_of_a_smaller_rank_and_refuse_a_larger_one(tmp_path):
    """Cores stored as r×k · k×r factors: a rank-1 newcomer is zero-padded to k = 2 and
    rebuilt exactly (it lies in the span); a rank-4 one cannot fit k = 2 and is refused."""
    population = tiny_population(5, k=2, layers=1, shared=12)
    old = {u: population[u] for u in list(population)[:4]}
    paths = write_users(tmp_path / "old", old, rank=2, alpha=2)
    compress_adapters(paths, tmp_path / "store", CompressionConfig(rank=12))
    assert {s["core_form"] for s in CompressedStore(tmp_path / "store").manifest()["slots"]} == {
        "factored"
    }
    # the new user: one direction of an old user's delta, so the bases hold it exactly
    first = next(iter(old.values()))
    small = {m: (A[:1], B[:, :1]) for m, (A, B) in first.items()}
    new_paths = write_users(tmp_path / "new", {"zz-small": small}, rank=1, alpha=1)
    add_adapters(tmp_path / "store", new_paths, tmp_path / "grown")
    for module, (A, B) in small.items():
        D = B.double() @ A.double()
        rebuilt = _delta(tmp_path / "grown", "zz-small", module)
        assert float((rebuilt - D).norm() / D.norm()) < 1e-5
    big = tiny_population(1, k=4, layers=1, seed=9)
    big_paths = write_users(tmp_path / "big", {"zz-big": next(iter(big.values()))}, rank=4, alpha=4)
    with pytest.raises(AdapterError, match="above the rank the store's core factors hold"):
        add_adapters(tmp_path / "store", big_paths, tmp_path / "grown-big")
    assert not (tmp_path / "grown-big").exists()
