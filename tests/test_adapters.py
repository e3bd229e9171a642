"""Reading PEFT adapters: real PEFT output, scales, key variants, and every refusal."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from helpers import tiny_population, write_users
from safetensors.torch import load_file, save_file

from soppu.adapter_sets import discover, read_population
from soppu.adapters import (
    TRAINING_NAME,
    AdapterError,
    LoraState,
    blend,
    read_adapter,
    read_lora,
    write_lora,
)
from soppu.userids import UnsafeUserId, check_user_id, slugify_user_id


def peft_adapter(tiny_llama, path, *, r=4, alpha=8, rslora=False, seed=0):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama,
        LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], use_rslora=rslora),
    )
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=gen)
    model.save_pretrained(path)
    return model


def test_reads_real_peft_output_with_its_scale(tiny_llama, tmp_path):
    model = peft_adapter(tiny_llama, tmp_path / "alice", r=4, alpha=8)
    info = read_adapter(tmp_path / "alice")
    assert info.user == "alice"
    assert sorted(info.modules) == [
        f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")
    ]
    A, B, scale = info.load("model.layers.1.self_attn.v_proj")
    assert scale == 8 / 4
    lora = model.base_model.model.model.layers[1].self_attn.v_proj
    torch.testing.assert_close(
        B @ A * scale,
        lora.lora_B["default"].weight @ lora.lora_A["default"].weight * lora.scaling["default"],
    )


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_a_blend_is_one_plain_lora_whose_logits_are_the_blended_updates(
    tiny_llama, tmp_path, weight
):
    """blend(G, P, μ) = ΔW_G + μ·(ΔW_P − ΔW_G) exactly, through PEFT, for LoRAs of other
    ranks and scalings (one rsLoRA): the logits of the blend are those of a model whose
    weights carry the blended update."""
    from peft import PeftModel

    peft_adapter(tiny_llama, tmp_path / "shared", r=4, alpha=8, seed=1).unload()
    peft_adapter(tiny_llama, tmp_path / "own", r=2, alpha=3, rslora=True, seed=2).unload()
    shared, own = read_lora(tmp_path / "shared"), read_lora(tmp_path / "own")
    mixed = blend(shared, own, weight)
    assert mixed.config["r"] == 6 and not mixed.config["use_rslora"]
    write_lora(mixed, tmp_path / "mixed")
    assert (
        read_adapter(tmp_path / "mixed").modules.keys()
        == read_adapter(tmp_path / "own").modules.keys()
    )

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    deltas = {}
    for name, weight_of in (("shared", 1 - weight), ("own", weight)):
        info = read_adapter(tmp_path / name)
        for module in info.modules:
            A, B, scale = info.load(module)
            deltas[module] = deltas.get(module, 0) + weight_of * scale * (B @ A)
    with torch.no_grad():
        mixed_model = PeftModel.from_pretrained(tiny_llama, tmp_path / "mixed")
        got = mixed_model(input_ids=ids).logits
        mixed_model.unload()
        originals = {}
        for module, delta in deltas.items():
            linear = tiny_llama.get_submodule(module)
            originals[module] = linear.weight.clone()
            linear.weight += delta
        want = tiny_llama(input_ids=ids).logits
        for module, original in originals.items():
            tiny_llama.get_submodule(module).weight.copy_(original)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    patterned = LoraState(own.tensors, {**own.config, "rank_pattern": {"q_proj": 2}})
    with pytest.raises(AdapterError, match="patterns are not blended"):
        blend(shared, patterned, 0.5)
    fewer = LoraState({k: v for k, v in own.tensors.items() if "layers.0." in k}, own.config)
    with pytest.raises(AdapterError, match="different modules"):
        blend(shared, fewer, 0.5)


def test_a_strength_on_some_modules_scales_only_their_update():
    """B of the named modules' layers times the strength, every other tensor as it was;
    modules the adapter does not have: every update scaled, as with none named."""
    gen = torch.Generator().manual_seed(0)
    tensors = {
        f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{h}.weight": torch.randn(
            4, 4, generator=gen
        )
        for i in (1, 2, 12)
        for p in ("q_proj", "v_proj")
        for h in "AB"
    }
    lora = LoraState(tensors, {"r": 4, "lora_alpha": 8})
    half = lora.scaled(0.5, ("model.layers.1.", "model.layers.2."))
    for key, tensor in tensors.items():
        stood_in = ".layers.12." not in key and ".lora_B." in key
        assert torch.equal(half.tensors[key], tensor * 0.5 if stood_in else tensor), key
    for elsewhere in (("model.layers.7.",), None, ()):
        scaled = lora.scaled(2.0, elsewhere)
        for key, tensor in tensors.items():
            assert torch.equal(scaled.tensors[key], tensor * 2 if ".lora_B." in key else tensor)
    assert lora.scaled(1.0, ("model.layers.1.",)) is lora


def test_rslora_scale_is_alpha_over_root_r(tiny_llama, tmp_path):
    peft_adapter(tiny_llama, tmp_path / "bob", r=4, alpha=8, rslora=True)
    info = read_adapter(tmp_path / "bob")
    assert all(math.isclose(m.scale, 8 / 2) for m in info.modules.values())


def test_default_infix_in_keys_is_accepted(tmp_path):
    paths = write_users(tmp_path, tiny_population(1), rank=4, alpha=4)
    weights = paths["user00"] / "adapter_model.safetensors"
    state = load_file(weights)
    save_file({k.replace(".weight", ".default.weight"): v for k, v in state.items()}, weights)
    info = read_adapter(paths["user00"])
    assert len(info.modules) == 4


def test_alpha_and_rank_patterns_are_honoured(tmp_path):
    population = tiny_population(1, k=4)
    tensors = population["user00"]
    q = "model.layers.0.self_attn.q_proj"
    tensors[q] = (tensors[q][0][:2], tensors[q][1][:, :2])  # rank 2 for this one module
    write_users(
        tmp_path,
        population,
        rank=4,
        alpha=8,
        rank_pattern={"layers.0.self_attn.q_proj": 2},
        alpha_pattern={"v_proj": 16},
    )
    info = read_adapter(tmp_path / "user00")
    assert info.modules[q].rank == 2 and info.modules[q].scale == 8 / 2
    assert info.modules["model.layers.1.self_attn.v_proj"].scale == 16 / 4
    assert info.modules["model.layers.1.self_attn.q_proj"].scale == 8 / 4


def test_pickled_weights_are_refused_with_the_reason(tmp_path):
    (tmp_path / "eve").mkdir()
    (tmp_path / "eve" / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    (tmp_path / "eve" / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(AdapterError, match=r"adapter_model\.bin: pickled weights are never"):
        read_adapter(tmp_path / "eve")


def test_nan_values_are_refused_naming_file_and_module(tmp_path):
    population = tiny_population(2)
    population["user01"]["model.layers.1.self_attn.q_proj"][1][3, 1] = float("nan")
    paths = write_users(tmp_path, population, rank=4, alpha=4)
    with pytest.raises(
        AdapterError,
        match=r"user01/adapter_model\.safetensors: "
        r"model\.layers\.1\.self_attn\.q_proj\.lora_B has 1 non-finite",
    ):
        read_population(paths)


def odd_adapter(tmp_path, dtype=torch.float32):
    """Sizes that are no multiple of 8 bytes, re-saved in `dtype`; its tensors as written."""
    gen = torch.Generator().manual_seed(0)
    factors = {
        f"model.layers.0.self_attn.{name}": (torch.randn(3, 63, generator=gen), torch.randn(m, 3))
        for name, m in (("q_proj", 5), ("v_proj", 7))
    }
    path = write_users(tmp_path, {"odd": factors}, rank=3, alpha=3)["odd"]
    weights = path / "adapter_model.safetensors"
    # copies: safetensors 0.4 maps the file it loads, and the file is rewritten in place here
    tensors = {key: value.to(dtype).clone() for key, value in load_file(weights).items()}
    save_file(tensors, weights)
    return path, tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_load_many_reads_exactly_what_safetensors_reads(tmp_path, dtype):
    path, tensors = odd_adapter(tmp_path, dtype)
    info = read_adapter(path)
    for module, (A, B, scale) in info.load_many(sorted(info.modules)).items():
        keys = info.modules[module]
        assert A.dtype == B.dtype == torch.float32 and scale == 1.0
        assert torch.equal(A, tensors[keys.key_a].float())
        assert torch.equal(B, tensors[keys.key_b].float())
    one = sorted(info.modules)[1]  # one module alone, out of the file's order
    assert torch.equal(info.load(one)[1], tensors[info.modules[one].key_b].float())


def test_load_many_names_the_bad_tensor_and_a_file_cut_short(tmp_path):
    path, tensors = odd_adapter(tmp_path)
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    tensors[key][2, 5] = float("inf")
    save_file(tensors, path / "adapter_model.safetensors")
    info = read_adapter(path)
    with pytest.raises(AdapterError, match=r"odd/adapter_model\.safetensors: .*v_proj\.lora_A has"):
        info.load_many(sorted(info.modules))
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])  # changed after its header was read
    with pytest.raises(AdapterError, match=r"cannot read \(the file changed since its header"):
        info.load_many(sorted(info.modules))
    os.utime(weights, ns=(info.stamp[1], info.stamp[1]))  # the old mtime, a new size
    with pytest.raises(AdapterError, match=r"the file changed since its header"):
        info.load_many(sorted(info.modules))


def test_inconsistent_shapes_list_who_differs(tmp_path):
    population = tiny_population(3)
    A, B = population["user02"]["model.layers.0.self_attn.v_proj"]
    population["user02"]["model.layers.0.self_attn.v_proj"] = (A[:, :40], B)
    paths = write_users(tmp_path, population, rank=4, alpha=4)
    with pytest.raises(AdapterError, match=r"v_proj has different shapes.*\[32, 40\]: user02"):
        read_population(paths)


def test_different_base_models_and_modules_list_who_differs(tmp_path):
    population = tiny_population(3)
    paths = write_users(
        tmp_path / "a", {k: population[k] for k in ("user00", "user01")}, rank=4, alpha=4
    )
    odd = {"user02": dict(list(population["user02"].items())[:2])}
    paths |= write_users(tmp_path / "b", odd, rank=4, alpha=4, base_model="other-model")
    with pytest.raises(AdapterError) as err:
        read_population(paths)
    message = str(err.value)
    assert "base model differs" in message and "'other-model' for user02" in message
    assert "target modules differ" in message or "target modules differs" in message


def test_corrupt_files_name_the_file(tmp_path):
    paths = write_users(tmp_path, tiny_population(1), rank=4, alpha=4)
    weights = paths["user00"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: not a readable"):
        read_adapter(paths["user00"])
    (paths["user00"] / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match=r"adapter_config\.json: not valid JSON"):
        read_adapter(paths["user00"])


def test_config_rank_must_match_the_weights(tmp_path):
    paths = write_users(tmp_path, tiny_population(1, k=4), rank=8, alpha=8)
    with pytest.raises(AdapterError, match="has rank 4 but the config says r=8"):
        read_adapter(paths["user00"])


def test_unexpected_tensors_and_missing_halves_are_refused(tmp_path):
    paths = write_users(tmp_path, tiny_population(1), rank=4, alpha=4)
    weights = paths["user00"] / "adapter_model.safetensors"
    state = load_file(weights)
    state.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    save_file(state, weights)
    with pytest.raises(AdapterError, match="q_proj has no lora_B"):
        read_adapter(paths["user00"])
    state["base_model.model.lm_head.weight"] = torch.zeros(2, 2)
    save_file(state, weights)
    with pytest.raises(AdapterError, match=r"unexpected tensor '.*lm_head\.weight'"):
        read_adapter(paths["user00"])


@pytest.mark.parametrize(
    "user",
    [
        "",
        ".",
        "..",
        "../x",
        "/etc",
        "a/b",
        "tab\there",
        "nul\x00",
        "-rf",
        " spaced",
        "~root",
        "x" * 200,
    ],
)
def test_unsafe_user_ids_are_refused(user):
    with pytest.raises(UnsafeUserId):
        check_user_id(user)


def test_safe_user_ids_and_slugs():
    assert check_user_id("hamlet.HAMLET-1_b") == "hamlet.HAMLET-1_b"
    assert check_user_id("Ofélia") == "Ofélia"
    assert slugify_user_id("Hamlet / LADY MACBETH") == "Hamlet_LADY_MACBETH"


def test_unsafe_user_id_refused_before_reading(tmp_path):
    paths = write_users(tmp_path, tiny_population(1), rank=4, alpha=4)
    with pytest.raises(AdapterError, match="is a path"):
        read_adapter(paths["user00"], user="../escape")


def test_discover_finds_folders_and_single_dirs(tmp_path):
    paths = write_users(tmp_path / "pool", tiny_population(3), rank=4, alpha=4)
    (tmp_path / "pool" / "notes").mkdir()
    assert discover([tmp_path / "pool"]) == paths
    assert discover([paths["user01"]]) == {"user01": paths["user01"]}
    with pytest.raises(AdapterError, match="no PEFT adapter dirs"):
        discover([tmp_path / "pool" / "notes"])
    with pytest.raises(AdapterError, match="must be unique"):
        discover([tmp_path / "pool", paths["user01"]])


def test_write_lora_is_atomic_and_refuses_to_clobber(tmp_path):
    tensors = tiny_population(1)["user00"]
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 4}
    write_lora(LoraState.from_factors(tensors, config), tmp_path / "a")
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        write_lora(LoraState.from_factors(tensors, {"r": 4}), tmp_path / "a")
    bad = LoraState.from_factors(dict(tensors, broken=("not a tensor", None)), {"r": 4})
    with pytest.raises(AttributeError):
        write_lora(bad, tmp_path / "a", replace=True)
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_read_lora_is_as_strict_as_read_adapter_and_reads_back_what_was_written(tmp_path):
    tensors = tiny_population(1)["user00"]
    lora = LoraState.from_factors(tensors, {"peft_type": "LORA", "r": 4, "lora_alpha": 8})
    write_lora(lora, tmp_path / "my adapter", {"round": 3})  # any dir name: not a user id
    again = read_lora(tmp_path / "my adapter")
    assert again.config == lora.config and again.tensors.keys() == lora.tensors.keys()
    for key, tensor in lora.tensors.items():
        assert torch.equal(again.tensors[key], tensor.float())
    assert json.loads((tmp_path / "my adapter" / TRAINING_NAME).read_text()) == {"round": 3}

    for config, says in (
        ({"peft_type": "LORA", "r": 8, "lora_alpha": 8}, "config says r=8"),
        ({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True}, "DoRA"),
    ):
        write_lora(LoraState.from_factors(tensors, config), tmp_path / "bad", replace=True)
        with pytest.raises(AdapterError, match=says):
            read_lora(tmp_path / "bad")
    (tmp_path / "bad" / "adapter_model.safetensors").unlink()
    (tmp_path / "bad" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterError, match="never loaded"):
        read_lora(tmp_path / "bad")
