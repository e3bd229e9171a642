"""The FedBiOT emulator: which layers it keeps, that its weights are the full model's, that it
saves and loads whole, that alignment helps and touches only the middle layers, and that a LoRA
trained on it plugs into the full model."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_causal_lm, tiny_tokenizer

from soppu import emulator as E
from soppu import lm
from soppu.adapters import LoraState
from soppu.alignment import AlignConfig, align, build_aligned, measure, realign
from soppu.emulator import EmulatorError, EmulatorPlan
from soppu.personalize import attached, fresh_lora
from soppu.train_config import TrainConfig


def test_plan_keeps_adapter_and_evenly_spaced_middle():
    plan = EmulatorPlan(30, top=2, drop=0.5, select="even")
    assert plan.adapter_layers == [28, 29]
    assert plan.middle_kept() == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27]
    assert plan.full_layers() == [*plan.middle_kept(), 28, 29]
    offsite = EmulatorPlan(12, top=2, bottom=2, drop=0.5, select="even")
    assert offsite.adapter_layers == [0, 1, 10, 11]
    assert offsite.middle_kept() == [2, 4, 7, 9]
    assert EmulatorPlan(8, top=2, drop=0.0).full_layers() == list(range(8))  # no scores needed
    assert EmulatorPlan(8, top=2, drop=0.9, select="even").full_layers() == [3, 6, 7]


def test_importance_keeps_the_layers_that_turn_the_residual_stream_most():
    plan = EmulatorPlan(8, top=2, bottom=1, drop=0.6)  # middle 1..5, keep 2
    scores = [9.0, 0.1, 0.5, 0.2, 0.4, 0.3, 9.0, 9.0]
    assert plan.middle_kept(scores) == [2, 4]
    assert plan.full_layers(scores) == [0, 2, 4, 6, 7]
    with pytest.raises(EmulatorError, match="one score per layer"):
        plan.full_layers()
    with pytest.raises(EmulatorError, match="one score per layer"):
        E.build(tiny_causal_lm(layers=8), plan, "tiny")


def test_layer_importance_is_one_minus_the_cosine_of_each_layers_input_and_output():
    full = tiny_causal_lm(layers=4)
    batch = lm.collate([torch.randint(0, 300, (12,)), torch.randint(0, 300, (7,))], 0)
    scores = E.layer_importance(full, [batch])
    out = full(input_ids=batch.ids, attention_mask=batch.mask, output_hidden_states=True)
    keep = batch.mask.bool()
    h = out.hidden_states
    cos = torch.nn.functional.cosine_similarity(h[1][keep], h[2][keep], dim=-1).mean()
    assert len(scores) == 4
    assert scores[1] == pytest.approx(float(1 - cos), abs=1e-6)


def test_build_aligned_chooses_layers_on_public_text_and_records_them(tmp_path):
    full = tiny_causal_lm(layers=6)
    tokenizer = tiny_tokenizer()
    public = [f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(80)]
    config = AlignConfig(steps=2, batch_size=4, seq_len=32, eval_blocks=2)
    emulator, info = build_aligned(
        full, tokenizer, "tiny", EmulatorPlan(6, top=2, drop=0.5), public, config
    )
    middle = [0, 1, 2, 3]
    expected = sorted(sorted(middle, key=lambda layer: -info.importance[layer])[:2])
    assert info.full_layers == [*expected, 4, 5]
    assert info.aligned and not info.exact
    assert E.read_info(E.save(emulator, info, tmp_path / "e")) == info
    with pytest.raises(EmulatorError, match="needs public text"):
        build_aligned(full, tokenizer, "tiny", EmulatorPlan(6, top=2, drop=0.5), [], config)
    _unaligned, unaligned_info = build_aligned(
        full, tokenizer, "tiny", EmulatorPlan(6, top=2, drop=0.5), public, AlignConfig(steps=0)
    )
    assert not unaligned_info.aligned  # callers must say so (tested in test_federation)
    _, exact = build_aligned(full, tokenizer, "tiny", EmulatorPlan(6, drop=0.0), [], config)
    assert exact.exact and exact.full_layers == list(range(6)) and not exact.alignment


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"top": -1}, "top ≥ 1"), ({"top": 5, "bottom": 4}, "does not fit"), ({"drop": 1.0}, "drop")],
)
def test_bad_plans_are_refused(kwargs, message):
    with pytest.raises(EmulatorError, match=message):
        EmulatorPlan(8, **kwargs)


def test_the_default_top_is_eight_exact_layers_or_a_third_of_a_smaller_model():
    assert [EmulatorPlan(n).top for n in (30, 24, 12, 6, 2)] == [8, 8, 4, 2, 1]
    default = EmulatorPlan(30)  # about half the model: the top 8 and 8 of the 22 below
    assert (default.keep_count, default.adapter_layers) == (8, list(range(22, 30)))
    assert EmulatorPlan(30, top=3).top == 3


def test_emulator_layers_are_the_full_models_layers():
    full = tiny_causal_lm(layers=6)
    emulator, info = E.build(full, EmulatorPlan(6, top=2, drop=0.5, select="even"), "tiny")
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
    # a served strength applies to the layers the emulator stands in for, not to the exact top
    assert info.strength_modules == ("model.layers.0.", "model.layers.3.")
    # With no layer dropped the emulator is the full model: identical logits.
    same, exact = E.build(full, EmulatorPlan(6, top=2, drop=0.0), "tiny")
    ids = torch.randint(0, 300, (2, 16))
    assert torch.equal(same(input_ids=ids).logits, full(input_ids=ids).logits)
    assert exact.strength_modules is None  # every layer: full mode's strengths as before
    _, all_dropped = E.build(full, EmulatorPlan(6, top=2, drop=0.99), "tiny")
    assert all_dropped.full_layers == [4, 5] and all_dropped.strength_modules is None


def test_save_load_round_trip_and_content_version(tmp_path):
    full = tiny_causal_lm(layers=6)
    emulator, info = E.build(full, EmulatorPlan(6, select="even"), "tiny")
    _again, info_again = E.build(full, EmulatorPlan(6, select="even"), "tiny")
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
    emulator, info = E.build(full, EmulatorPlan(6, top=2, drop=0.5, select="even"), "tiny")
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


def test_realignment_with_the_adapter_in_both_narrows_their_gap_and_keeps_the_plug_in():
    """FedBiOT's bi-level step: aligned with a LoRA plugged into both models, the emulator's
    middle layers move to pass on what the full model does with it; the LoRA, the full model
    and the emulator's adapter layers stay bit for bit, and both models are left bare."""
    torch.manual_seed(0)
    full = tiny_causal_lm(layers=6)
    tokenizer = tiny_tokenizer()
    emulator, info = E.build(full, EmulatorPlan(6, top=2, drop=0.5, select="even"), "tiny")
    lora = fresh_lora(emulator, info, TrainConfig(seed=0))
    lora = LoraState(
        {k: v + 0.3 * torch.randn_like(v) for k, v in lora.tensors.items()}, lora.config
    )
    start = {k: v.clone() for k, v in lora.tensors.items()}
    full_state = {k: v.clone() for k, v in full.state_dict().items()}
    fixed = {
        k: v.clone()
        for k, v in emulator.state_dict().items()
        if not k.startswith(("model.layers.0.", "model.layers.1."))  # the middle: full 0 and 3
    }
    text = "\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(60))
    blocks = lm.token_blocks(tokenizer, text, 32)
    pad = tokenizer.pad_token_id

    def gap() -> float:
        with attached(full, lora), attached(emulator, info.lora_on_emulator(lora)):
            return measure(full, emulator, info, blocks[:4], pad, 4).total(1.0)

    before = gap()
    result = realign(
        full,
        emulator,
        info,
        lora,
        blocks,
        pad,
        AlignConfig(steps=30, lr=3e-4, eval_blocks=4, precision="fp32"),
    )
    assert result["before"]["loss"] == pytest.approx(before, rel=1e-5)
    assert gap() < 0.8 * before
    assert all(torch.equal(lora.tensors[k], v) for k, v in start.items())
    assert all(torch.equal(full.state_dict()[k], v) for k, v in full_state.items())
    assert set(full.state_dict()) == set(full_state)  # bare again: no LoRA left in
    assert not any("lora_" in k for k in emulator.state_dict())
    for key, value in fixed.items():
        assert torch.equal(emulator.state_dict()[key], value), key
    assert not torch.equal(
        emulator.model.layers[1].mlp.up_proj.weight, full.model.layers[3].mlp.up_proj.weight
    )
    assert not any(p.requires_grad for p in emulator.parameters())


def test_layer_keys_map_both_ways():
    full = tiny_causal_lm(layers=6)
    _, info = E.build(full, EmulatorPlan(6, top=2, drop=0.5, select="even"), "tiny")
    key = "base_model.model.model.layers.{}.self_attn.q_proj.lora_A.weight"
    state = {key.format(j): j for j in range(4)}  # every emulator layer: full 0, 3, 4, 5
    assert E.to_full_keys(state, info) == {key.format(f): j for j, f in enumerate([0, 3, 4, 5])}
    assert E.to_emulator_keys(E.to_full_keys(state, info), info) == state
    with pytest.raises(EmulatorError, match="not a layer of this emulator"):
        E.to_emulator_keys({key.format(1): 0}, info)  # full layer 1 was dropped
    with pytest.raises(EmulatorError, match="not a layer of this emulator"):
        E.to_full_keys({key.format(4): 0}, info)  # the emulator has 4 layers
