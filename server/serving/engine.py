"""Continuous batching: requests join and leave the running batch token by token.

One thread owns the model. Each turn it admits waiting requests (up to `max_batch`; when the
batch is empty it waits at most `max_wait` for company), prefills the newcomers together,
merges their KV cache into the running batch's, and runs one decode step for every active
row; finished rows leave at once. Rows are left-padded to a common length, with an attention
mask and per-row positions, so a long generation never holds back a short one.

Every row names its user by a core row of the shared adapters (0: the base model); a new
serving version is swapped in between two steps and active rows are re-pointed by user id.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from server.serving.shared_lora import SharedAdapters, SharedLoRALinear, batch_users, install


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 20
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    do_sample: bool = False
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


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
    finish_reason: str | None = None
    error: str | None = None
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    generator: torch.Generator | None = None
    text: str = ""

    def __post_init__(self) -> None:
        if self.sampling.seed is not None:
            self.generator = torch.Generator().manual_seed(self.sampling.seed)


class UnknownUser(KeyError):
    pass


class Engine:
    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        adapters: SharedAdapters,
        *,
        max_batch: int = 64,
        max_wait: float = 0.005,
        on_step: Callable[[int, float], None] = lambda batch, seconds: None,
    ):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.layers: dict[str, SharedLoRALinear] = install(model, adapters)
        self.adapters = adapters
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.on_step = on_step
        self.eos = {tokenizer.eos_token_id} - {None}
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.pending_adapters: SharedAdapters | None = None
        self.active: list[Request] = []
        self.rows = torch.zeros(0, dtype=torch.long)
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.cache: DynamicCache | None = None
        self.merges = 0  # times newcomers joined a running batch
        self.swaps: list[tuple[str, int]] = []  # (version, rows in flight) at each swap
        self.device = next(model.parameters()).device
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="soppu-engine", daemon=True)

    # ------------------------------------------------------------------ the callers' side

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def submit(self, request: Request) -> None:
        if request.user is not None and request.user not in self.users:
            raise UnknownUser(request.user)
        self.waiting.put(request)

    def swap(self, adapters: SharedAdapters) -> None:
        """Use `adapters` from the next step on (requests in flight keep going)."""
        self.pending_adapters = adapters

    @property
    def users(self) -> dict[str, int]:
        return (self.pending_adapters or self.adapters).users

    # ------------------------------------------------------------------ the engine thread

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.pending_adapters is not None:
                self._apply_swap()
            newcomers = self._admit()
            try:
                if newcomers:
                    self._prefill(newcomers)
                if self.active:
                    self._decode()
            except Exception as exc:  # a broken batch fails its requests, not the server
                for request in [*self.active, *newcomers]:
                    if request.finish_reason is None:
                        request.error = f"{type(exc).__name__}: {exc}"
                        request.finish_reason = "error"
                        request.on_event(None)
                self.active, self.cache = [], None

    def _admit(self) -> list[Request]:
        room = self.max_batch - len(self.active)
        admitted: list[Request] = []
        if room <= 0:
            return admitted
        if not self.active:  # idle: wait for the first request, then briefly for company
            try:
                admitted.append(self.waiting.get(timeout=0.1))
            except queue.Empty:
                return admitted
            deadline = time.perf_counter() + self.max_wait
            while len(admitted) < room and (left := deadline - time.perf_counter()) > 0:
                try:
                    admitted.append(self.waiting.get(timeout=left))
                except queue.Empty:
                    break
        while len(admitted) < room:
            try:
                admitted.append(self.waiting.get_nowait())
            except queue.Empty:
                break
        return admitted

    def _row(self, request: Request) -> int:
        return 0 if request.user is None else self.adapters.users.get(request.user, 0)

    def _apply_swap(self) -> None:
        adapters, self.pending_adapters = self.pending_adapters, None
        self.layers = install(self.model, adapters)
        self.adapters = adapters
        self.swaps.append((adapters.version, len(self.active)))
        self.rows = torch.tensor([self._row(r) for r in self.active], dtype=torch.long)

    @torch.no_grad()
    def _prefill(self, requests: list[Request]) -> None:
        began = time.perf_counter()
        ids, mask = left_padded([r.prompt for r in requests], self.pad)
        rows = torch.tensor([self._row(r) for r in requests], dtype=torch.long)
        cache = DynamicCache()
        logits = self._forward(ids, mask, rows, cache)
        self._merge(requests, rows, mask, cache)
        self._emit(requests, logits[:, -1])
        self.on_step(len(requests), time.perf_counter() - began)

    @torch.no_grad()
    def _decode(self) -> None:
        began = time.perf_counter()
        last = torch.tensor([[r.tokens[-1].id] for r in self.active], dtype=torch.long)
        self.mask = torch.cat([self.mask, torch.ones(len(self.active), 1, dtype=torch.long)], 1)
        logits = self._forward(last, self.mask, self.rows, self.cache)
        self._emit(self.active, logits[:, -1])
        self.on_step(len(self.active), time.perf_counter() - began)

    def _forward(self, ids: Tensor, mask: Tensor, rows: Tensor, cache: DynamicCache) -> Tensor:
        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1] :]
        with batch_users(self.layers, rows):
            out = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                past_key_values=cache,
                use_cache=True,
            )
        return out.logits.float().cpu()

    def _merge(self, requests: list[Request], rows: Tensor, mask: Tensor, cache) -> None:
        """Append the newcomers' rows to the running batch, left-padding the shorter side."""
        if not self.active:
            self.active, self.rows, self.mask, self.cache = list(requests), rows, mask, cache
            return
        self.merges += 1
        old, new = self.mask.shape[1], mask.shape[1]
        width = max(old, new)
        merged = DynamicCache()
        for index, (mine, theirs) in enumerate(zip(self.cache.layers, cache.layers, strict=True)):
            keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
            merged.update(keys, values, index)
        self.mask = torch.cat([_left_pad_mask(self.mask, width), _left_pad_mask(mask, width)])
        self.rows = torch.cat([self.rows, rows])
        self.active = [*self.active, *requests]
        self.cache = merged

    def _emit(self, requests: list[Request], logits: Tensor) -> None:
        logprobs = torch.log_softmax(logits, dim=-1)
        for i, request in enumerate(requests):
            token = _choose(logits[i], request.sampling, request.generator)
            previous = request.text
            ids = [t.id for t in request.tokens] + [token]
            request.text = self.tokenizer.decode(ids, skip_special_tokens=True)
            piece = Token(
                token, request.text[len(previous) :], float(logprobs[i, token]), token in self.eos
            )
            request.tokens.append(piece)
            if request.first_token_at is None:
                request.first_token_at = time.perf_counter()
            request.finish_reason = _finish(request, token in self.eos)
            request.on_event(piece)
            if request.finish_reason is not None:
                request.on_event(None)
        keep = [i for i, r in enumerate(self.active) if r.finish_reason is None]
        if len(keep) < len(self.active):  # finished rows leave the batch at once
            self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        if not keep:
            self.active, self.cache = [], None
            self.rows = torch.zeros(0, dtype=torch.long)
            self.mask = torch.zeros(0, 0, dtype=torch.long)
            return
        index = torch.tensor(keep, dtype=torch.long)
        self.active = [self.active[i] for i in keep]
        self.rows, self.mask = self.rows[index], self.mask[index]
        start = int((self.mask.sum(0) > 0).nonzero()[0])  # columns that are padding for all
        for layer in self.cache.layers:
            layer.keys = layer.keys[index.to(layer.keys.device), :, start:]
            layer.values = layer.values[index.to(layer.values.device), :, start:]
        self.mask = self.mask[:, start:]


def left_padded(prompts: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    """Token ids right-aligned in one [batch, longest] tensor, and their attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    return ids, mask


def _left_pad(tensor: Tensor, width: int) -> Tensor:
    missing = width - tensor.shape[2]
    if missing == 0:
        return tensor
    pad = tensor.new_zeros(*tensor.shape[:2], missing, tensor.shape[3])
    return torch.cat([pad, tensor], dim=2)


def _left_pad_mask(mask: Tensor, width: int) -> Tensor:
    missing = width - mask.shape[1]
    return torch.cat([mask.new_zeros(mask.shape[0], missing), mask], 1) if missing else mask


def _choose(logits: Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    if not sampling.do_sample or sampling.temperature <= 0:
        return int(logits.argmax())
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.numel():
        cutoff = logits.topk(sampling.top_k).values[-1]
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < sampling.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _finish(request: Request, eos: bool) -> str | None:
    if eos and not request.sampling.ignore_eos:
        return "eos_token"
    if any(stop and request.text.endswith(stop) for stop in request.sampling.stop):
        return "stop_sequence"
    if len(request.tokens) >= request.sampling.max_new_tokens:
        return "length"
    return None


def event_sink(loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Callable:
    """`on_event` for a request awaited from an asyncio handler."""
    return lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
