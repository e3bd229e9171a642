"""Quantised storage: codes round-trip within half a step, 8-bit stores are ≥ 3.5× smaller at
a small error cost, and what is stored is exactly what publishing and serving read back."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import random_factors, tiny_population, write_users

from soppu.compression import CompressionConfig, compress_slot
from soppu.compression.storage import Quantized, dequantize, quantize
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
    if bits == 4:  # two codes a byte on disk
        packed = q.packed()
        assert packed.dtype == torch.uint8 and packed.numel() == (x.numel() + 1) // 2
        again = Quantized.unpacked(packed, q.scales, 4, tuple(x.shape))
        assert torch.equal(again.codes, q.codes)


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
