"""Left padding: prompts of different lengths in one batch, and a running batch's KV cache
and attention mask widened to take newcomers (padding on the left keeps every row's latest
token in the last column)."""

from __future__ import annotations

import torch
from torch import Tensor


def left_padded(prompts: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    """Token ids right-aligned in one [batch, longest] tensor, and their attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    return ids, mask


def left_pad(tensor: Tensor, width: int) -> Tensor:
    missing = width - tensor.shape[2]
    if missing == 0:
        return tensor
    pad = tensor.new_zeros(*tensor.shape[:2], missing, tensor.shape[3])
    return torch.cat([pad, tensor], dim=2)


def left_pad_mask(mask: Tensor, width: int) -> Tensor:
    missing = width - mask.shape[1]
    return torch.cat([mask.new_zeros(mask.shape[0], missing), mask], 1) if missing else mask
