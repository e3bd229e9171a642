"""Local personalisation on a tiny random Llama: for every placement of the LoRA the adapter
trained on the emulator plugs into the full model (PEFT loads it; logits equal the hand-merged
deltas), the gradient correction turns an emulator step into the full model's step, training
continues from a starting adapter, and the CLI runs prepare-free on a local model folder."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from helpers import tiny_causal_lm, tiny_tokenizer, write_tiny_model, write_users_jsonl
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D
from typer.testing import CliRunner

from soppu import emulator as E
from soppu import lm
from soppu.adapters import read_adapter, read_lora, write_lora
from soppu.alignment import gradient_correction
from soppu.data import UserText
from soppu.personalize import (
    TrainConfig,
    fresh_lora,
    personalize,
    train_lora,
)

TEXT = "\n".join(
    f"speech {i}: now is the winter of our discontent made glorious summer" for i in range(40)
)
USER = UserText("alice", TEXT, "speech 99: made glorious summer by this sun of york")
# fp32: the expectations computed by hand here are fp32 (bf16 autocast is tested on its own)
CONFIG = TrainConfig(steps=4, lr=1e-2, batch_size=2, seq_len=32, rank=4, alpha=8, precision="fp32")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IMPORTANCE = [1.0, 0.2, 0.9, 0.1, 1.0, 1.0]  # keeps middle layers 0 and 2 of 0..3


@pytest.fixture
def setup():
    full = tiny_causal_lm(layers=6)
    emulator, info = E.build(full, E.EmulatorPlan(6, top=2, drop=0.5, select="even"), "tiny")
    return full, emulator, info, tiny_tokenizer()


def hand_merged(lora_dir, layers: int = 6, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """A fresh copy of the full model (or `model`, changed in place) with every LoRA delta
    added to its weight by hand; GPT-2's Conv1D stores the weight transposed."""
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    tensors = load_file(lora_dir / "adapter_model.safetensors")
    merged = model if model is not None else tiny_causal_lm(layers=layers)
    scale = config["lora_alpha"] / config["r"]
    with torch.no_grad():
        for key, A in tensors.items():
            if ".lora_A." not in key:
                continue
            B = tensors[key.replace(".lora_A.", ".lora_B.")]
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            delta, layer = scale * (B @ A), merged.get_submodule(module)
            layer.weight += delta.T if isinstance(layer, Conv1D) else delta
    return merged


@pytest.mark.parametrize(
    ("plan", "importance", "lora_layers", "targets", "layers"),
    [
        (E.EmulatorPlan(6, drop=0.5, select="even"), None, "all", None, {0, 3, 4, 5}),
        (E.EmulatorPlan(6, drop=0.5, select="even"), None, "adapter", None, {4, 5}),
        (E.EmulatorPlan(6, drop=0.5), IMPORTANCE, "all", ALL_LINEAR, {0, 2, 4, 5}),
        (E.EmulatorPlan(6, top=1, bottom=1, drop=0.5), IMPORTANCE, "adapter", None, {0, 5}),
        (E.EmulatorPlan(6, drop=0.0), None, "all", ("q_proj", "down_proj"), set(range(6))),
    ],
    ids=["even-all", "even-adapter", "importance-all-linear", "sandwich", "full-mode"],
)
def test_every_placement_plugs_into_the_full_model(
    tmp_path, plan, importance, lora_layers, targets, layers
):
    from peft import PeftModel

    full = tiny_causal_lm(layers=6)
    emulator, info = E.build(full, plan, "tiny", importance)
    config = TrainConfig(
        steps=4,
        lr=1e-2,
        batch_size=2,
        seq_len=32,
        rank=4,
        alpha=8,
        lora_layers=lora_layers,
        target_modules=targets,
    )
    result = personalize(USER, emulator, info, tiny_tokenizer(), config, full_model=full)
    assert result.perplexity["emulator_adapter"] < result.perplexity["emulator_start"]
    assert set(result.perplexity) == {"emulator_start", "emulator_adapter", "base", "full_adapter"}
    write_lora(result.lora, tmp_path / "alice", {"emulator": info.version})
    keys = load_file(tmp_path / "alice" / "adapter_model.safetensors")
    assert {int(k.split(".layers.")[1].split(".")[0]) for k in keys} == layers  # full indices
    assert read_adapter(tmp_path / "alice").config["layers_to_transform"] == sorted(layers)
    modules = {k.split(".")[-3] for k in keys}
    assert modules == set(targets or ("q_proj", "v_proj"))

    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        expected = hand_merged(tmp_path / "alice")(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(tiny_causal_lm(layers=6), tmp_path / "alice")
        got = peft_model(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, full(input_ids=ids).logits, atol=1e-3)  # the LoRA matters
    # The emulator and the full model are left bare: no LoRA layers remain.
    assert not any("lora_" in n for n, _ in emulator.named_modules())
    assert not any("lora_" in n for n, _ in full.named_modules())


def test_the_correction_turns_an_emulator_step_into_the_full_models_step(setup):
    """When the client's text is the public text, g_emu(text) + (g_full − g_emu)(public) is
    g_full(text) exactly: the corrected step on the emulator is the full model's own step."""
    full, emulator, info, tokenizer = setup
    config = replace(CONFIG, steps=1)
    blocks = lm.token_blocks(tokenizer, TEXT, config.seq_len)[:2]
    start = fresh_lora(emulator, info, config)
    start.tensors = {k: v + 0.01 * torch.randn_like(v) for k, v in start.tensors.items()}
    pad = tokenizer.pad_token_id
    correction = gradient_correction(
        full, emulator, info, start, blocks, pad, batches=1, batch_size=2, precision="fp32"
    )
    assert set(correction) == set(start.tensors)
    on_emulator, _ = train_lora(emulator, info, blocks, pad, config, start, correction=correction)
    _, exact = E.build(full, E.EmulatorPlan(6, drop=0.0), "tiny")
    on_full, _ = train_lora(full, exact, blocks, pad, config, start)
    uncorrected, _ = train_lora(emulator, info, blocks, pad, config, start)
    for key, value in on_full.tensors.items():
        assert torch.allclose(on_emulator.tensors[key], value, atol=1e-6), key
    assert any(
        not torch.allclose(uncorrected.tensors[k], v, atol=1e-4) for k, v in on_full.tensors.items()
    )
    assert gradient_correction(full, full, exact, start, blocks, pad) == {}  # full mode: none


def test_training_continues_from_a_starting_adapter(setup, tmp_path):
    _full, emulator, info, tokenizer = setup
    first = personalize(USER, emulator, info, tokenizer, CONFIG)
    write_lora(first.lora, tmp_path / "start")
    second = personalize(
        USER, emulator, info, tokenizer, CONFIG, start=read_lora(tmp_path / "start")
    )
    assert second.perplexity["emulator_start"] == pytest.approx(
        first.perplexity["emulator_adapter"], rel=1e-5
    )
    assert second.perplexity["emulator_adapter"] < first.perplexity["emulator_adapter"]


def test_later_rounds_continue_the_data_order_instead_of_repeating_it():
    """A federation's round r trains on the batches after rounds 1..r-1's: with 10 blocks,
    2 per step and 3 steps a round, two rounds see every block, where two rounds drawn
    from the start would both see the same 6."""
    from soppu.server.config import ClientTraining, FederationConfig

    blocks = [torch.full((4,), i) for i in range(10)]

    def seen(config: TrainConfig) -> list[list[int]]:
        batches = lm.training_batches(blocks, 2, config.steps, 0, config.seed, config.first_step)
        return [b.ids[:, 0].tolist() for b in batches]

    federation = FederationConfig(training=ClientTraining(local_steps=3, batch_size=2), seed=5)
    rounds = [seen(federation.train(r)) for r in (1, 2)]
    assert rounds[0] + rounds[1] == seen(TrainConfig(steps=6, seed=5))
    first_epoch = [i for step in rounds[0] + rounds[1] for i in step][:10]
    assert sorted(first_epoch) == list(range(10))
    assert seen(federation.train(1)) == seen(federation.train(1))  # deterministic
    with pytest.raises(ValueError, match="first step"):
        TrainConfig(first_step=-1)


def test_a_warm_up_step_gathers_adams_moments_without_moving(setup):
    """transformers' warm-up starts at lr 0: with one warm-up step of two, the run is a single
    AdamW step at the full lr whose moments saw both batches' gradients at the start (bias
    corrected for two steps), so a restarted optimiser's first step is no longer ±lr."""
    from soppu.personalize import attached, lora_parameters

    _full, emulator, info, tokenizer = setup
    config = replace(CONFIG, steps=2, lr_scheduler_type="constant_with_warmup", warmup_steps=1)
    blocks = lm.token_blocks(tokenizer, TEXT, config.seq_len)
    pad = tokenizer.pad_token_id
    start = fresh_lora(emulator, info, config)
    start.tensors = {k: v + 0.01 * torch.randn_like(v) for k, v in start.tensors.items()}
    trained, _ = train_lora(emulator, info, blocks, pad, config, start)

    grads = []
    with attached(emulator, info.lora_on_emulator(start), trainable=True) as model:
        model.train()
        params = lora_parameters(model)
        for batch in lm.training_batches(blocks, 2, 2, pad, config.seed):
            lm.lm_loss(model, batch).backward()
            grads.append({k: p.grad.clone() for k, p in params.items()})
            model.zero_grad(set_to_none=True)
        model.eval()
    (b1, b2), eps = (0.9, 0.999), 1e-8
    for key, value in info.lora_on_emulator(start).tensors.items():
        g1, g2 = grads[0][key], grads[1][key]
        m = (b1 * (1 - b1) * g1 + (1 - b1) * g2) / (1 - b1**2)
        v = (b2 * (1 - b2) * g1**2 + (1 - b2) * g2**2) / (1 - b2**2)
        expected = value - config.lr * m / (v.sqrt() + eps)
        got = info.lora_on_emulator(trained).tensors[key]
        assert torch.allclose(got, expected, atol=1e-6), key
    no_warm_up = replace(config, lr_scheduler_type="constant", warmup_steps=0)
    constant, _ = train_lora(emulator, info, blocks, pad, no_warm_up, start)
    assert any(not torch.allclose(constant.tensors[k], v) for k, v in trained.tensors.items())


def test_bad_lr_schedules_are_refused():
    with pytest.raises(ValueError, match="not one of"):
        TrainConfig(lr_scheduler_type="cosine_with_restarts")
    with pytest.raises(ValueError, match=r"in \[0, steps\)"):
        TrainConfig(steps=3, warmup_steps=3, lr_scheduler_type="cosine")


def test_a_starting_adapter_on_other_layers_is_refused(setup, tmp_path):
    _full, emulator, info, tokenizer = setup
    lora = personalize(USER, emulator, info, tokenizer, CONFIG).lora
    moved = {k.replace("layers.4.", "layers.1."): v for k, v in lora.tensors.items()}
    with pytest.raises(E.EmulatorError, match="not a layer of this emulator"):
        personalize(USER, emulator, info, tokenizer, CONFIG, start=type(lora)(moved, lora.config))


def test_nan_starting_adapter_is_refused(setup, tmp_path):
    _full, emulator, info, tokenizer = setup
    lora = personalize(USER, emulator, info, tokenizer, CONFIG).lora
    key = next(iter(lora.tensors))
    lora.tensors[key][0, 0] = float("nan")
    write_lora(lora, tmp_path / "bad")
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
        12,
        "--seq-len",
        32,
        "--threads",
        1,
    )
    assert "adapter layers (trained by users): [4, 5]" in out and "alignment on public" in out
    info = E.read_info(tmp_path / "emu")
    assert info.alignment["after"]["loss"] < 0.9 * info.alignment["before"]["loss"]  # it aligns
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
        "--lora-rank",
        4,
        "--threads",
        1,
    )
    assert "full model + adapter" in out
    training = json.loads((tmp_path / "alice" / "training.json").read_text())
    assert training["emulator"] == info.version and len(training["train_loss"]) == 3
    assert read_adapter(tmp_path / "alice").modules  # a valid PEFT dir for the compressor
    # unset, the emulator mode's LoRA: every projection of every layer the emulator holds
    config = json.loads((tmp_path / "alice" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == info.full_layers and len(info.full_layers) == 3
    assert {"down_proj", "k_proj", "q_proj"} <= set(config["target_modules"])

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
    emulator, info = E.build(full, E.EmulatorPlan(6, top=2, drop=0.5, select="even"), "tiny-gpt2")
    assert info.layers_path == "transformer.h" and emulator.config.n_layer == 4
    result = personalize(USER, emulator, info, tiny_tokenizer(), CONFIG, full_model=full)
    assert result.lora.config["target_modules"] == ["c_attn"]
    assert result.perplexity["emulator_adapter"] < result.perplexity["emulator_start"]
    write_lora(result.lora, tmp_path / "gpt2")
    ids = torch.randint(0, 300, (1, 16))
    assert not full.training and not emulator.training  # left as found: dropout off
    by_hand = hand_merged(tmp_path / "gpt2", model=copy.deepcopy(full))
    with torch.no_grad():
        bare = full(input_ids=ids).logits
        expected = by_hand(input_ids=ids).logits
        plugged = PeftModel.from_pretrained(full, tmp_path / "gpt2")(input_ids=ids).logits
    torch.testing.assert_close(plugged, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(plugged, bare, atol=1e-4)  # the adapter does something
