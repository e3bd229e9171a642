"""The language-model arithmetic every judgement rests on: per-block NLL sums and token
counts (what the paired intervals resample) equal the next-token losses computed by hand,
padding included, and agree with the training loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_causal_lm

from soppu import lm


def test_block_nll_is_each_blocks_next_token_loss_padding_excluded():
    torch.manual_seed(0)
    model = tiny_causal_lm(layers=2).eval()
    blocks = [
        torch.randint(1, 300, (n,)) for n in (9, 4, 7, 1, 12)
    ]  # a 1-token block predicts nothing
    sums, counts = lm.block_nll(model, blocks, pad_id=0, batch_size=2)

    assert counts.tolist() == [8, 3, 6, 0, 11]
    with torch.no_grad():
        for block, total in zip(blocks, sums.tolist(), strict=True):
            logits = model(input_ids=block[None]).logits[0, :-1]
            by_hand = float(F.cross_entropy(logits, block[1:], reduction="sum"))
            assert total == pytest.approx(by_hand, rel=1e-5, abs=1e-6)
    assert sums.dtype == torch.float64

    same_length = blocks[0][None].repeat(3, 1)
    loss = lm.lm_loss(model, lm.collate(list(same_length), 0))
    assert lm.perplexity(model, list(same_length), 0) == pytest.approx(
        math.exp(float(loss)), rel=1e-5
    )
