"""The serving API's completions route as a client asks it: scoring text (`echo`,
`max_tokens: 0`, `logprobs`), and the base model's name (`/info`).

Plain HTTP with the standard library, so that whatever scores text on the user's side (`soppu
score`, a node's repair teacher) asks `soppu serve` and vLLM alike, and says in one line what
went wrong.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

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


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read()).get("error", exc.reason))[:300]
    except (ValueError, AttributeError, OSError):
        return str(exc.reason)
