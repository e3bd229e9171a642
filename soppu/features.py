"""A split client's features: what the full model's lower layers compute for the client's text.

A split client (`--client-mode split`) holds only the top layers of the model (with the
embeddings and head); the layers below run where the full model is. Their output for a block of
the user's text, the hidden states entering the client's first layer, does not depend on the
client's LoRA (which sits on the top layers only), so it is asked for once per block and the
client trains on it exactly as on the full model: the same loss, the same gradient (tested).

`FeatureSource` is the interface; `ApiFeatures` asks `soppu serve` (`/v1/hidden_states`, a real
node's `teacher-url`), `LocalFeatures` computes the answer with the full model in the client's
own process (simulation, where the client's machine is the server's), `ModelFeatures` with a
full model already in hand (`soppu personalize`, and the serving route itself). `attach` makes a
split emulator take the features of whatever batch it is given, from a bounded cache of blocks
already answered, asking the source for the rest.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from functools import lru_cache
from typing import Protocol

import torch
from torch import Tensor, nn

from soppu import lm
from soppu.emulator import EmulatorInfo
from soppu.errors import SoppuError

CACHED_BLOCKS = 512  # ≈ 150 MB of fp32 features at SmolLM2-135M's 576 × 128 a block


class FeatureError(SoppuError, RuntimeError):
    """No features for a split client: no source, or an answer that does not fit."""


class FeatureSource(Protocol):
    def hidden_states(self, blocks: list[Tensor]) -> list[Tensor]:
        """For each block of token ids, the hidden states entering the split layer, one row
        per token: [len(block), hidden]."""
        ...


class ModelFeatures:
    """The full model in hand stops at the split layer: what the server would answer."""

    def __init__(self, model: nn.Module, pad_id: int, layer: int, batch_size: int = 4) -> None:
        self.model, self.pad_id, self.layer, self.batch_size = model, pad_id, layer, batch_size

    @torch.no_grad()
    def hidden_states(self, blocks: list[Tensor]) -> list[Tensor]:
        answers = []
        for start in range(0, len(blocks), self.batch_size):
            rows = blocks[start : start + self.batch_size]
            states = entering(self.model, lm.collate(rows, self.pad_id), self.layer)
            answers += [states[i, : len(ids)].float().cpu() for i, ids in enumerate(rows)]
        return answers


class LocalFeatures:
    """The full model loaded in this process (once, kept): a simulated node's source."""

    def __init__(self, base_model: str, layer: int) -> None:
        self.base_model, self.layer = base_model, layer

    def hidden_states(self, blocks: list[Tensor]) -> list[Tensor]:
        model, pad_id = _full_model(self.base_model)
        return ModelFeatures(model, pad_id, self.layer).hidden_states(blocks)


@lru_cache(maxsize=1)
def _full_model(base_model: str) -> tuple[nn.Module, int]:
    from soppu import basemodel

    full = basemodel.load(base_model or None)
    return full.model, full.tokenizer.pad_token_id


class _Stop(Exception):
    def __init__(self, states: Tensor) -> None:
        self.states = states


def entering(model: nn.Module, batch: lm.Batch, layer: int) -> Tensor:
    """The hidden states entering decoder layer `layer` of `model` for `batch` (fp32), without
    running the layers from there up or the head."""
    from soppu.emulator import layers_path

    target = model.get_submodule(layers_path(model))[layer]

    def stop(_module, args, kwargs):
        raise _Stop(args[0] if args else kwargs["hidden_states"])

    handle = target.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        lm.forward(model, batch)
    except _Stop as stopped:
        return stopped.states.detach()
    finally:
        handle.remove()
    raise FeatureError(f"decoder layer {layer} was never reached")


def attach(model: nn.Module, info: EmulatorInfo, source: FeatureSource) -> None:
    """Make the split emulator `model` take, for every batch it runs, the features of its rows
    in place of its own first layer's input (the embeddings, which the full model's lower
    layers would have turned into them), asking `source` for blocks not cached yet. The hooks
    go in once per model; a later call changes only whom it asks."""
    bank = getattr(model, "_soppu_features", None)
    if bank is not None:
        bank.source = source
        return
    bank = _Bank(source)
    path = info.layers_path
    stack = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    first = model.get_submodule(path)[0]
    seen: dict[str, Tensor | None] = {}

    def remember(_module, args, kwargs):
        seen["ids"] = kwargs.get("input_ids", args[0] if args else None)
        seen["mask"] = kwargs.get("attention_mask")

    def replace(_module, args, kwargs):
        states = args[0] if args else kwargs["hidden_states"]
        features = bank.batch(seen.get("ids"), seen.get("mask"), states)
        if args:
            return (features, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": features}

    stack.register_forward_pre_hook(remember, with_kwargs=True)
    first.register_forward_pre_hook(replace, with_kwargs=True)
    model._soppu_features = bank


class _Bank:
    """Features by block, the most recently used `CACHED_BLOCKS` kept."""

    def __init__(self, source: FeatureSource) -> None:
        self.source = source
        self._blocks: OrderedDict[bytes, Tensor] = OrderedDict()

    def batch(self, ids: Tensor | None, mask: Tensor | None, like: Tensor) -> Tensor:
        """The features of the batch's rows, right-padded with zeros to its length."""
        if ids is None:
            raise FeatureError("a split client's model is run on token ids only")
        mask = torch.ones_like(ids) if mask is None else mask
        lengths = [int(m.sum()) for m in mask]
        if any(not bool(m[:n].all()) for m, n in zip(mask, lengths, strict=True)):
            raise FeatureError("a split client's batches are padded on the right only")
        rows = [row[:n].cpu() for row, n in zip(ids, lengths, strict=True)]
        found = self.lookup(rows)
        out = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
        for i, states in enumerate(found):
            if states.shape != (len(rows[i]), like.shape[-1]):
                raise FeatureError(
                    f"features of shape {tuple(states.shape)} for a block of {len(rows[i])} "
                    f"tokens and hidden size {like.shape[-1]}"
                )
            out[i, : len(rows[i])] = states.to(like.device, like.dtype)
        return out

    def lookup(self, rows: list[Tensor]) -> list[Tensor]:
        keys = [row.numpy().tobytes() for row in rows]
        missing = {k: row for k, row in zip(keys, rows, strict=True) if k not in self._blocks}
        if missing:
            answers = self.source.hidden_states(list(missing.values()))
            if len(answers) != len(missing):
                raise FeatureError(f"{len(answers)} answers for {len(missing)} blocks")
            self._blocks.update(zip(missing, answers, strict=True))
        for key in keys:
            self._blocks.move_to_end(key)
        found = [self._blocks[k] for k in keys]
        while len(self._blocks) > CACHED_BLOCKS:
            self._blocks.popitem(last=False)
        return found


class ApiFeatures:
    """`soppu serve`'s `/v1/hidden_states`: the model owner's side computes them."""

    BLOCKS = 16  # per request, the route's limit

    def __init__(self, url: str, layer: int, api_key: str | None = None) -> None:
        self.url, self.layer, self.api_key = url, layer, api_key

    def hidden_states(self, blocks: list[Tensor]) -> list[Tensor]:
        from soppu.completions import hidden_states

        answers = []
        for start in range(0, len(blocks), self.BLOCKS):
            rows = [b.tolist() for b in blocks[start : start + self.BLOCKS]]
            try:
                states = hidden_states(self.url, rows, self.layer, self.api_key)
            except SoppuError as exc:
                raise FeatureError(str(exc)) from None
            answers += [torch.from_numpy(s) for s in states]
        return answers


class NoFeatures(LookupError):
    """A split client with nowhere to ask for its features."""


def for_node(node_config: Mapping[str, object], base_model: str, layer: int) -> FeatureSource:
    """`teacher-url` (with `teacher-key`, else $SOPPU_API_KEY): that `soppu serve`, which must
    serve the run's base model; a simulated node (no `user-id` of its own): the full model in
    this process; a real node without a teacher-url has nowhere to ask."""
    url = str(node_config.get("teacher-url", ""))
    if url:
        key = str(node_config.get("teacher-key", "")) or os.environ.get("SOPPU_API_KEY")
        return ApiFeatures(url, layer, key or None)
    if "user-id" in node_config:
        raise NoFeatures(
            "the server runs split mode (client-mode split), whose clients need the full "
            "model's hidden states for their text, and this node's config names no teacher-url "
            "(a soppu serve of the run's base model, whose /v1/hidden_states answers them)"
        )
    return LocalFeatures(base_model, layer)
