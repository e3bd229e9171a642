"""The federation's rounds, driven message by message so that every user's adapter is kept.

Each round: meet new nodes (who is your user, which emulators do you hold), sample users,
install the emulator on nodes that lack it, send each sampled user their starting adapter and
the gradient correction measured at it, stage every valid reply, average, evaluate if asked,
commit, and compress + publish every K rounds and after the last. A node that fails, times
out or sends a bad adapter costs only its own reply.

Schemes (`aggregation`): with fedavg every sampled user starts from the global adapter (the
fresh LoRA before the first average); their reply is their personal adapter (the global one
fine-tuned on their text) and the weighted average of the replies is the next global one.
With none each user continues their own latest adapter and no global one exists.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

from compression.compress import CompressionConfig
from server.compression_round import compress_run
from server.config import FederationConfig
from server.store import RoundStage, RunFolder, check_reply, recover
from soppu import messages as m
from soppu.adapters import LoraState

Log = Callable[[str], None]
Correction = Callable[[LoraState, int], dict[str, Tensor]]  # (starting LoRA, round) → tensors


@dataclass
class Federation:
    """What a round needs besides the grid: the run, the config and the payloads."""

    run: RunFolder
    config: FederationConfig
    setup: m.Setup
    emulator_version: str
    emulator_content: Callable[[], RecordDict]  # built only if some node needs it
    template: LoraState  # the fresh LoRA's config and shapes: replies must match it
    log: Log = print
    correction: Correction | None = None  # None: the clients train uncorrected
    correction_seconds: float = 0.0  # the last round's
    users_by_node: dict[int, str] = field(default_factory=dict)
    has_emulator: set[int] = field(default_factory=set)

    @property
    def shapes(self) -> dict[str, torch.Size]:
        return {k: v.shape for k, v in self.template.tensors.items()}


def run_federation(grid: Grid, fed: Federation) -> dict[str, Any]:
    """Run (or resume) the rounds; returns the run's state afterwards."""
    state = recover(fed.run)
    first = state["round"] + 1
    if first > fed.config.rounds:
        fed.log(f"all {fed.config.rounds} rounds are done already")
    elif first > 1:
        fed.log(f"resuming after round {state['round']}")
    for round_ in range(first, fed.config.rounds + 1):
        run_round(grid, fed, round_)
        if _compress_now(fed.config, round_):
            compress(fed, round_)
    if fed.run.state().get("compressed_round", 0) < fed.run.state()["round"]:
        compress(fed, fed.run.state()["round"])  # the last round committed, then a crash
    return fed.run.state()


def _compress_now(config: FederationConfig, round_: int) -> bool:
    every = config.compress_every
    return round_ == config.rounds or (every > 0 and round_ % every == 0)


def run_round(grid: Grid, fed: Federation, round_: int) -> dict[str, Any]:
    began = time.perf_counter()
    meet_nodes(grid, fed)
    sampled = sample_users(fed, round_)
    fed.log(f"round {round_}/{fed.config.rounds}: training {len(sampled)} users")
    install_began = time.perf_counter()
    install_emulator(grid, fed, list(sampled))
    install_s = time.perf_counter() - install_began
    stage = RoundStage(fed.run, round_)
    rows, trained = _train(grid, fed, round_, sampled, stage)
    if fed.config.aggregation == "fedavg" and trained:
        stage.add_global(fedavg(trained), {"round": round_, "users": sorted(trained)})
    eval_loss = evaluate(grid, fed, round_, trained) if fed.config.fraction_evaluate else None
    ok = [r for r in rows if r["status"] == "trained"]
    summary = {
        "round": round_,
        "seconds": time.perf_counter() - began,
        "install_seconds": install_s,
        "correction_seconds": fed.correction_seconds,
        "sampled": len(sampled),
        "trained": len(ok),
        "failed": len(rows) - len(ok),
        "client_seconds": sum(r["seconds"] for r in ok),
        "handler_seconds": sum(r["handler-seconds"] for r in ok),
        "eval_loss_before": _mean(r["eval-loss-before"] for r in ok),
        "eval_loss_after": _mean(r["eval-loss-after"] for r in ok),
        "federated_eval_loss": eval_loss,
    }
    stage.commit(rows, summary)
    fed.log(
        f"round {round_} done in {summary['seconds']:.0f} s: {len(ok)} trained, "
        f"{summary['failed']} failed; held-out loss on the emulator "
        f"{_fmt(summary['eval_loss_before'])} → {_fmt(summary['eval_loss_after'])}"
    )
    return summary


def meet_nodes(grid: Grid, fed: Federation) -> None:
    """Wait for nodes, then ask each new one which user it is and what it holds."""
    wanted = len(fed.setup.users) or fed.config.users or 1
    nodes = _wait_for_nodes(grid, wanted, fed.config.node_wait)
    new = [n for n in nodes if n not in fed.users_by_node]
    if not new:
        return
    config = ConfigRecord({"task": m.HELLO})
    replies, failed = exchange(grid, fed, new, "query", lambda _: _content(fed, config), 600)
    for node, reply in replies.items():
        user = str(reply.content[m.CONFIG]["user-id"])
        if user in fed.users_by_node.values():
            fed.log(f"node {node} says it is {user}, already served by another node: ignored")
            continue
        fed.users_by_node[node] = user
        if fed.emulator_version in list(reply.content[m.CONFIG]["emulators"]):
            fed.has_emulator.add(node)
    for node, reason in failed.items():
        fed.log(f"node {node} did not introduce itself: {reason}")


def _wait_for_nodes(grid: Grid, wanted: int, wait: float) -> list[int]:
    deadline = time.monotonic() + wait
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() > deadline:
            if not nodes:
                raise TimeoutError(f"no node connected within {wait:.0f} s")
            return nodes
        time.sleep(0.2)


def sample_users(fed: Federation, round_: int) -> dict[int, str]:
    """node → user for this round; seeded by (seed, round) over user ids, so a resumed run
    samples the same users even though node ids change."""
    by_user = {user: node for node, user in fed.users_by_node.items()}
    users = sorted(by_user)
    count = max(fed.config.min_train_nodes, round(fed.config.fraction_train * len(users)))
    chosen = random.Random(f"{fed.config.seed}:{round_}").sample(users, min(count, len(users)))
    return {by_user[u]: u for u in sorted(chosen)}


def install_emulator(grid: Grid, fed: Federation, nodes: list[int]) -> None:
    """Send the emulator to nodes that lack it: one first, then ask the rest again, because
    nodes on one machine (a simulation) share the first one's disk cache."""
    lacking = [n for n in nodes if n not in fed.has_emulator]
    if not lacking:
        return
    content = fed.emulator_content()
    content[m.CONFIG]["task"] = m.INSTALL
    _install(grid, fed, lacking[:1], content)
    sent = 1
    if len(lacking) > 1:
        fed.users_by_node = {n: u for n, u in fed.users_by_node.items() if n not in lacking[1:]}
        meet_nodes(grid, fed)  # re-asks the rest what they hold
        still = [n for n in lacking[1:] if n not in fed.has_emulator]
        _install(grid, fed, still, content)
        sent += len(still)
    fed.log(
        f"emulator {fed.emulator_version}: sent to {sent} node(s); "
        f"{len(lacking) - sent} found it in their machine's cache"
    )


def _install(grid: Grid, fed: Federation, nodes: list[int], content: RecordDict) -> None:
    if not nodes:
        return
    replies, failed = exchange(grid, fed, nodes, "query", lambda _: content, 1800)
    fed.has_emulator.update(replies)
    for node, reason in failed.items():
        fed.log(f"node {node} could not install the emulator: {reason}")


def _train(
    grid: Grid, fed: Federation, round_: int, sampled: dict[int, str], stage: RoundStage
) -> tuple[list[dict[str, Any]], dict[str, tuple[LoraState, int]]]:
    starts = starting_adapters(fed, sorted(sampled.values()))
    corrections = _corrections(fed, round_, starts)
    device = "cuda" if fed.config.client_gpus > 0 else "cpu"
    base_config = m.train_config_record(
        fed.config.train(), emulator=fed.emulator_version, round=round_, device=device
    )

    def content(node: int) -> RecordDict:
        user = sampled[node]
        start = starts[user]
        config = ConfigRecord(
            {**base_config, "user-id": user, "lora-config": json.dumps(start.config)}
        )
        records = _content(fed, config)
        records[m.LORA] = m.lora_record(start)
        if corrections.get(user):
            records[m.CORRECTION] = m.tensors_record(corrections[user])
        return records

    rows: list[dict[str, Any]] = []
    trained: dict[str, tuple[LoraState, int]] = {}

    def on_reply(node: int, reply: Message) -> None:
        user = sampled[node]
        try:
            lora, metrics = _accept(fed, user, reply)
        except Exception as exc:  # a bad reply costs that user's round, nothing else
            rows.append(_failure(round_, user, f"bad reply: {exc}"))
            fed.log(f"  {user}: refused ({exc})")
            return
        record = {"round": round_, "emulator": fed.emulator_version, "metrics": metrics}
        stage.add(user, lora, record)
        trained[user] = (lora, int(metrics["num-examples"]))
        rows.append({"round": round_, "user": user, "status": "trained", **metrics})
        fed.log(
            f"  [{len(trained)}/{len(sampled)}] {user}: held-out loss "
            f"{metrics['eval-loss-before']:.3f} → {metrics['eval-loss-after']:.3f} "
            f"({metrics['seconds']:.0f} s)"
        )

    _, failed = exchange(
        grid, fed, list(sampled), "train", content, fed.config.round_timeout, on_reply
    )
    for node, reason in failed.items():
        rows.append(_failure(round_, sampled[node], reason))
        fed.log(f"  {sampled[node]}: failed ({reason})")
    return rows, trained


def starting_adapters(fed: Federation, users: list[str]) -> dict[str, LoraState]:
    """fedavg: the global adapter for everyone (the fresh one before the first average);
    none: each user's own latest. Users sharing a start share one LoraState object."""
    if fed.config.aggregation == "fedavg":
        start = fed.run.global_adapter() or fed.template
        return dict.fromkeys(users, start)
    return {user: fed.run.latest(user) or fed.template for user in users}


def _corrections(
    fed: Federation, round_: int, starts: dict[str, LoraState]
) -> dict[str, dict[str, Tensor]]:
    """One gradient correction per distinct starting adapter (one in all under fedavg)."""
    if fed.correction is None:
        return {}
    began = time.perf_counter()
    by_start: dict[int, dict[str, Tensor]] = {}
    for start in starts.values():
        if id(start) not in by_start:
            by_start[id(start)] = fed.correction(start, round_)
    fed.correction_seconds = time.perf_counter() - began
    fed.log(
        f"  gradient correction for {len(by_start)} starting adapter(s), "
        f"{fed.config.correction_batches} public batches each "
        f"({fed.correction_seconds:.0f} s)"
    )
    return {user: by_start[id(start)] for user, start in starts.items()}


def _accept(fed: Federation, user: str, reply: Message) -> tuple[LoraState, dict[str, float]]:
    about = reply.content[m.CONFIG]
    if str(about["user-id"]) != user:
        raise ValueError(f"reply is for user {about['user-id']!r}, expected {user!r}")
    lora = m.lora_from(reply.content[m.LORA], str(about["lora-config"]))
    lora.config = fed.template.config  # the server's config is the one stored and published
    check_reply(user, lora, fed.shapes, f"reply from {user}")
    metrics = {k: float(v) for k, v in reply.content[m.METRICS].items()}
    return lora, metrics


def _failure(round_: int, user: str, reason: str) -> dict[str, Any]:
    return {"round": round_, "user": user, "status": "failed", "reason": reason}


def fedavg(trained: dict[str, tuple[LoraState, int]]) -> LoraState:
    """Average every LoRA tensor (A and B alike), weighted by training examples."""
    total = sum(n for _, n in trained.values())
    first = next(iter(trained.values()))[0]
    tensors = {
        key: sum(lora.tensors[key] * (n / total) for lora, n in trained.values())
        for key in first.tensors
    }
    return LoraState(tensors, first.config)


def evaluate(
    grid: Grid, fed: Federation, round_: int, trained: dict[str, tuple[LoraState, int]]
) -> float | None:
    """Federated evaluation on the emulator: each sampled user's held-out loss for the global
    adapter (fedavg) or their own latest one."""
    users = sorted(fed.users_by_node.values())
    count = round(fed.config.fraction_evaluate * len(users))
    chosen = set(random.Random(f"eval:{fed.config.seed}:{round_}").sample(users, count))
    nodes = [n for n, u in fed.users_by_node.items() if u in chosen]
    global_lora = fed.run.global_adapter()
    if fed.config.aggregation == "fedavg" and trained:
        global_lora = fedavg(trained)
    base_config = m.train_config_record(fed.config.train(), emulator=fed.emulator_version)

    def content(node: int) -> RecordDict | None:
        user = fed.users_by_node[node]
        own = trained[user][0] if user in trained else fed.run.latest(user)
        lora = global_lora if fed.config.aggregation == "fedavg" else own
        if lora is None:
            return None
        config = ConfigRecord(
            {**base_config, "user-id": user, "lora-config": json.dumps(lora.config)}
        )
        records = _content(fed, config)
        records[m.LORA] = m.lora_record(lora)
        return records

    replies, failed = exchange(grid, fed, nodes, "evaluate", content, fed.config.round_timeout)
    for node, reason in failed.items():
        fed.log(f"  evaluate {fed.users_by_node[node]}: failed ({reason})")
    losses = [float(r.content[m.METRICS]["eval-loss"]) for r in replies.values()]
    return _mean(losses)


def compress(fed: Federation, round_: int) -> None:
    fed.log(f"compression round after round {round_}")
    config: CompressionConfig = fed.config.compression()
    compressed, version = compress_run(
        fed.run,
        config,
        export_rank=fed.config.export_rank or None,
        refit_above=fed.config.compress_refit_above,
    )
    fed.run.set_state(compressed_round=round_, compressed=compressed.name, serving=version.name)
    manifest = json.loads((compressed / "manifest.json").read_text())
    totals, added = manifest["totals"], manifest.get("added")
    if added:
        refit = added["refit_slots"]
        fed.log(
            f"added {len(added['users'])} new users onto the last version's bases (drift max "
            f"{added['drift_max']:.3f}; {len(refit)} slots refit)"
        )
    fed.log(
        f"compressed {totals['users']} users' adapters {totals['ratio']:.1f}× "
        f"(error mean {totals['mean']:.4f}) → {compressed}; published {version}"
    )


def exchange(
    grid: Grid,
    fed: Federation,
    nodes: list[int],
    message_type: str,
    content: Callable[[int], RecordDict | None],
    timeout: float,
    on_reply: Callable[[int, Message], None] | None = None,
) -> tuple[dict[int, Message], dict[int, str]]:
    """Send one message per node and collect replies as they come, until all are in or the
    timeout passes. Returns (replies, failures with their reasons)."""
    sent: dict[str, int] = {}
    for node in nodes:
        body = content(node)
        if body is None:
            continue
        message = Message(body, dst_node_id=node, message_type=message_type)
        for message_id in grid.push_messages([message]):
            sent[message_id] = node
    replies: dict[int, Message] = {}
    failed: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while sent and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(sent)):
            node = sent.pop(reply.metadata.reply_to_message_id)
            if reply.has_error():
                failed[node] = _error_reason(fed, node, reply)
                continue
            replies[node] = reply
            if on_reply is not None:
                on_reply(node, reply)
        if sent:
            time.sleep(0.2)  # rounds take minutes; a slower poll leaves the CPU to clients
    for node in sent.values():
        failed[node] = f"no reply within {timeout:.0f} s"
    return replies, failed


def _error_reason(fed: Federation, node: int, reply: Message) -> str:
    if reply.error.code == m.NEEDS_EMULATOR:
        fed.has_emulator.discard(node)  # it lost its cache; the next round reinstalls
    return (reply.error.reason or f"error {reply.error.code}").strip().splitlines()[-1]


def _content(fed: Federation, config: ConfigRecord) -> RecordDict:
    return RecordDict({m.SETUP: fed.setup.to_record(), m.CONFIG: config})


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"
