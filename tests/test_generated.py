"""Data-free alignment: public text the full model writes itself, cached, and an emulator
aligned on it that copies the full model better on text it never saw."""

from __future__ import annotations

import torch
from helpers import SAMPLE_TEXT, tiny_causal_lm, tiny_tokenizer

from soppu import lm
from soppu.alignment import AlignConfig, build_aligned, measure
from soppu.emulator import EmulatorPlan
from soppu.generated import GenerationConfig, generated_text


def test_the_full_models_own_text_is_cached_and_aligns_the_emulator_on_unseen_text(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("SOPPU_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    full, tokenizer = tiny_causal_lm(layers=6), tiny_tokenizer()
    config = GenerationConfig(samples=48, tokens=32, batch_size=16)
    texts = generated_text(full, tokenizer, config)
    assert len(texts) == 48 and len(set(texts)) == 48  # each sample its own
    assert all(len(tokenizer(t)["input_ids"]) >= 16 for t in texts)

    # The second call reads the cache: the same texts, and no sampling.
    def sample_again(**_):
        raise AssertionError("sampled again instead of reading the cache")

    monkeypatch.setattr(full, "generate", sample_again)
    assert generated_text(full, tokenizer, config) == texts
    assert len(list((tmp_path / "cache" / "generated").iterdir())) == 1

    plan = EmulatorPlan(6, top=2, drop=0.5, select="even")
    align = AlignConfig(steps=40, lr=3e-3, seq_len=32, eval_blocks=2)
    unseen = lm.token_blocks(tokenizer, SAMPLE_TEXT * 6, 32)  # the users' kind of text
    pad = tokenizer.pad_token_id
    raw, info = build_aligned(full, tokenizer, "tiny", plan, texts, AlignConfig(steps=0))
    aligned, aligned_info = build_aligned(full, tokenizer, "tiny", plan, texts, align)
    assert aligned_info.aligned and not info.aligned
    before = measure(full, raw, info, unseen, pad, 4)
    after = measure(full, aligned, aligned_info, unseen, pad, 4)
    assert after.kl < 0.8 * before.kl
