"""Continuous batching: requests join and leave the running batch token by token.

One thread owns the model. Each turn it admits waiting requests (up to `max_batch`; when the
batch is empty it waits at most `max_wait` for company), prefills the newcomers together,
merges their KV cache into the running batch's, and runs one decode step for every active
row; finished rows leave at once. Rows are left-padded to a common length, with an attention
mask and per-row positions, so a long generation never holds back a short one.

Every row names its user by a core row of the shared adapters (0: the base model); a new
serving version is swapped in between two steps and active rows are re-pointed by user id. A
version that does not fit the loaded model (modules, shapes, base model) is refused by `swap`.

Faults stay where they start. A row whose logits are NaN, or whose sampling or decoding
raises, fails alone: its request gets the error, the other rows go on. A step that raises
fails the rows in it. A cancelled request (its client went away) leaves at the next step.
Other work on the model (the base model's hidden states for a split client, `call`) runs on
the same thread between two steps, so it never races a step for the model.

Only an exception outside any step stops the thread: it is kept in `died`, every open request
is answered with an error, and `on_death` is called so that the server can exit.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from soppu.server.serving import sampling
from soppu.server.serving.padding import left_pad, left_pad_mask, left_padded
from soppu.server.serving.request import (
    EngineStopped,
    Request,
    Token,
    UnknownUser,
    VersionMisfit,
    event_sink,
    one_line,
)
from soppu.server.serving.sampling import NumericalFailure, Sampling, broken_rows, finish_reason
from soppu.server.serving.shared_lora import SharedLoRALinear, batch_users, install, misfits
from soppu.server.serving.shared_weights import SharedAdapters

__all__ = [
    "Engine",
    "EngineStopped",
    "Request",
    "Sampling",
    "Token",
    "UnknownUser",
    "VersionMisfit",
    "event_sink",
    "left_padded",
]

log = logging.getLogger("soppu.serve")


class Engine:
    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        adapters: SharedAdapters,
        *,
        max_batch: int = 64,
        max_wait: float = 0.005,
        base_model: str | None = None,
        on_step: Callable[[int, float], None] = lambda batch, seconds: None,
    ):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.base_model = base_model or adapters.base_model  # what later versions must match
        if problems := self._misfits(adapters):
            raise VersionMisfit(_misfit_message(adapters, problems))
        self.layers: dict[str, SharedLoRALinear] = install(model, adapters)
        self.adapters = adapters
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.on_step = on_step
        self.on_finish: Callable[[Request], None] = lambda request: None
        self.on_death: Callable[[BaseException], None] = lambda exc: None
        self.eos = {tokenizer.eos_token_id} - {None}
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.jobs: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self.open: dict[int, Request] = {}  # every request submitted and not yet ended
        self.pending_adapters: SharedAdapters | None = None
        self.active: list[Request] = []
        self.rows = torch.zeros(0, dtype=torch.long)
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.cache: DynamicCache | None = None
        self.merges = 0  # times newcomers joined a running batch
        self.swaps: list[tuple[str, int]] = []  # (version, rows in flight) at each swap
        self.refused: dict[str, str] = {}  # version → why it was not swapped in
        self.died: BaseException | None = None  # what stopped the engine thread
        self.device = next(model.parameters()).device
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="soppu-engine", daemon=True)

    # ------------------------------------------------------------------ the callers' side

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.died is None and not self._stop.is_set()

    def why_stopped(self) -> str:
        if self.died is not None:
            return f"the engine stopped: {one_line(self.died)}"
        return "the engine is not running"

    def submit(self, request: Request) -> None:
        if request.user is not None and request.user not in self.users:
            raise UnknownUser(request.user)
        if not self.alive:
            raise EngineStopped(self.why_stopped())
        self.open[id(request)] = request
        self.waiting.put(request)
        if not self.alive:  # it stopped meanwhile, perhaps after its last look at the queue
            self._close_all(self.why_stopped())

    def call(self, work: Callable[[], Any]) -> Future:
        """Run `work()` on the engine thread between two steps; its result or exception
        comes in the future (EngineStopped where the engine stops first)."""
        if not self.alive:
            raise EngineStopped(self.why_stopped())
        future: Future = Future()
        self.jobs.put((work, future))
        if not self.alive:  # it stopped meanwhile, perhaps after its last look at the jobs
            self._fail_jobs(self.why_stopped())
        return future

    def base_rows(self, rows: int):
        """A context in which the model computes the base model for `rows` rows."""
        return batch_users(self.layers, torch.zeros(rows, dtype=torch.long))

    def cancel(self, request: Request) -> None:
        """From any thread: the request's row leaves the batch at the next step."""
        request.cancelled = True

    def swap(self, adapters: SharedAdapters) -> None:
        """Use `adapters` from the next step on (requests in flight keep going). A version
        that does not fit the loaded model raises VersionMisfit; the current one stays."""
        if problems := self._misfits(adapters):
            self.refused[adapters.version] = _reason(problems)
            raise VersionMisfit(_misfit_message(adapters, problems))
        self.pending_adapters = adapters

    def _misfits(self, adapters: SharedAdapters) -> list[str]:
        problems = misfits(self.model, adapters)
        if self.base_model and adapters.base_model not in (None, self.base_model):
            problems.insert(
                0, f"made for base model {adapters.base_model!r}, serving {self.base_model!r}"
            )
        return problems

    @property
    def users(self) -> dict[str, int]:
        return (self.pending_adapters or self.adapters).users

    # ------------------------------------------------------------------ the engine thread

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._turn()
        except BaseException as exc:  # a bug outside any step: stop, say so, let the server go
            self.died = exc
            log.critical("the serving engine stopped: %s", one_line(exc), exc_info=exc)
            self._close_all(self.why_stopped())
            try:
                self.on_death(exc)
            except Exception:
                log.exception("on_death failed")
            return
        self._close_all("the server is shutting down")

    def _turn(self) -> None:
        self._run_jobs()
        if self.pending_adapters is not None:
            self._apply_swap()
        self._prune()
        if newcomers := self._admit():
            self._guarded(self._prefill, newcomers)  # on its own cache: fails the newcomers only
        if self.active:
            self._guarded(self._decode, self.active)

    def _guarded(self, step: Callable[[list[Request]], None], requests: list[Request]) -> None:
        """Run one model step; if it raises, the rows in it fail, not the server."""
        try:
            step(requests)
        except Exception as exc:
            log.error("a batch step failed: %s", one_line(exc), exc_info=exc)
            for request in list(requests):
                self._close(request, "error", f"generation failed: {one_line(exc)}")
            if requests is self.active:
                self._keep([])
            else:
                self._prune()

    def _admit(self) -> list[Request]:
        room = self.max_batch - len(self.active)
        admitted: list[Request] = []
        if room <= 0:
            return admitted
        if not self.active:  # idle: wait for the first request, then briefly for company
            if (first := self._next(timeout=0.1)) is None:
                return admitted
            admitted.append(first)
            deadline = time.perf_counter() + self.max_wait
            while len(admitted) < room and (left := deadline - time.perf_counter()) > 0:
                if (request := self._next(timeout=left)) is None:
                    break
                admitted.append(request)
        while len(admitted) < room and (request := self._next()) is not None:
            admitted.append(request)
        now = time.perf_counter()
        for request in admitted:
            request.admitted_at = now
        return admitted

    def _next(self, timeout: float | None = None) -> Request | None:
        """The next waiting request still to be answered; cancelled ones, and those whose
        user a new version withdrew, are closed on the way."""
        while True:
            try:
                wait = {"timeout": timeout} if timeout else {"block": False}
                request = self.waiting.get(**wait)
            except queue.Empty:
                return None
            if request.cancelled:
                self._close(request, "cancelled")
            elif request.user is not None and request.user not in self.adapters.users:
                self._withdrawn(request)
            else:
                return request

    def _row(self, request: Request) -> int:
        return 0 if request.user is None else self.adapters.users.get(request.user, 0)

    def _apply_swap(self) -> None:
        adapters, self.pending_adapters = self.pending_adapters, None
        self.layers = install(self.model, adapters)  # checked by `swap`: raises only on a bug
        self.adapters = adapters
        self.swaps.append((adapters.version, len(self.active)))
        for request in self.active:
            if request.user is not None and request.user not in adapters.users:
                self._withdrawn(request)  # its core is gone: fail it rather than go on unadapted
        self.rows = torch.tensor([self._row(r) for r in self.active], dtype=torch.long)

    def _withdrawn(self, request: Request) -> None:
        message = f"no adapter for user {request.user!r} in serving version {self.adapters.version}"
        self._close(request, "error", message, "not_found")

    def _prune(self) -> None:
        """Close cancelled rows and let every finished row leave the batch."""
        for request in self.active:
            if request.cancelled:
                self._close(request, "cancelled")
        keep = [i for i, r in enumerate(self.active) if r.finish_reason is None]
        if len(keep) < len(self.active):
            self._keep(keep)

    @torch.no_grad()
    def _prefill(self, requests: list[Request]) -> None:
        began = time.perf_counter()
        ids, mask = left_padded([r.prompt for r in requests], self.pad)
        rows = torch.tensor([self._row(r) for r in requests], dtype=torch.long)
        cache = DynamicCache()
        logits = self._forward(ids, mask, rows, cache)
        for i, request in enumerate(requests):
            if request.score_prompt:
                self._score_prompt(request, logits[i, -len(request.prompt) :])
        self._merge(requests, rows, mask, cache)
        self._emit(requests, logits[:, -1])
        self.on_step(len(requests), time.perf_counter() - began)

    @torch.no_grad()
    def _decode(self, _: list[Request]) -> None:
        began = time.perf_counter()
        last = torch.tensor([[r.tokens[-1].id] for r in self.active], dtype=torch.long)
        self.mask = torch.cat([self.mask, torch.ones(len(self.active), 1, dtype=torch.long)], 1)
        logits = self._forward(last, self.mask, self.rows, self.cache)
        self._emit(self.active, logits[:, -1])
        self.on_step(len(self.active), time.perf_counter() - began)

    def _score_prompt(self, request: Request, logits: Tensor) -> None:
        """Each prompt token's logprob given those before it (from its row's [len, vocab]
        logits, padding cut off) and, if asked, the likeliest alternatives at each position."""
        logprobs = torch.log_softmax(logits[:-1].double(), dim=-1)
        following = torch.tensor(request.prompt[1:], dtype=torch.long)
        picked = logprobs.gather(1, following[:, None])[:, 0]
        request.prompt_logprobs = [None, *(float(x) for x in picked)]
        if request.top_logprobs:
            request.prompt_top = [{}, *(_top(row, request.top_logprobs) for row in logprobs)]

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
            keys = torch.cat([left_pad(mine.keys, width), left_pad(theirs.keys, width)])
            values = torch.cat([left_pad(mine.values, width), left_pad(theirs.values, width)])
            merged.update(keys, values, index)
        self.mask = torch.cat([left_pad_mask(self.mask, width), left_pad_mask(mask, width)])
        self.rows = torch.cat([self.rows, rows])
        self.active = [*self.active, *requests]
        self.cache = merged

    def _emit(self, requests: list[Request], logits: Tensor) -> None:
        logprobs = torch.log_softmax(logits, dim=-1)
        broken = broken_rows(logits)
        for i, request in enumerate(requests):
            if request.cancelled or request.finish_reason is not None:
                continue  # `_prune` closes it
            if request.sampling.max_new_tokens == 0:  # scoring only: nothing to generate
                request.finish_reason = "length"
                self._ended(request)
                continue
            try:
                if broken[i]:
                    raise NumericalFailure("the model's logits for this request are not finite")
                self._advance(request, logits[i], logprobs[i])
            except Exception as exc:  # this row fails alone; the others go on
                log.warning("a request failed: %s", one_line(exc))
                self._close(request, "error", f"generation failed: {one_line(exc)}")
        self._prune()  # finished rows leave the batch at once

    def _advance(self, request: Request, logits: Tensor, logprobs: Tensor) -> None:
        token = sampling.choose(logits, request.sampling, request.generator)
        text = self.tokenizer.decode(
            [*(t.id for t in request.tokens), token], skip_special_tokens=True
        )
        piece = Token(token, text[len(request.text) :], float(logprobs[token]), token in self.eos)
        request.text = text
        request.tokens.append(piece)
        if request.top_logprobs:
            request.top.append(_top(logprobs, request.top_logprobs))
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        # Set before the token is sent, so that its reader knows it is the last one.
        request.finish_reason = finish_reason(
            text, len(request.tokens), token in self.eos, request.sampling
        )
        self._send(request, piece)
        if request.finish_reason is not None:
            self._ended(request)

    def _close(
        self, request: Request, reason: str, error: str | None = None, kind: str = "generation"
    ) -> None:
        """Finish `request` early (an error, a cancel); a finished request stays as it is."""
        if request.finish_reason is not None:
            return
        request.finish_reason, request.error, request.error_kind = reason, error, kind
        self._ended(request)

    def _ended(self, request: Request) -> None:
        request.finished_at = time.perf_counter()
        self.open.pop(id(request), None)
        try:
            self.on_finish(request)
        except Exception:
            log.exception("on_finish failed")
        self._send(request, None)

    def _send(self, request: Request, event: Token | None) -> None:
        try:
            request.on_event(event)
        except Exception as exc:  # whoever waited is gone: stop generating for them
            request.cancelled = True
            log.debug("a request's listener failed: %s", one_line(exc))

    def _close_all(self, message: str) -> None:
        """Answer every open request (waiting, in the batch, or in hand when a bug struck)."""
        for request in list(self.open.values()):
            self._close(request, "error", message, "unavailable")
        self._keep([])
        while not self.waiting.empty():
            self.waiting.get_nowait()
        self._fail_jobs(message)

    def _run_jobs(self) -> None:
        """The work `call` queued, each alone: one that raises fails its own future only."""
        while True:
            try:
                work, future = self.jobs.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(work())
            except Exception as exc:
                future.set_exception(exc)

    def _fail_jobs(self, message: str) -> None:
        while True:
            try:
                _, future = self.jobs.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineStopped(message))

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


def _top(logprobs: Tensor, k: int) -> dict[int, float]:
    values, ids = logprobs.topk(k)
    return {int(i): float(v) for i, v in zip(ids, values, strict=True)}


def _reason(problems: list[str]) -> str:
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def _misfit_message(adapters: SharedAdapters, problems: list[str]) -> str:
    return f"serving version {adapters.version} does not fit the served model: {_reason(problems)}"
