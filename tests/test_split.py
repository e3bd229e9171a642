"""Split mode: a client holding the top layers only, fed the full model's hidden states below
them, trains exactly as on the full model: the same loss, the same gradient, the same adapter."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import tiny_causal_lm, tiny_tokenizer, write_tiny_model
from transformers import AutoModelForCausalLM

from soppu import emulator as E
from soppu import features, lm
from soppu.data import UserText
from soppu.emulator import EmulatorError, EmulatorPlan, full_model_info
from soppu.personalize import ALL_LINEAR, attached, fresh_lora, lora_parameters, personalize
from soppu.server.config import FederationConfig
from soppu.train_config import TrainConfig

TEXT = "\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(30))
USER = UserText("alice", TEXT, "line 99: the lazy dog sleeps", validation="line 98: a fox")
CONFIG = TrainConfig(steps=3, lr=1e-2, batch_size=2, seq_len=24, rank=4, alpha=8, precision="fp32")


class Counted(features.ModelFeatures):
    asked = 0

    def hidden_states(self, blocks):
        self.asked += len(blocks)
        return super().hidden_states(blocks)


def split_of(full, top: int = 2):
    emulator, info = E.build(full, EmulatorPlan(6, top=top, split=True), "tiny")
    source = Counted(full, 0, info.features_layer)
    features.attach(emulator, info, source)
    return emulator, info, source


def test_split_plan_keeps_the_top_layers_and_needs_nothing_aligned():
    plan = EmulatorPlan(6, top=2, split=True)
    assert plan.full_layers() == [4, 5] and plan.keep_count == 0 and not plan.needs_importance
    with pytest.raises(EmulatorError, match="no bottom layers"):
        EmulatorPlan(6, top=2, bottom=1, split=True)
    _, info = E.build(tiny_causal_lm(), plan, "tiny")
    assert info.split and info.exact and info.features_layer == 4
    assert info.strength_modules is None  # nothing stood in for
    _, plain = E.build(tiny_causal_lm(), EmulatorPlan(6, top=2, select="even"), "tiny")
    with pytest.raises(EmulatorError, match="only a split emulator"):
        _ = plain.features_layer


def test_split_loss_and_gradient_are_the_full_models():
    full = tiny_causal_lm()
    emulator, info, source = split_of(full)
    config = replace(CONFIG, target_modules=(ALL_LINEAR,))
    lora = fresh_lora(emulator, info, config)
    assert lora.config["layers_to_transform"] == [4, 5]
    assert set(lora.config["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    torch.manual_seed(1)  # B ≠ 0, so the LoRA changes what the layers compute
    lora = type(lora)({k: torch.randn_like(v) * 0.1 for k, v in lora.tensors.items()}, lora.config)
    ids = [torch.randint(2, 300, (n,)) for n in (20, 13, 7)]  # padded rows of three lengths
    batch = lm.collate(ids, 0)

    def loss_and_grads(model, on_model):
        with attached(model, on_model, trainable=True) as peft_model:
            loss = lm.lm_loss(peft_model, batch)
            loss.backward()
            grads = {k: p.grad.clone() for k, p in lora_parameters(peft_model).items()}
        return float(loss.detach()), grads

    split_loss, split_grads = loss_and_grads(emulator, info.lora_on_emulator(lora))
    full_loss, full_grads = loss_and_grads(full, lora)
    assert split_loss == pytest.approx(full_loss, rel=1e-5)
    split_grads = E.to_full_keys(split_grads, info)
    assert split_grads.keys() == full_grads.keys()
    for key, grad in full_grads.items():
        torch.testing.assert_close(split_grads[key], grad, rtol=1e-4, atol=1e-6)
    asked = source.asked
    loss_and_grads(emulator, info.lora_on_emulator(lora))  # the same blocks: answered once
    assert source.asked == asked == 3


def test_training_a_split_client_gives_the_full_models_adapter():
    full, tokenizer = tiny_causal_lm(), tiny_tokenizer()
    emulator, info, _ = split_of(full)
    full_info = full_model_info(full, "tiny", top=2)
    on_full = replace(CONFIG, lora_layers="adapter")
    start = fresh_lora(full, full_info, on_full)
    split = personalize(USER, emulator, info, tokenizer, CONFIG, start=start)
    reference = personalize(USER, full, full_info, tokenizer, on_full, start=start)
    assert split.lora.config["layers_to_transform"] == [4, 5]
    for key, tensor in reference.lora.tensors.items():
        torch.testing.assert_close(split.lora.tensors[key], tensor, rtol=1e-4, atol=1e-6)
    assert split.train_loss == pytest.approx(reference.train_loss, rel=1e-4)


def test_local_features_load_the_full_model_and_stop_at_the_split_layer(tmp_path):
    folder = write_tiny_model(tmp_path / "tiny")
    full = tiny_causal_lm()
    ids = [torch.randint(2, 300, (n,)) for n in (9, 4, 6, 5, 8)]  # two batches of 4
    answers = features.LocalFeatures(str(folder), layer=3).hidden_states(ids)
    with torch.no_grad():
        for block, states in zip(ids, answers, strict=True):
            hidden = full(input_ids=block[None], output_hidden_states=True).hidden_states
            torch.testing.assert_close(states, hidden[3][0], rtol=1e-5, atol=1e-6)


def test_each_node_asks_where_its_config_says_and_a_bad_answer_is_refused():
    with pytest.raises(features.NoFeatures, match="names no teacher-url"):
        features.for_node({"user-id": "alice"}, "tiny", 4)
    assert isinstance(features.for_node({"partition-id": 0}, "tiny", 4), features.LocalFeatures)
    real = features.for_node(
        {"user-id": "alice", "teacher-url": "http://x", "teacher-key": "k"}, "", 4
    )
    assert isinstance(real, features.ApiFeatures) and (real.url, real.api_key) == ("http://x", "k")
    with pytest.raises(features.FeatureError, match="cannot reach"):
        features.ApiFeatures("http://127.0.0.1:9", 4).hidden_states([torch.tensor([1, 2])])

    class Wrong:
        def hidden_states(self, blocks):
            return [torch.zeros(len(b), 7) for b in blocks]  # not the hidden size

    emulator, info = E.build(tiny_causal_lm(), EmulatorPlan(6, top=2, split=True), "tiny")
    features.attach(emulator, info, Wrong())
    with pytest.raises(features.FeatureError, match="hidden size 64"):
        emulator(input_ids=torch.randint(2, 300, (1, 5)))


def test_split_mode_config():
    split = FederationConfig(client_mode="split")
    plan = split.plan(30)
    assert plan.split and plan.top == 8 and plan.full_layers() == list(range(22, 30))
    assert split.train().target_modules == (ALL_LINEAR,) and split.train().lr == 1e-3
    default = FederationConfig()  # the emulator's LoRA: the same exact top 8, below them stand-ins
    plan, train = default.plan(30), default.train()
    assert (plan.top, plan.keep_count, train.target_modules) == (8, 8, (ALL_LINEAR,))
    full = FederationConfig(client_mode="full").train()
    assert (full.target_modules, full.lora_layers) == (None, "all")  # q/v on every layer
    four = FederationConfig.from_run_config({"client-mode": "split", "top": 4})
    assert four.plan(30).full_layers() == [26, 27, 28, 29]
    with pytest.raises(ValueError, match="no bottom layers and no repair"):
        FederationConfig.from_run_config({"client-mode": "split", "bottom": 1})
    with pytest.raises(ValueError, match="no bottom layers and no repair"):
        FederationConfig.from_run_config({"client-mode": "split", "repair-steps": 5})


def test_gpt2_style_split_is_exact_too():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_embd=64, n_layer=6, n_head=4, n_positions=128)
    full = GPT2LMHeadModel(config).eval().requires_grad_(False)
    emulator, info = E.build(full, EmulatorPlan(6, top=2, split=True), "tiny-gpt2")
    features.attach(emulator, info, features.ModelFeatures(full, 0, info.features_layer))
    batch = lm.collate([torch.randint(2, 300, (n,)) for n in (12, 5)], 0)
    with torch.no_grad():
        assert float(lm.lm_loss(emulator, batch)) == pytest.approx(
            float(lm.lm_loss(full, batch)), rel=1e-5
        )


def test_personalize_in_split_mode_writes_a_top_layers_adapter(tmp_path):
    from helpers import write_users_jsonl
    from typer.testing import CliRunner

    from soppu.adapters import read_lora
    from soppu.cli import app

    model = write_tiny_model(tmp_path / "tiny")
    data = write_users_jsonl(tmp_path / "users.jsonl", {"alice": 3000})
    flags = ["--user", "alice", "--out", str(tmp_path / "a"), "--base-model", str(model)]
    flags += ["--data", str(data), "--client-mode", "split", "--steps", "2", "--seq-len", "32"]
    result = CliRunner().invoke(app, ["personalize", *flags, "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "full model + adapter" in result.output
    lora = read_lora(tmp_path / "a")
    assert lora.config["layers_to_transform"] == [4, 5] and len(lora.config["target_modules"]) == 7


def test_soppu_serve_answers_a_split_clients_hidden_states(tmp_path):
    """The route on a live `soppu serve`: the base model's hidden states entering the layer,
    exactly (not the served adapters'), for blocks of several lengths; a split emulator fed
    by it computes the full model's loss; bad requests get one line each."""
    import requests
    from helpers import make_served
    from test_serving_faults import live

    root, model = make_served(tmp_path)
    full = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ids = [torch.randint(2, 300, (n,)) for n in (7, 3, 5)]
    with live(root / "serving", model) as (url, _engine):
        answers = features.ApiFeatures(url, 1).hidden_states(ids)  # a 2-layer model
        with torch.no_grad():
            for block, states in zip(ids, answers, strict=True):
                hidden = full(input_ids=block[None], output_hidden_states=True).hidden_states
                torch.testing.assert_close(states, hidden[1][0], rtol=1e-5, atol=1e-5)
        emulator, info = E.build(full, EmulatorPlan(2, top=1, split=True), "tiny")
        features.attach(emulator, info, features.ApiFeatures(url, info.features_layer))
        batch = lm.collate(ids, 0)
        with torch.no_grad():
            split_loss, full_loss = lm.lm_loss(emulator, batch), lm.lm_loss(full, batch)
        assert float(split_loss) == pytest.approx(float(full_loss), rel=1e-5)
        for body, problem in [
            ({"input_ids": [[1, 2]], "layer": 2}, "layer 2 is not one of 1..1"),
            ({"input_ids": [[1, 999]], "layer": 1}, "a token id outside 0..299"),
            ({"input_ids": [[]], "layer": 1}, "0 tokens"),
            ({"input_ids": [[1]] * 17, "layer": 1}, "input_ids"),
        ]:
            reply = requests.post(f"{url}/v1/hidden_states", json=body, timeout=60)
            assert reply.status_code == 422 and problem in reply.text
