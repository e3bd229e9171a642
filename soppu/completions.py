"""The serving API's completions route as a client asks it: scoring text (`echo`,
`max_tokens: 0`, `logprobs`), the base model's name (`/info`), and for a split client the
base model's hidden states entering a layer (`soppu serve`'s `/v1/hidden_states`).

Plain HTTP with the standard library, so that whatever scores text on the user's side (`soppu
score`, a node's repair teacher) asks `soppu serve` and vLLM alike, and says in one line what
went wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import urllib.error
import urllib.request

import numpy as np

from soppu.errors import SoppuError


def base_model_id(url: str, api_key: str | None = None) -> str:
    """The name the server gives its base model (`/info`'s `model_id`; soppu serve), "" where
    it has none to give (vLLM: pass its model name as the reference)."""
    request = urllib.request.Request(f"{url.rstrip('/')}/info", headers=_headers(api_key))
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return str(json.loads(reply.read()).get("model_id") or "")
    except (urllib.error.URLError, OSError, ValueError):
        return ""


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def echoed_logprobs(
    url: str, model: str, text: str, api_key: str | None = None, **extra: object
) -> dict:
    """The `logprobs` object of scoring `text` (echo, `max_tokens` 0): every token's logprob
    with `extra` asked for too (`logprobs: 5`, vLLM's `return_tokens_as_token_ids`)."""
    body = {"model": model, "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0}
    request = urllib.request.Request(
        f"{url.rstrip('/')}/v1/completions",
        json.dumps({**body, **extra}).encode(),
        _headers(api_key),
    )
    try:
        with urllib.request.urlopen(request, timeout=600) as reply:
            answer = json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        raise SoppuError(f"{url}: model {model!r}: {exc.code} {_error_text(exc)}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise SoppuError(f"{url}: cannot reach the server ({exc})") from None
    except ValueError:
        raise SoppuError(f"{url}: model {model!r}: the reply is not JSON") from None
    try:
        logprobs = answer["choices"][0]["logprobs"]
        if not isinstance(logprobs, dict):
            raise TypeError
    except (KeyError, IndexError, TypeError):
        raise SoppuError(f"{url}: model {model!r}: the reply has no prompt logprobs") from None
    return logprobs


def hidden_states(
    url: str, blocks: list[list[int]], layer: int, api_key: str | None = None
) -> list[np.ndarray]:
    """Each block's hidden states entering `layer` ([len(block), hidden] float32), as
    `soppu serve` computes them with its base model; the answer is checked before it is used."""
    body = {"input_ids": blocks, "layer": layer}
    request = urllib.request.Request(
        f"{url.rstrip('/')}/v1/hidden_states", json.dumps(body).encode(), _headers(api_key)
    )
    try:
        with urllib.request.urlopen(request, timeout=600) as reply:
            data = json.loads(reply.read())["data"]
        states = [_decode(item) for item in data]
    except urllib.error.HTTPError as exc:
        raise SoppuError(f"{url}: hidden states: {exc.code} {_error_text(exc)}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise SoppuError(f"{url}: cannot reach the server ({exc})") from None
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise SoppuError(f"{url}: hidden states: a malformed answer ({exc})") from None
    if len(states) != len(blocks) or any(
        s.ndim != 2 or s.shape[0] != len(b) or not np.isfinite(s).all()
        for s, b in zip(states, blocks, strict=False)
    ):
        raise SoppuError(f"{url}: hidden states: the answer does not fit the blocks sent")
    return states


def _decode(item: dict) -> np.ndarray:
    shape = [int(n) for n in item["shape"]]
    values = np.frombuffer(base64.b64decode(item["b64"], validate=True), dtype="<f4")
    return values.reshape(shape).copy()


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read()).get("error", exc.reason))[:300]
    except (ValueError, AttributeError, OSError):
        return str(exc.reason)
