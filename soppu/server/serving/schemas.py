"""What a request may ask for, checked before it joins a batch: every refusal is a 4xx with
one line naming the field, never an error later in the engine for the whole batch.

Floats must be finite (JSON `1e309` parses as inf, `NaN` as nan), temperatures positive
(OpenAI's 0 is greedy), 0 < top_p ≤ 1, top_k ≥ 1, seeds in 0..2**64-1 (what
`torch.Generator.manual_seed` takes; it would alias negative ones), at most 16 stop sequences.
Token limits are checked once the prompt is tokenised (api.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from soppu.server.serving.sampling import Sampling

SEED_MAX = 2**64 - 1
MAX_STOP = 16  # each stop sequence is checked after every token of the row
MAX_LOGPROBS = 5  # alternatives per position, as OpenAI's legacy completions allow
MAX_FEATURE_BLOCKS = 16  # blocks of token ids per hidden-states request


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def error_body(path: str, message: str, kind: str, status: int | None = None) -> dict[str, Any]:
    """An error as its route's clients expect it: OpenAI's shape on /v1/…, LoRAX's elsewhere."""
    if path.startswith("/v1/"):
        return {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return {"error": message, "error_type": kind}


Stops = Annotated[list[str], Field(max_length=MAX_STOP)]


class Parameters(BaseModel):
    model_config = ConfigDict(extra="allow")  # lorax-client sends every field, mostly null

    adapter_id: str | None = None
    adapter_source: str | None = None
    max_new_tokens: int | None = Field(default=20, ge=1)
    temperature: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    do_sample: bool = False
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    stop: Stops = Field(default_factory=list)
    details: bool = False
    decoder_input_details: bool = False  # details.prefill: each input token's logprob
    return_full_text: bool | None = False
    top_k: int | None = Field(default=None, ge=1)
    ignore_eos_token: bool = False
    best_of: int | None = None

    @field_validator("best_of")
    @classmethod
    def _one(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("best_of > 1 is not supported")
        return value

    @model_validator(mode="after")
    def _nothing_silently_ignored(self) -> Parameters:
        """lorax-client sends every field; those at their neutral value are fine, anything
        else this server does not do is refused by name rather than ignored."""
        neutral = {"repetition_penalty": 1.0, "api_token": None}
        for name, value in (self.model_extra or {}).items():
            if value in (None, False, [], {}) or neutral.get(name, object()) == value:
                continue
            if name == "api_token":
                continue  # adapters are local: there is nothing to authenticate against
            raise ValueError(f"{name}={value!r} is not supported by soppu serve")
        return self

    def sampling(self) -> Sampling:
        return Sampling(
            max_new_tokens=self.max_new_tokens or 20,
            temperature=self.temperature or 1.0,
            top_p=self.top_p or 1.0,
            top_k=self.top_k,
            do_sample=self.do_sample,
            seed=self.seed,
            stop=tuple(self.stop),
            ignore_eos=self.ignore_eos_token,
        )


class GenerateRequest(BaseModel):
    inputs: str
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = ""
    prompt: str
    max_tokens: int | None = Field(default=16, ge=0)  # 0 with echo: score the prompt only
    echo: bool = False  # the prompt comes back before the completion (with its logprobs)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    temperature: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    stop: str | Stops | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    # vLLM's extension: tokens as "token_id:<id>", which a client maps back without the
    # tokenizer's ambiguity (two ids can decode to one string)
    return_tokens_as_token_ids: bool = False

    @model_validator(mode="after")
    def _something_to_return(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 returns nothing without echo (echo scores the prompt)")
        if self.stream and (self.echo or self.logprobs is not None):
            raise ValueError("echo and logprobs are not supported with stream")
        return self

    def sampling(self) -> Sampling:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        temperature = 1.0 if self.temperature is None else self.temperature
        return Sampling(
            max_new_tokens=16 if self.max_tokens is None else self.max_tokens,
            temperature=temperature or 1.0,
            top_p=self.top_p or 1.0,
            do_sample=temperature > 0,  # OpenAI's temperature 0 is greedy
            seed=self.seed,
            stop=tuple(stop),
        )


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(CompletionRequest):
    prompt: str = ""
    messages: list[ChatMessage] = Field(min_length=1)

    @model_validator(mode="after")
    def _something_to_return(self) -> ChatRequest:  # replaces the completions' check
        if self.echo or self.logprobs is not None or self.max_tokens == 0:
            raise ValueError(
                "echo, logprobs and max_tokens 0 are not supported on chat completions; "
                "score text with /v1/completions (echo: true, logprobs: 0, max_tokens: 0)"
            )
        return self


def lorax_user(parameters: Parameters, serving: Path | None) -> str | None:
    """The user a LoRAX request names: a user id, or (adapter_source "local", or any id with
    a "/") the path of a published user dir inside the serving dir, SERVING/<version or
    current>/users/<user>, absolute or relative to SERVING."""
    adapter, source = parameters.adapter_id, parameters.adapter_source
    if not adapter:
        return None
    if source not in (None, "", "hub", "local"):
        raise ApiError(
            422,
            f"adapter_source {source!r} is not supported: give a user id, or 'local' with a "
            "path inside the serving dir",
            "validation",
        )
    if "/" in adapter or (source == "local" and Path(adapter).is_absolute()):
        return local_user(adapter, serving)
    return adapter  # a bare user id, with adapter_source "local" too (lorax-client's habit)


def local_user(adapter: str, serving: Path | None) -> str:
    refused = ApiError(
        404,
        f"adapter path {adapter!r} is not a published user dir in the serving dir "
        f"({serving or 'none'}/current/users/<user>)",
        "not_found",
    )
    if serving is None:
        raise refused
    try:
        root = Path(serving).resolve()
        path = Path(adapter) if Path(adapter).is_absolute() else root / adapter
        resolved = path.resolve()  # symlinks (`current`) and `..` are followed first
    except (OSError, ValueError, RuntimeError):  # NUL bytes, loops, unreadable
        raise refused from None
    if resolved.parent.name != "users" or resolved.parent.parent.parent != root:
        raise refused
    return resolved.name


class HiddenStatesRequest(BaseModel):
    """A split client's blocks, as token ids, and the layer whose input it wants for them."""

    model_config = ConfigDict(extra="forbid")

    input_ids: list[list[int]] = Field(min_length=1, max_length=MAX_FEATURE_BLOCKS)
    layer: int
