"""What a caller hands the engine, what it gets back, and how it learns of each token."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from soppu.server.serving.sampling import Sampling


@dataclass
class Token:
    id: int
    text: str
    logprob: float
    special: bool


@dataclass
class Request:
    """One generation; the engine thread fills it and signals the caller's event loop."""

    prompt: list[int]
    user: str | None  # None: the base model
    sampling: Sampling
    on_event: Callable[[Token | None], None]  # a token, then None when finished
    tokens: list[Token] = field(default_factory=list)
    finish_reason: str | None = None  # eos_token, stop_sequence, length, error, cancelled
    error: str | None = None
    error_kind: str = "generation"  # generation, not_found (user withdrawn), unavailable
    cancelled: bool = False  # set from any thread; the engine drops the row at its next step
    arrived: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    generator: torch.Generator | None = None
    text: str = ""
    # Scoring (OpenAI `echo` + `logprobs`, LoRAX `decoder_input_details`): what was asked ...
    score_prompt: bool = False  # each prompt token's logprob given the tokens before it
    top_logprobs: int = 0  # the most likely alternatives at every scored position
    # ... and what the engine found: the first prompt token has no logprob (None)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top: list[dict[int, float]] = field(default_factory=list)
    top: list[dict[int, float]] = field(default_factory=list)  # per generated token

    def __post_init__(self) -> None:
        if self.sampling.seed is not None:
            self.generator = torch.Generator().manual_seed(self.sampling.seed)


class UnknownUser(KeyError):
    pass


class EngineStopped(RuntimeError):
    """The engine thread is not running: requests cannot be answered."""


class VersionMisfit(ValueError):
    """A serving version that does not fit the loaded base model."""


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message`, for a client or a log line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")[:300]


def event_sink(loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Callable:
    """`on_event` for a request awaited from an asyncio handler. A closed loop raises, and
    the engine then drops the row: nobody is left to read it."""
    return lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
