"""Local personalisation on a tiny random Llama: the LoRA trained on the emulator plugs into the
full model (PEFT loads it; logits equal the hand-merged deltas), training continues from a
starting adapter, and the CLI runs prepare-free on a local model folder."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_causal_lm, tiny_tokenizer, write_tiny_model, write_users_jsonl
from safetensors.torch import load_file
from typer.testing import CliRunner

from soppu import emulator as E
from soppu.adapters import read_adapter
from soppu.data import UserText
from soppu.personalize import TrainConfig, personalize, read_lora, save_lora

TEXT = "\n".join(
    f"speech {i}: now is the winter of our discontent made glorious summer" for i in range(40)
)
USER = UserText("alice", TEXT, "speech 99: made glorious summer by this sun of york")
CONFIG = TrainConfig(steps=4, lr=1e-2, batch_size=2, seq_len=32, rank=4, alpha=8)


@pytest.fixture
def setup():
    full = tiny_causal_lm(layers=6)
    emulator, info = E.build(full, E.EmulatorPlan(6, top=2, drop=0.5), "tiny")
    return full, emulator, info, tiny_tokenizer()


def test_adapter_plugs_into_the_full_model(setup, tmp_path):
    from peft import PeftModel

    full, emulator, info, tokenizer = setup
    result = personalize(USER, emulator, info, tokenizer, CONFIG, full_model=full)
    assert result.perplexity["emulator_adapter"] < result.perplexity["emulator_start"]
    assert set(result.perplexity) == {"emulator_start", "emulator_adapter", "base", "full_adapter"}
    save_lora(result.lora, tmp_path / "alice", {"emulator": info.version})
    keys = load_file(tmp_path / "alice" / "adapter_model.safetensors")
    assert {k.split(".layers.")[1].split(".")[0] for k in keys} == {"4", "5"}  # full indices
    assert read_adapter(tmp_path / "alice").config["layers_to_transform"] == [4, 5]

    ids = torch.randint(0, 300, (2, 24))
    merged = tiny_causal_lm(layers=6)
    with torch.no_grad():
        for layer in (4, 5):
            for proj in ("q_proj", "v_proj"):
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
                delta = keys[f"{prefix}.lora_B.weight"] @ keys[f"{prefix}.lora_A.weight"]
                weight = getattr(merged.model.layers[layer].self_attn, proj).weight
                weight += (8 / 4) * delta
        expected = merged(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(tiny_causal_lm(layers=6), tmp_path / "alice")
        got = peft_model(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, full(input_ids=ids).logits, atol=1e-3)  # the LoRA matters
    # The emulator and the full model are left bare: no LoRA layers remain.
    assert not any("lora_" in n for n, _ in emulator.named_modules())
    assert not any("lora_" in n for n, _ in full.named_modules())


def test_training_continues_from_a_starting_adapter(setup, tmp_path):
    _full, emulator, info, tokenizer = setup
    first = personalize(USER, emulator, info, tokenizer, CONFIG)
    save_lora(first.lora, tmp_path / "start")
    second = personalize(
        USER, emulator, info, tokenizer, CONFIG, start=read_lora(tmp_path / "start")
    )
    assert second.perplexity["emulator_start"] == pytest.approx(
        first.perplexity["emulator_adapter"], rel=1e-5
    )
    assert second.perplexity["emulator_adapter"] < first.perplexity["emulator_adapter"]


def test_a_starting_adapter_on_other_layers_is_refused(setup, tmp_path):
    _full, emulator, info, tokenizer = setup
    lora = personalize(USER, emulator, info, tokenizer, CONFIG).lora
    moved = {k.replace("layers.4.", "layers.1."): v for k, v in lora.tensors.items()}
    with pytest.raises(E.EmulatorError, match="not an adapter layer"):
        personalize(USER, emulator, info, tokenizer, CONFIG, start=type(lora)(moved, lora.config))


def test_nan_starting_adapter_is_refused(setup, tmp_path):
    _full, emulator, info, tokenizer = setup
    lora = personalize(USER, emulator, info, tokenizer, CONFIG).lora
    key = next(iter(lora.tensors))
    lora.tensors[key][0, 0] = float("nan")
    save_lora(lora, tmp_path / "bad")
    with pytest.raises(ValueError, match="NaN"):
        read_lora(tmp_path / "bad")


def test_cli_emulator_build_and_personalize(tmp_path):
    from soppu.cli import app

    model = write_tiny_model(tmp_path / "model")
    data = write_users_jsonl(tmp_path / "users.jsonl", {"alice": 3000, "bob": 1500})
    public = write_users_jsonl(tmp_path / "public.jsonl", {"nobody": 6000}, seed=1)
    runner = CliRunner()

    def invoke(*args):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    out = invoke("data", "--data", data)
    assert "alice" in out and "bob" in out and "2 users" in out
    out = invoke(
        "emulator",
        "build",
        "--out",
        tmp_path / "emu",
        "--base-model",
        model,
        "--public",
        public,
        "--align-steps",
        3,
        "--seq-len",
        32,
        "--threads",
        1,
    )
    assert "adapter layers (trained by users): [4, 5]" in out and "alignment on public" in out
    info = E.read_info(tmp_path / "emu")
    assert info.alignment["after"]["loss"] <= info.alignment["before"]["loss"] * 1.5
    out = invoke(
        "personalize",
        "--user",
        "alice",
        "--out",
        tmp_path / "alice",
        "--base-model",
        model,
        "--data",
        data,
        "--emulator",
        tmp_path / "emu",
        "--steps",
        3,
        "--seq-len",
        32,
        "--rank",
        4,
        "--threads",
        1,
    )
    assert "full model + adapter" in out
    training = json.loads((tmp_path / "alice" / "training.json").read_text())
    assert training["emulator"] == info.version and len(training["train_loss"]) == 3
    assert read_adapter(tmp_path / "alice").modules  # a valid PEFT dir for the compressor

    result = runner.invoke(
        app,
        [
            "personalize",
            "--user",
            "carol",
            "--out",
            str(tmp_path / "c"),
            "--base-model",
            str(model),
            "--data",
            str(data),
            "--emulator",
            str(tmp_path / "emu"),
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 2 and "no user 'carol'" in result.output


def test_gpt2_style_models_work_too(tmp_path):
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_embd=64, n_layer=6, n_head=4, n_positions=128)
    full = GPT2LMHeadModel(config).eval().requires_grad_(False)
    emulator, info = E.build(full, E.EmulatorPlan(6, top=2, drop=0.5), "tiny-gpt2")
    assert info.layers_path == "transformer.h" and emulator.config.n_layer == 4
    result = personalize(USER, emulator, info, tiny_tokenizer(), CONFIG, full_model=full)
    assert result.lora.config["target_modules"] == ["c_attn"]
    assert result.perplexity["emulator_adapter"] < result.perplexity["emulator_start"]
    save_lora(result.lora, tmp_path / "gpt2")
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(full, tmp_path / "gpt2")
        plugged = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()(input_ids=ids).logits
    assert torch.allclose(plugged, merged, atol=1e-5)
