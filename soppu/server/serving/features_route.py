"""`POST /v1/hidden_states`: the base model's hidden states entering a layer, for a split client.

A split client (`--client-mode split`) holds the model's top layers and trains them on what
the layers below compute for its text. It sends its blocks as token ids (the text it would
send to score it) and names the layer; the answer is each block's hidden states entering that
layer, float32, base64 of the little-endian bytes, one row of `hidden` numbers per token. Any
caller with a valid key may ask (it is the base model, as `/v1/completions` with the base
model's id); a block is bounded like a prompt and a request to 16 blocks. The work runs on the
engine's thread between two generation steps.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import torch
from fastapi import APIRouter
from fastapi import Request as HttpRequest

from soppu.features import ModelFeatures
from soppu.server.serving.generation import context
from soppu.server.serving.request import EngineStopped
from soppu.server.serving.schemas import ApiError, HiddenStatesRequest

router = APIRouter()


@router.post("/v1/hidden_states")
async def hidden_states(http: HttpRequest, body: HiddenStatesRequest) -> dict[str, Any]:
    ctx = context(http)
    ctx.authorize(ctx.caller(http), None, base=True)
    engine, config = ctx.engine, ctx.engine.model.config
    if not 0 < body.layer < config.num_hidden_layers:
        message = f"layer {body.layer} is not one of 1..{config.num_hidden_layers - 1}"
        raise ApiError(422, message, "validation")
    for i, row in enumerate(body.input_ids):
        if not 0 < len(row) <= ctx.max_input_tokens:
            message = f"input_ids.{i}: {len(row)} tokens, not 1..{ctx.max_input_tokens}"
            raise ApiError(422, message, "validation")
        if min(row) < 0 or max(row) >= config.vocab_size:
            message = f"input_ids.{i}: a token id outside 0..{config.vocab_size - 1}"
            raise ApiError(422, message, "validation")
    blocks = [torch.tensor(row, dtype=torch.long) for row in body.input_ids]

    def work() -> list[torch.Tensor]:
        features = ModelFeatures(engine.model, engine.pad, body.layer, batch_size=len(blocks))
        with engine.base_rows(len(blocks)):
            return features.hidden_states(blocks)

    try:
        states = await asyncio.wrap_future(engine.call(work))
    except EngineStopped as exc:
        raise ApiError(503, str(exc), "unavailable") from None
    return {
        "object": "hidden_states",
        "model": ctx.info.get("model_id", ""),
        "layer": body.layer,
        "dtype": "float32",
        "data": [
            {"shape": list(s.shape), "b64": base64.b64encode(_le32(s)).decode()} for s in states
        ],
    }


def _le32(states: torch.Tensor) -> bytes:
    return states.float().cpu().numpy().astype("<f4", copy=False).tobytes()
