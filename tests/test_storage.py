"""Quantised storage: codes round-trip within half a step, 8-bit stores are ≥ 3.5× smaller at
a small error cost, and what is stored is exactly what publishing and serving read back."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import random_factors, tiny_population, write_users

from soppu.compression import CompressionConfig, compress_slot
from soppu.compression.storage import Quantized, _pack4, dequantize, quantize
from soppu.server.compress_store import compress_adapters
from soppu.server.compressed_store import CompressedStore
from soppu.server.publish import publish
from soppu.server.serving.shared_weights import load_shared


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(7, 5), (3, 9, 4), (2, 5, 11)])
def test_codes_round_trip_within_half_a_step(bits, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3
    x[0] = 0.0  # an all-zero slice is coded exactly
    axis = 1 if len(shape) == 3 else 0
    q = quantize(x, bits, axis)
    back = dequantize(q)
    step = q.scales.float()
    assert back.shape == x.shape and q.scales.dtype == torch.float16
    assert bool(((back - x).abs() <= step / 2 + 1e-6 * step).all())
    assert bool((back[0] == 0).all())
    if bits == 4:  # two codes a byte, then deflated (never more than a few bytes longer)
        written = q.packed()
        assert written.dtype == torch.uint8 and written.numel() <= (x.numel() + 1) // 2 + 11
        assert q.nbytes == written.numel() + 2 * q.scales.numel()
        again = Quantized.unpacked(written, q.scales, 4, tuple(x.shape), "deflate")
        assert torch.equal(again.codes, q.codes)
        raw = Quantized.unpacked(_pack4(q.codes), q.scales, 4, tuple(x.shape), "raw")
        assert torch.equal(raw.codes, q.codes)  # format 1's raw pairs still read


def test_deflated_four_bit_codes_are_about_a_fifth_smaller_and_read_back_exactly():
    x = torch.randn(576, 24, generator=torch.Generator().manual_seed(1))  # a basis' columns
    q = quantize(x, 4, 0)
    raw = (x.numel() + 1) // 2
    assert 0.70 * raw < q.packed().numel() < 0.85 * raw  # ≈ 3.1 bits a Gaussian code
    back = Quantized.unpacked(q.packed(), q.scales, 4, tuple(x.shape), "deflate")
    assert torch.equal(back.codes, q.codes)


def test_corrupt_or_overlong_four_bit_codes_are_refused():
    q = quantize(torch.randn(64, 8, generator=torch.Generator().manual_seed(2)), 4, 0)
    shape = (64, 8)
    flipped = q.packed().clone()
    flipped[len(flipped) // 2] ^= 0xFF
    longer = quantize(torch.randn(128, 8), 4, 0).packed()  # inflates past the shape's need
    for codes, says in [
        (flipped, "inflate"),
        (longer, "inflate"),
        (q.packed()[:-3], "inflate"),
        (_pack4(q.codes)[:-1], "bytes of 4-bit codes"),
    ]:
        codec = "raw" if says.startswith("bytes") else "deflate"
        with pytest.raises(ValueError, match=says):
            Quantized.unpacked(codes, q.scales, 4, shape, codec)
    with pytest.raises(ValueError, match="codec"):
        Quantized.unpacked(q.packed(), q.scales, 4, shape, "lz4")
    eight = quantize(torch.randn(64, 8), 8, 0)
    with pytest.raises(ValueError, match="8-bit codes are stored raw"):
        Quantized.unpacked(eight.packed(), eight.scales, 8, shape, "deflate")


def test_eight_bit_storage_is_smaller_at_little_error_and_reads_back_exactly():
    items = random_factors(40, 256, 192, 8, seed=3, shared=24)
    items += random_factors(10, 256, 192, 8, seed=4)
    plain = compress_slot(items, CompressionConfig(rank=32))
    eight = compress_slot(items, CompressionConfig(rank=32, bits=8))
    four = compress_slot(items, CompressionConfig(rank=32, bits=4))
    assert plain.bytes_after() >= 3.5 * eight.bytes_after()
    assert plain.bytes_after() >= 6.5 * four.bytes_after()
    assert float(eight.errors.mean()) <= float(plain.errors.mean()) + 0.01
    assert float(four.errors.mean()) > float(eight.errors.mean())  # coarser codes cost more
    torch.testing.assert_close(eight.sq_errors_float, plain.sq_errors, rtol=1e-6, atol=0)
    # The errors are those of what is stored: recompute them densely from the read-back form.
    for i in (0, 45):
        D = items[i].delta()
        dense = float((D - eight.reconstruct(i)).norm() / D.norm())
        assert dense == pytest.approx(float(eight.errors[i]), rel=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantised_store_publishes_and_serves_what_it_stores(tmp_path, bits):
    from helpers import tiny_causal_lm
    from peft import PeftModel

    paths = write_users(tmp_path / "adapters", tiny_population(5, k=4, layers=2), rank=4, alpha=8)
    manifest = compress_adapters(paths, tmp_path / "store", CompressionConfig(rank=12, bits=bits))
    report = json.loads((tmp_path / "store" / "report" / "report.json").read_text())
    assert (
        report["totals"]["bits"] == bits
        and report["totals"]["float_mean"] <= manifest["totals"]["mean"]
    )
    assert report["totals"]["bytes_after"] < report["totals"]["params_after"] * 4 / 2
    version = publish(tmp_path / "store", tmp_path / "serving")
    shared = load_shared(version)
    store_manifest = CompressedStore(tmp_path / "store").manifest()
    model = tiny_causal_lm(layers=2)
    ids = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(0))
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    for entry in store_manifest["slots"]:
        slot = CompressedStore(tmp_path / "store").slot(entry)
        for i, (user, module) in enumerate(entry["items"]):
            stored = slot.form.Qu @ slot.core(i) @ slot.form.Qv.T
            served = shared.slots[module]
            row = shared.users[user]
            c = served.cluster[row]
            torch.testing.assert_close(served.U[c] @ served.cores[row] @ served.V[c].T, stored)
            if user == "user02":
                merged[f"{module}.weight"] += stored
    with torch.no_grad():
        want = model.__class__(model.config)
        want.load_state_dict(merged)
        expected = want.eval()(input_ids=ids).logits
        got = PeftModel.from_pretrained(model, version / "users" / "user02")(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_a_format_one_store_with_raw_codes_reads_the_same_and_grows_into_format_two(tmp_path):
    """Stores written before 4-bit codes were deflated still read, serve and take new users."""
    from safetensors.torch import load_file, save_file

    from soppu.atomic import sha256
    from soppu.server.add_users import add_adapters

    users = tiny_population(6, k=4, layers=2)
    paths = write_users(tmp_path / "adapters", users, rank=4, alpha=8)
    old, new = dict(list(paths.items())[:5]), dict(list(paths.items())[5:])
    compress_adapters(old, tmp_path / "store", CompressionConfig(rank=12, bits=4))
    store = CompressedStore(tmp_path / "store")
    manifest = store.manifest()
    assert manifest["format"] == "soppu-compressed/2"
    assert {entry["codec"] for entry in manifest["slots"]} == {"deflate"}
    before = {e["name"]: store.slot(e).reader.all_cores() for e in manifest["slots"]}
    for entry in manifest["slots"]:  # rewrite it as format 1 wrote it: raw pairs, no codec
        path = tmp_path / "store" / entry["file"]
        tensors = load_file(path)
        for name, shape in entry["shapes"].items():
            coded = Quantized.unpacked(
                tensors[f"{name}.codes"], tensors[f"{name}.scales"], 4, tuple(shape), "deflate"
            )
            tensors[f"{name}.codes"] = _pack4(coded.codes)
        save_file(tensors, path)
        del entry["codec"]
        entry["sha256"] = sha256(path)
    (tmp_path / "store" / "manifest.json").write_text(
        json.dumps({**manifest, "format": "soppu-compressed/1"})
    )
    store.verified()
    for entry in store.manifest()["slots"]:
        assert torch.equal(store.slot(entry).reader.all_cores(), before[entry["name"]])
    grown = add_adapters(tmp_path / "store", new, tmp_path / "grown")
    assert grown["format"] == "soppu-compressed/2"
    assert {entry["codec"] for entry in grown["slots"]} == {"deflate"}
    again = CompressedStore(tmp_path / "grown")
    for entry in grown["slots"]:  # the old users' cores exactly as they were
        cores = again.slot(entry).reader.all_cores()
        torch.testing.assert_close(cores[:5], before[entry["name"]], rtol=0, atol=0)
    written = sum(  # the ratio counts the bytes as written
        t.numel() * t.element_size()
        for entry in grown["slots"]
        for t in load_file(tmp_path / "grown" / entry["file"]).values()
    )
    assert grown["totals"]["bytes_after"] == written


def test_four_bit_cores_that_do_not_inflate_are_refused_naming_the_file(tmp_path):
    """A slot file whose checksum matches (written so) but whose cores' codes are cut short:
    the bases read, and the first core read says which file is bad."""
    from safetensors.torch import load_file, save_file

    from soppu.atomic import sha256
    from soppu.server.compressed_store import StoreError

    paths = write_users(tmp_path / "adapters", tiny_population(4, k=4, layers=1), rank=4, alpha=8)
    compress_adapters(paths, tmp_path / "store", CompressionConfig(rank=6, bits=4))
    store = CompressedStore(tmp_path / "store")
    manifest = store.manifest()
    entry = manifest["slots"][0]
    path = tmp_path / "store" / entry["file"]
    tensors = load_file(path)
    name = next(k for k in tensors if k.startswith("core") and k.endswith(".codes"))
    tensors[name] = tensors[name][:-4].clone()
    save_file(tensors, path)
    entry["sha256"] = sha256(path)
    (tmp_path / "store" / "manifest.json").write_text(json.dumps(manifest))
    slot = store.slot(store.verified()["slots"][0])
    with pytest.raises(StoreError, match=f"{path}: cannot read item 0's core .*inflate"):
        slot.core(0)
