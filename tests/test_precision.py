"""Mixed precision: `auto` is bf16 exactly where the device computes it natively, bf16 runs the
training under autocast (its losses move by bf16 rounding, not more) and keeps the LoRA fp32,
fp32 never autocasts, and a precision that is not one of the three is refused by name."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import tiny_causal_lm, tiny_tokenizer

from soppu import emulator as E
from soppu import lm, precision
from soppu.alignment import AlignConfig, align
from soppu.personalize import TrainConfig, fresh_lora, train_lora
from soppu.server.config import FederationConfig

TEXT = "\n".join(f"line {i}: to be, or not to be, that is the question" for i in range(30))
CONFIG = TrainConfig(steps=3, lr=1e-2, batch_size=2, seq_len=32, rank=4, alpha=8)


@pytest.mark.parametrize(
    "avx512_bf16, amx, expected",
    [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")],
)
def test_auto_is_bf16_where_the_cpu_computes_it_natively(monkeypatch, avx512_bf16, amx, expected):
    # raising=False: older torch (2.4) has only some of these probes; precision.py allows that
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert precision.resolve("auto", "cpu") == expected
    assert precision.resolve("fp32", "cpu") == "fp32"  # asked for, whatever the CPU
    assert precision.resolve("bf16", "cpu") == "bf16"


def test_auto_is_fp32_on_a_cuda_device_torch_cannot_see(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.resolve("auto", "cuda") == "fp32"


@pytest.mark.parametrize("chosen, on", [("bf16", True), ("fp32", False)])
def test_autocast_is_on_for_bf16_only(chosen, on):
    with precision.autocast(chosen, "cpu"):
        assert torch.is_autocast_enabled("cpu") is on
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == (
            torch.bfloat16 if on else torch.float32
        )
    assert not torch.is_autocast_enabled("cpu")


def test_bf16_training_moves_the_loss_by_rounding_only_and_keeps_the_lora_fp32():
    full = tiny_causal_lm(layers=4)
    emulator, info = E.build(full, E.EmulatorPlan(4, top=1, drop=0.5, select="even"), "tiny")
    tokenizer = tiny_tokenizer()
    blocks = lm.token_blocks(tokenizer, TEXT, CONFIG.seq_len)
    start = fresh_lora(emulator, info, CONFIG)
    runs = {
        p: train_lora(
            emulator, info, blocks, tokenizer.pad_token_id, replace(CONFIG, precision=p), start
        )
        for p in ("fp32", "bf16")
    }
    (_, fp32_losses), (lora, bf16_losses) = runs["fp32"], runs["bf16"]
    assert bf16_losses != fp32_losses  # autocast really ran
    assert bf16_losses == pytest.approx(fp32_losses, rel=2e-2)
    assert all(t.dtype == torch.float32 for t in lora.tensors.values())


def test_bf16_alignment_follows_fp32s_step_by_step():
    """Autocast caches its bf16 copies of trainable weights until it exits: a context around
    the whole loop would train 30 steps on step 1's weights and land far from fp32's."""
    full = tiny_causal_lm(layers=6)
    tokenizer = tiny_tokenizer()
    blocks = lm.token_blocks(tokenizer, TEXT, 32)
    after = {}
    for chosen in ("fp32", "bf16"):
        emulator, info = E.build(full, E.EmulatorPlan(6, top=2, drop=0.5, select="even"), "t")
        config = AlignConfig(steps=30, lr=3e-3, batch_size=4, eval_blocks=4, precision=chosen)
        result = align(full, emulator, info, blocks, tokenizer.pad_token_id, config)
        assert result["after"]["loss"] < 0.8 * result["before"]["loss"]
        after[chosen] = result["after"]["loss"]
    assert after["bf16"] == pytest.approx(after["fp32"], rel=0.1)


def test_an_unknown_precision_is_refused_by_name():
    with pytest.raises(ValueError, match="precision 'fp16'"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="precision 'half'"):
        FederationConfig(precision="half")
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.resolve("fp8", "cpu")
