"""The FedBiOT emulator: which layers it keeps, that its weights are the full model's, that it
saves and loads whole, that alignment helps and touches only the middle layers, and that a LoRA
trained on it plugs into the full model."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_causal_lm, tiny_tokenizer

from soppu import emulator as E
from soppu import lm
from soppu.alignment import AlignConfig, align
from soppu.emulator import EmulatorError, EmulatorPlan


def test_plan_keeps_adapter_and_evenly_spaced_middle():
    plan = EmulatorPlan(30, top=2, drop=0.5)
    assert plan.adapter_layers == [28, 29]
    assert plan.middle_kept == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27]
    assert plan.full_layers == [*plan.middle_kept, 28, 29]
    offsite = EmulatorPlan(12, top=2, bottom=2, drop=0.5)
    assert offsite.adapter_layers == [0, 1, 10, 11]
    assert offsite.middle_kept == [2, 4, 7, 9]
    assert EmulatorPlan(8, top=2, drop=0.0).full_layers == list(range(8))
    assert EmulatorPlan(8, top=2, drop=0.9).full_layers == [3, 6, 7]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"top": 0}, "top ≥ 1"), ({"top": 5, "bottom": 4}, "does not fit"), ({"drop": 1.0}, "drop")],
)
def test_bad_plans_are_refused(kwargs, message):
    with pytest.raises(EmulatorError, match=message):
        EmulatorPlan(8, **kwargs)


def test_emulator_layers_are_the_full_models_layers():
    full = tiny_causal_lm(layers=6)
    emulator, info = E.build(full, EmulatorPlan(6, top=2, drop=0.5), "tiny")
    assert info.full_layers == [0, 3, 4, 5] and info.adapter_layers == [4, 5]
    assert emulator.config.num_hidden_layers == 4
    full_state = full.state_dict()
    for j, f in enumerate(info.full_layers):
        for name, tensor in emulator.model.layers[j].state_dict().items():
            assert torch.equal(tensor, full_state[f"model.layers.{f}.{name}"])
    assert torch.equal(emulator.model.embed_tokens.weight, full.model.embed_tokens.weight)
    assert (
        emulator.model.embed_tokens.weight.data_ptr() != full.model.embed_tokens.weight.data_ptr()
    )
    assert info.params_emulator < info.params_full
    # With no layer dropped the emulator is the full model: identical logits.
    same, _ = E.build(full, EmulatorPlan(6, top=2, drop=0.0), "tiny")
    ids = torch.randint(0, 300, (2, 16))
    assert torch.equal(same(input_ids=ids).logits, full(input_ids=ids).logits)


def test_save_load_round_trip_and_content_version(tmp_path):
    full = tiny_causal_lm(layers=6)
    emulator, info = E.build(full, EmulatorPlan(6), "tiny")
    _again, info_again = E.build(full, EmulatorPlan(6), "tiny")
    assert info.version == info_again.version and info.version.startswith("emu-")
    E.save(emulator, info, tmp_path / "emu")
    loaded, loaded_info = E.load(tmp_path / "emu")
    assert loaded_info == info
    ids = torch.randint(0, 300, (2, 16))
    assert torch.equal(loaded(input_ids=ids).logits, emulator(input_ids=ids).logits)
    with pytest.raises(FileExistsError):
        E.save(emulator, info, tmp_path / "emu")
    with pytest.raises(EmulatorError, match="not an emulator"):
        E.read_info(tmp_path)


def test_alignment_lowers_its_loss_and_trains_only_middle_layers():
    full = tiny_causal_lm(layers=6)
    tokenizer = tiny_tokenizer()
    emulator, info = E.build(full, EmulatorPlan(6, top=2, drop=0.5), "tiny")
    fixed = {
        k: v.clone()
        for k, v in emulator.state_dict().items()
        if not k.startswith(("model.layers.0.", "model.layers.1."))  # full layers 0 and 3
    }
    text = "\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(60))
    blocks = lm.token_blocks(tokenizer, text, 32)
    result = align(
        full,
        emulator,
        info,
        blocks,
        tokenizer.pad_token_id,
        AlignConfig(steps=30, lr=3e-3, batch_size=4, eval_blocks=4),
    )
    assert result["after"]["loss"] < 0.8 * result["before"]["loss"]
    for key, value in emulator.state_dict().items():
        if key in fixed:
            assert torch.equal(value, fixed[key]), key
    assert not torch.equal(
        emulator.model.layers[1].mlp.up_proj.weight, full.model.layers[3].mlp.up_proj.weight
    )
    assert not any(p.requires_grad for p in emulator.parameters())


def test_layer_keys_map_both_ways():
    full = tiny_causal_lm(layers=6)
    _, info = E.build(full, EmulatorPlan(6, top=2, drop=0.5), "tiny")
    key = "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"
    assert list(E.to_full_keys({key: 0}, info)) == [key.replace("layers.2.", "layers.4.")]
    assert E.to_emulator_keys(E.to_full_keys({key: 0}, info), info) == {key: 0}
    with pytest.raises(EmulatorError, match="not an adapter layer"):
        E.to_full_keys({key.replace("layers.2.", "layers.0."): 0}, info)
