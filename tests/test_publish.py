"""Compress → store → publish → PEFT, through real files; failure leaves the last version."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_population, write_users
from safetensors.torch import load_file

from soppu.compression import CompressionConfig
from soppu.server import publish as publish_module
from soppu.server.compress_store import compress_adapters
from soppu.server.compressed_store import CompressedStore, StoreError
from soppu.server.publish import publish, verify_version
from soppu.server.versions import ServingVersion, Versions


@pytest.fixture
def population(tmp_path):
    users = tiny_population(5, k=4, shared=6)
    return users, write_users(tmp_path / "adapters", users, rank=4, alpha=8)


def published_delta(version_dir, user, module):
    config = json.loads((version_dir / "users" / user / "adapter_config.json").read_text())
    state = load_file(version_dir / "users" / user / "adapter_model.safetensors")
    A = state[f"base_model.model.{module}.lora_A.weight"].double()
    B = state[f"base_model.model.{module}.lora_B.weight"].double()
    return config["lora_alpha"] / config["r"] * B @ A, config


def stored_delta(store, manifest, user, module):
    for entry in manifest["slots"]:
        for i, (u, m) in enumerate(entry["items"]):
            if (u, m) == (user, module):
                slot = CompressedStore(store).slot(entry)
                f = slot.form
                return f.Qu.double() @ slot.core(i).double() @ f.Qv.double().T
    raise KeyError((user, module))


def test_rank_covering_the_span_publishes_every_delta_exactly(population, tmp_path):
    users, paths = population
    # 5 users × rank 4 = 20 directions at most per slot: r = 20 is lossless.
    compress_adapters(paths, tmp_path / "store", CompressionConfig(rank=20))
    version = publish(tmp_path / "store", tmp_path / "serving")
    for user, tensors in users.items():
        for module, (A, B) in tensors.items():
            D, config = published_delta(version, user, module)
            assert config["r"] == 8 and config["lora_alpha"] == 8  # smallest safe rank ≥ k
            torch.testing.assert_close(D, (8 / 4) * B.double() @ A.double(), rtol=0, atol=1e-5)
    assert sorted(p.name for p in (version / "users" / "user00").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


@pytest.mark.parametrize("sigma", ["full", "diag"])
def test_peft_loads_a_published_user_with_the_compressed_logits(
    population, tmp_path, tiny_llama, sigma
):
    from peft import PeftModel

    _, paths = population
    compress_adapters(paths, tmp_path / "store", CompressionConfig(rank=6, sigma=sigma))
    version = publish(tmp_path / "store", tmp_path / "serving", export_rank=32)
    manifest = CompressedStore(tmp_path / "store").manifest()
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    base_state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}

    merged = type(tiny_llama)(tiny_llama.config).eval()
    merged.load_state_dict(base_state)
    with torch.no_grad():
        for entry in manifest["slots"]:
            (module,) = {m for _, m in entry["items"]}
            weight = merged.get_submodule(module).weight
            weight += stored_delta(tmp_path / "store", manifest, "user03", module).float()
        expected = merged(tokens).logits

    peft_model = PeftModel.from_pretrained(tiny_llama, version / "users" / "user03").eval()
    with torch.no_grad():
        got = peft_model(tokens).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, type(tiny_llama)(tiny_llama.config).eval()(tokens).logits)


def test_versions_accumulate_and_current_moves(population, tmp_path):
    _, paths = population
    compress_adapters(paths, tmp_path / "store", CompressionConfig(rank=4))
    assert publish(tmp_path / "store", tmp_path / "serving").name == "v0001"
    assert publish(tmp_path / "store", tmp_path / "serving").name == "v0002"
    assert Versions(tmp_path / "serving").names() == ["v0001", "v0002"]
    assert Versions(tmp_path / "serving").current().name == "v0002"
    assert (tmp_path / "serving" / "current").is_symlink()
    manifest = json.loads((tmp_path / "serving" / "current" / "manifest.json").read_text())
    assert manifest["version"] == "v0002" and len(manifest["users"]) == 5
    assert manifest["export_exact"] is True


def test_a_failed_publish_leaves_the_previous_version_and_current(
    population, tmp_path, monkeypatch
):
    _, paths = population
    compress_adapters(paths, tmp_path / "store", CompressionConfig(rank=4))
    publish(tmp_path / "store", tmp_path / "serving")
    before = {
        p.relative_to(tmp_path): p.read_bytes()
        for p in (tmp_path / "serving" / "v0001").rglob("*")
        if p.is_file()
    }
    calls = {"n": 0}
    real_export = publish_module.export_lora

    def failing_export(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # well into the second user
            raise OSError("disk full")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(publish_module, "export_lora", failing_export)
    with pytest.raises(OSError, match="disk full"):
        publish(tmp_path / "store", tmp_path / "serving")
    assert sorted(p.name for p in (tmp_path / "serving").iterdir()) == ["current", "v0001"]
    assert Versions(tmp_path / "serving").current().name == "v0001"
    after = {
        p.relative_to(tmp_path): p.read_bytes()
        for p in (tmp_path / "serving" / "v0001").rglob("*")
        if p.is_file()
    }
    assert after == before


def test_a_corrupt_store_is_refused(population, tmp_path):
    _, paths = population
    compress_adapters(paths, tmp_path / "store", CompressionConfig(rank=4))
    slot_file = next((tmp_path / "store" / "slots").iterdir())
    slot_file.write_bytes(slot_file.read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(StoreError, match=f"{slot_file.name}: checksum mismatch"):
        publish(tmp_path / "store", tmp_path / "serving")
    assert not (tmp_path / "serving").exists() or not any((tmp_path / "serving").iterdir())
    with pytest.raises(StoreError, match=r"manifest\.json: missing"):
        publish(tmp_path / "adapters", tmp_path / "serving")


def test_export_rank_must_be_a_safe_serving_rank(population, tmp_path):
    _, paths = population
    compress_adapters(paths, tmp_path / "store", CompressionConfig(rank=4))
    with pytest.raises(ValueError, match="export rank 12 is not one of"):
        publish(tmp_path / "store", tmp_path / "serving", export_rank=12)


def test_a_failed_compression_leaves_nothing_behind(population, tmp_path):
    users, paths = population
    compress_adapters(paths, tmp_path / "store", CompressionConfig(rank=4))
    before = (tmp_path / "store" / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError):
        compress_adapters(paths, tmp_path / "store", CompressionConfig(rank=8))
    _A, B = users["user01"]["model.layers.0.self_attn.q_proj"]
    B[0, 0] = float("inf")
    write_users(tmp_path / "adapters", {"user01": users["user01"]}, rank=4, alpha=8, replace=True)
    from soppu.adapters import AdapterError

    with pytest.raises(AdapterError, match="non-finite"):
        compress_adapters(paths, tmp_path / "store", CompressionConfig(rank=8), replace=True)
    assert (tmp_path / "store" / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters", "store"]


def test_shape_grouping_shares_one_basis_per_shape(population, tmp_path):
    _, paths = population
    manifest = compress_adapters(
        paths, tmp_path / "store", CompressionConfig(rank=8, group="shape")
    )
    assert [s["name"] for s in manifest["slots"]] == ["shape-32x64", "shape-64x64"]
    assert all(len(s["items"]) == 10 for s in manifest["slots"])  # 5 users × 2 layers
    version = publish(tmp_path / "store", tmp_path / "serving")
    module = "model.layers.1.self_attn.v_proj"
    D, _ = published_delta(version, "user02", module)
    torch.testing.assert_close(
        D, stored_delta(tmp_path / "store", manifest, "user02", module), rtol=0, atol=1e-5
    )


def test_mixed_ranks_and_rslora_publish_losslessly(tmp_path):
    users = tiny_population(6, k=4)
    low = {u: {m: (A[:2], B[:, :2]) for m, (A, B) in t.items()} for u, t in list(users.items())[:3]}
    high = dict(list(users.items())[3:])
    paths = write_users(tmp_path / "a", low, rank=2, alpha=4)  # scale 4/2
    paths |= write_users(tmp_path / "b", high, rank=4, alpha=4, use_rslora=True)  # 4/√4
    manifest = compress_adapters(paths, tmp_path / "store", CompressionConfig(rank=24))
    assert {s["core_form"] for s in manifest["slots"]} == {"factored"}  # 2·4·24 < 24²
    version = publish(tmp_path / "store", tmp_path / "serving")
    for user, tensors in (low | high).items():
        for module, (A, B) in tensors.items():
            D, _ = published_delta(version, user, module)
            torch.testing.assert_close(D, 2.0 * B.double() @ A.double(), rtol=0, atol=1e-5)


def test_every_layer_of_the_base_model_carries_every_target_module(tmp_path, tiny_llama):
    """LoRAX drops a module type for the whole adapter when one layer lacks it: a LoRA on
    layer 1 only is published with zero factors on layer 0, and PEFT's logits do not move."""
    from peft import PeftModel

    users = tiny_population(3, k=4, layers=2, shared=6)
    only_layer_1 = {
        user: {m: t for m, t in tensors.items() if ".layers.1." in m}
        for user, tensors in users.items()
    }
    # Configured as a client writes it: a layer selection PEFT needs both keys for.
    paths = write_users(
        tmp_path / "adapters",
        only_layer_1,
        rank=4,
        alpha=8,
        layers_to_transform=[1],
        layers_pattern="layers",
    )
    compress_adapters(paths, tmp_path / "store", CompressionConfig(rank=12))
    version = publish(tmp_path / "store", tmp_path / "serving", num_layers=2)
    user_dir = version / "users" / "user01"
    state = load_file(user_dir / "adapter_model.safetensors")
    config = json.loads((user_dir / "adapter_config.json").read_text())
    assert config["layers_to_transform"] is None and config["layers_pattern"] is None
    for layer in (0, 1):
        for name in ("q_proj", "v_proj"):
            for factor in ("A", "B"):
                key = f"base_model.model.model.layers.{layer}.self_attn.{name}.lora_{factor}.weight"
                assert (state[key].abs().sum() == 0) == (layer == 0), key
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    merged = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    for module, (A, B) in only_layer_1["user01"].items():
        merged[f"{module}.weight"] += (8 / 4) * B @ A
    with torch.no_grad():
        expected = tiny_llama.__class__(tiny_llama.config)
        expected.load_state_dict(merged)
        want = expected.eval()(input_ids=tokens).logits
        got = PeftModel.from_pretrained(tiny_llama, user_dir).eval()(input_ids=tokens).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_a_serving_version_is_read_through_its_one_owner(population, tmp_path):
    users, paths = population
    compress_adapters(paths, tmp_path / "store", CompressionConfig(rank=4))
    version = ServingVersion(publish(tmp_path / "store", tmp_path / "serving"))
    assert version.users() == sorted(users) and version.base_model
    listed = sorted(path for path, _ in version.checksums())
    on_disk = sorted(p for user in users for p in version.user_dir(user).iterdir())
    assert listed == on_disk  # every published file has its checksum, and no other
    assert verify_version(version.root) == version.manifest
    version.manifest_path.write_text("{not json")
    with pytest.raises(StoreError, match=r"manifest.json: not a version manifest"):
        ServingVersion(version.root).users()
    with pytest.raises(StoreError, match="missing"):
        ServingVersion(tmp_path / "serving").users()  # the serving dir is not a version
