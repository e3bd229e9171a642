"""The federation's rounds, driven message by message so that every user's adapter is kept; the
messages themselves, and which node is which user, are `soppu/server/nodes.py`'s.

Each round: meet new nodes (who is your user, which emulators do you hold), sample users,
install the emulator on nodes that lack it, send each sampled user their starting adapter and
the gradient correction measured at it, stage every valid reply, average, evaluate if asked,
commit, and compress + publish every K rounds and after the last. A node that fails, times
out or sends a bad adapter costs only its own reply.

What a user starts from, what is averaged and what stays personal is the scheme's
(`--scheme`, `server/schemes/`): the loop asks it and knows none by name.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

from soppu import messages as m
from soppu.adapters import LoraState
from soppu.compression.compress import CompressionConfig
from soppu.server.compressed_store import CompressedStore
from soppu.server.compression_round import compress_run
from soppu.server.config import FederationConfig
from soppu.server.nodes import Nodes
from soppu.server.schemes import (
    Averaged,
    Privacy,
    Reply,
    Robustness,
    Scheme,
    epsilon,
    scheme_for,
)
from soppu.server.schemes.base import global_or
from soppu.server.schemes.personal_pass import PersonalPass
from soppu.server.store import RoundStage, RunFolder, check_reply, parse_served, recover
from soppu.server.tracking import track
from soppu.train_config import TrainConfig

Log = Callable[[str], None]
Correction = Callable[[LoraState, int], dict[str, Tensor]]  # (starting LoRA, round) → tensors
# (starting LoRA, round) → the emulator's version now, and what re-aligning it did (None: the
# round's re-alignment was done before, by a run since resumed)
Realign = Callable[[LoraState, int], tuple[str, dict[str, Any] | None]]
Selection = Callable[[], dict[str, dict[str, Any]]]  # → user → what they are served, and why


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
    # re-aligns the emulator before every round after the first; None: it stays as built
    realign: Realign | None = None
    # scores each user's candidates on their validation text before a compression round;
    # None: the server cannot read the users' text, everyone is served their own adapter
    select: Selection | None = None
    nodes: Nodes | None = None  # set when the rounds start: they need the grid

    @property
    def shapes(self) -> dict[str, torch.Size]:
        return {k: v.shape for k, v in self.template.tensors.items()}

    @property
    def scheme(self) -> Scheme:
        c = self.config
        robustness = Robustness(c.robust.clip, c.robust.weight_cap, c.robust.trim)
        privacy = (
            Privacy(c.privacy.noise, c.privacy.clip, c.privacy.delta) if c.privacy.noise else None
        )
        return scheme_for(c.scheme.name, c.scheme.prox, robustness, privacy)


def run_federation(grid: Grid, fed: Federation) -> dict[str, Any]:
    """Run (or resume) the rounds; returns the run's state afterwards."""
    fed.nodes = Nodes(
        grid,
        fed.setup,
        fed.emulator_version,
        fed.log,
        wanted=len(fed.setup.users) or fed.config.data.users or 1,
        wait=fed.config.schedule.node_wait,
    )
    state = recover(fed.run)
    first = state["round"] + 1
    if first > fed.config.schedule.rounds:
        fed.log(f"all {fed.config.schedule.rounds} rounds are done already")
    elif first > 1:
        fed.log(f"resuming after round {state['round']}")
    passing = fed.config.scheme.personal_pass > 0
    for round_ in range(first, fed.config.schedule.rounds + 1):
        run_round(fed, round_)
        if _compress_now(fed.config, round_) and not (
            passing and round_ == fed.config.schedule.rounds
        ):
            compress(fed, round_)
    if passing and fed.run.state()["round"] == fed.config.schedule.rounds:
        personal_pass(fed, fed.config.schedule.rounds + 1)
    if fed.run.state().get("compressed_round", 0) < fed.run.state()["round"]:
        compress(fed, fed.run.state()["round"])  # the last round committed, then a crash
    return fed.run.state()


def _compress_now(config: FederationConfig, round_: int) -> bool:
    every = config.compression.every
    return round_ == config.schedule.rounds or (every > 0 and round_ % every == 0)


def run_round(fed: Federation, round_: int) -> dict[str, Any]:
    nodes = _nodes(fed)
    began = time.perf_counter()
    nodes.meet()
    sampled = sample_users(fed, round_)
    fed.log(f"round {round_}/{fed.config.schedule.rounds}: training {len(sampled)} users")
    realign_s = realign_emulator(fed, round_)
    install_began = time.perf_counter()
    nodes.install_emulator(list(sampled), fed.emulator_content)
    install_s = time.perf_counter() - install_began
    stage = RoundStage(fed.run, round_)
    rows, trained = _train(fed, round_, sampled, stage, fed.scheme, fed.config.train(round_))
    averaged = fed.scheme.aggregate(trained) if trained else None
    new_global = averaged.lora if averaged else None
    if averaged is not None:
        record = {
            "round": round_,
            "users": sorted(trained),
            "scheme": fed.scheme.name,
            "clipped": averaged.clipped,
            "capped": averaged.capped,
        }
        if fed.config.privacy.noise:
            record["dp"] = privacy_spent(fed.config, round_)
            fed.log(
                f"  central DP: noise {fed.config.privacy.noise}, clip {fed.config.privacy.clip}; "
                f"ε = {record['dp']['epsilon']:.3g} at δ = {fed.config.privacy.delta:g} after "
                f"{round_} rounds (an upper bound)"
            )
        stage.add_global(averaged.lora, record)
        say_robust(averaged, fed.log)
    eval_loss = None
    if fed.config.schedule.fraction_evaluate:
        eval_loss = evaluate(fed, round_, trained, new_global or fed.run.global_adapter())
    ok = [r for r in rows if r["status"] == "trained"]
    summary = {
        "round": round_,
        "seconds": time.perf_counter() - began,
        "emulator": fed.emulator_version,
        "install_seconds": install_s,
        "realign_seconds": realign_s,
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
    track(fed.run, fed.config.sinks())
    fed.log(
        f"round {round_} done in {summary['seconds']:.0f} s: {len(ok)} trained, "
        f"{summary['failed']} failed; held-out loss on the emulator "
        f"{_fmt(summary['eval_loss_before'])} → {_fmt(summary['eval_loss_after'])}"
    )
    return summary


def realign_emulator(fed: Federation, round_: int) -> float:
    """Before a round after the first: the emulator re-aligned at the round's starting adapter
    (the scheme's correction point, else the global adapter), its new version what the nodes
    must hold. Seconds."""
    if fed.realign is None or round_ == 1:  # round 1 starts from the identity adapter
        return 0.0
    began = time.perf_counter()
    point = fed.scheme.correction_point(fed.run, fed.template)
    version, done = fed.realign(point or global_or(fed.run, fed.template), round_)
    if version != fed.emulator_version:
        fed.emulator_version = version
        _nodes(fed).new_emulator(version)
    if done is not None:
        fed.log(
            f"  emulator re-aligned at the round's starting adapter: {done['config']['steps']} "
            f"steps, loss {done['before']['loss']:.3f} → {done['after']['loss']:.3f} "
            f"({done['seconds']:.0f} s); clients fetch {version}"
        )
    return time.perf_counter() - began


def personal_pass(fed: Federation, round_: int) -> dict[str, Any]:
    """After the last round: every user fine-tunes the final global adapter, keeping the step
    best on their validation text (`soppu/server/schemes/personal_pass.py`); committed as round
    `round_` (rounds + 1), so a resumed run neither repeats nor skips it."""
    nodes = _nodes(fed)
    began = time.perf_counter()
    nodes.meet()
    sampled = {node: user for user, node in sorted(nodes.node_of().items())}
    train = fed.config.personal_pass_train()
    fed.log(
        f"personal pass: {len(sampled)} users fine-tune the global adapter for up to "
        f"{train.steps} steps at lr {train.lr:g}, each keeping the step best on their "
        f"validation text (checked every {fed.config.scheme.personal_pass_check})"
    )
    nodes.install_emulator(list(sampled), fed.emulator_content)
    stage = RoundStage(fed.run, round_)
    rows, _ = _train(
        fed,
        round_,
        sampled,
        stage,
        PersonalPass(),
        train,
        {"stop-every": fed.config.scheme.personal_pass_check},
        final_pass=True,
    )
    ok = [r for r in rows if r["status"] == "trained"]
    summary = {
        "round": round_,
        "personal_pass": True,
        "seconds": time.perf_counter() - began,
        "sampled": len(sampled),
        "trained": len(ok),
        "failed": len(rows) - len(ok),
        "best_steps": {r["user"]: r.get("best-step") for r in ok},
        "eval_loss_before": _mean(r["eval-loss-before"] for r in ok),
        "eval_loss_after": _mean(r["eval-loss-after"] for r in ok),
    }
    stage.commit(rows, summary)
    track(fed.run, fed.config.sinks())
    kept = sum(1 for r in ok if r.get("best-step"))
    fed.log(
        f"personal pass done in {summary['seconds']:.0f} s: {kept} of {len(ok)} users kept a "
        f"step past the global adapter (the others keep the adapter the rounds left them); "
        f"held-out loss on the emulator "
        f"{_fmt(summary['eval_loss_before'])} → {_fmt(summary['eval_loss_after'])}"
    )
    return summary


def _nodes(fed: Federation) -> Nodes:
    if fed.nodes is None:
        raise RuntimeError("the rounds have not started: run_federation sets the nodes")
    return fed.nodes


def sample_users(fed: Federation, round_: int) -> dict[int, str]:
    """node → user for this round; seeded by (seed, round) over user ids, so a resumed run
    samples the same users even though node ids change."""
    by_user = _nodes(fed).node_of()
    users = sorted(by_user)
    count = max(
        fed.config.schedule.min_train_nodes, round(fed.config.schedule.fraction_train * len(users))
    )
    chosen = random.Random(f"{fed.config.seed}:{round_}").sample(users, min(count, len(users)))
    return {by_user[u]: u for u in sorted(chosen)}


def _train(
    fed: Federation,
    round_: int,
    sampled: dict[int, str],
    stage: RoundStage,
    scheme: Scheme,
    train: TrainConfig,
    extra: dict[str, Any] | None = None,
    final_pass: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Reply]]:
    """Send each sampled user their start (the scheme's) and `train`, stage valid replies."""
    starts = scheme.starts(fed.run, sorted(sampled.values()), fed.template)
    anchor = scheme.anchor(fed.run, fed.template)
    corrections = _corrections(fed, round_, starts, scheme.correction_point(fed.run, fed.template))
    device = "cuda" if fed.config.client_gpus > 0 else "cpu"
    base_config = m.train_config_record(
        train,
        emulator=fed.emulator_version,
        round=round_,
        device=device,
        prox=scheme.prox,
        tracks=2 if scheme.two_tracks else 1,
        **_repair_fields(fed, final_pass),
        **(extra or {}),
    )

    content = _requests(fed, sampled, starts, corrections, anchor, base_config)
    rows: list[dict[str, Any]] = []
    trained: dict[str, Reply] = {}
    holding = set(fed.run.users())  # users with an adapter of their own already

    def on_reply(node: int, reply: Message) -> None:
        user = sampled[node]
        try:
            accepted, metrics = _accept(fed, user, reply, starts[user], anchor, scheme.two_tracks)
        except Exception as exc:  # a bad reply costs that user's round, nothing else
            rows.append(_failure(round_, user, f"bad reply: {exc}"))
            fed.log(f"  {user}: refused ({exc})")
            return
        record = {
            "round": round_,
            "emulator": fed.emulator_version,
            "scheme": scheme.name,
            "metrics": metrics,
        }
        if scheme.replaces(metrics) or user not in holding:
            stage.add(user, accepted.personal, record)
        trained[user] = accepted
        rows.append({"round": round_, "user": user, "status": "trained", **metrics})
        if "repair-seconds" in metrics:
            fed.log(f"  {user}: {repair_line(metrics)}")
        fed.log(
            f"  [{len(trained)}/{len(sampled)}] {user}: held-out loss "
            f"{metrics['eval-loss-before']:.3f} → {metrics['eval-loss-after']:.3f} "
            f"({metrics['seconds']:.0f} s)"
        )

    _, failed = _nodes(fed).exchange(
        list(sampled), "train", content, fed.config.schedule.round_timeout, on_reply
    )
    for node, reason in failed.items():
        rows.append(_failure(round_, sampled[node], reason))
        fed.log(f"  {sampled[node]}: failed ({reason})")
    return rows, trained


def repair_line(metrics: Mapping[str, float]) -> str:
    """What a client's reply says of the repair it made (its numbers as checked_metrics let
    them through: finite, not necessarily all there)."""
    get = metrics.get
    line = (
        f"repaired its emulator on {get('repair-pieces', 0):.0f} pieces of its training text "
        f"({get('repair-steps-taken', 0):.0f} steps, {get('repair-seconds', 0):.0f} s), "
        f"partition loss there {get('repair-loss-first', 0):.3f} → {get('repair-loss-last', 0):.3f}"
    )
    if "repair-check-before" not in metrics:
        return line
    before, after, full = (get(f"repair-check-{k}", 0) for k in ("before", "after", "full"))
    return (
        f"{line}; on its validation text the emulator's loss {before:.3f} → {after:.3f}, the "
        f"full model's {full:.3f} ({get('repair-check-closed', 0):.0%} of the gap closed; "
        "perplexity "
        f"{get('repair-check-gain', 0):+.1%}, 95% {get('repair-check-low', 0):+.1%} to "
        f"{get('repair-check-high', 0):+.1%}): "
        + ("kept" if get("repair-kept") == 1 else "undone, the emulator as sent")
    )


def _repair_fields(fed: Federation, final_pass: bool = False) -> dict[str, Any]:
    """The repair the clients are asked for: emulator mode only (the full model needs none),
    and with `repair-for pass` in the final personal pass only."""
    e = fed.config.emulator
    wanted = final_pass or e.repair_for == "rounds"
    steps = e.repair_steps if fed.config.client_mode == "emulator" and wanted else 0
    return m.repair_fields(steps, e.repair_lr)


def _requests(
    fed: Federation,
    sampled: dict[int, str],
    starts: dict[str, LoraState],
    corrections: dict[str, dict[str, Tensor]],
    anchor: LoraState | None,
    base_config: dict[str, Any],
) -> Callable[[int], RecordDict]:
    """What each sampled node is sent: its user's start, correction and the scheme's anchor."""

    def content(node: int) -> RecordDict:
        user = sampled[node]
        start = starts[user]
        config = ConfigRecord(
            {**base_config, "user-id": user, "lora-config": json.dumps(start.config)}
        )
        records = _nodes(fed).content(config)
        records[m.LORA] = m.lora_record(start)
        if corrections.get(user):
            records[m.CORRECTION] = m.tensors_record(corrections[user])
        if anchor is not None:
            records[m.ANCHOR] = m.lora_record(anchor)
        return records

    return content


def _corrections(
    fed: Federation, round_: int, starts: dict[str, LoraState], point: LoraState | None
) -> dict[str, dict[str, Tensor]]:
    """One gradient correction per distinct starting adapter (one in all where everyone
    starts alike), or one at `point` for everyone."""
    if fed.correction is None:
        return {}
    began = time.perf_counter()
    if point is not None:
        starts = dict.fromkeys(starts, point)
    by_start: dict[int, dict[str, Tensor]] = {}
    for start in starts.values():
        if id(start) not in by_start:
            by_start[id(start)] = fed.correction(start, round_)
    fed.correction_seconds = time.perf_counter() - began
    fed.log(
        f"  gradient correction for {len(by_start)} starting adapter(s), "
        f"{fed.config.emulator.correction_batches} public batches each "
        f"({fed.correction_seconds:.0f} s)"
    )
    return {user: by_start[id(start)] for user, start in starts.items()}


def _accept(
    fed: Federation,
    user: str,
    reply: Message,
    start: LoraState,
    anchor: LoraState | None,
    two_tracks: bool,
) -> tuple[Reply, dict[str, float]]:
    """The reply as a Reply, or ValueError naming what is wrong with it: its user, its
    tensors (keys, shapes, finite, bounded), its metrics (finite; num-examples ≥ 1), and the
    shared copy a two-track scheme must send."""
    about = reply.content[m.CONFIG]
    if str(about["user-id"]) != user:
        raise ValueError(f"reply is for user {about['user-id']!r}, expected {user!r}")
    # The LoRA config goes one way: the server's is the one trained, stored and published.
    lora = LoraState(m.tensors_from(reply.content[m.LORA]), dict(fed.template.config))
    check_reply(user, lora, fed.shapes, f"reply from {user}")
    shared = None
    if two_tracks:
        if m.SHARED not in reply.content:
            raise ValueError(f"reply from {user} lacks the shared copy its scheme trains")
        shared = LoraState(m.tensors_from(reply.content[m.SHARED]), dict(fed.template.config))
        check_reply(user, shared, fed.shapes, f"reply from {user} (shared copy)")
    if m.METRICS not in reply.content:
        raise ValueError("no metrics")
    metrics = checked_metrics(reply.content[m.METRICS])
    return Reply(lora, start, int(metrics["num-examples"]), shared, anchor), metrics


def checked_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """A reply's metrics as floats; ValueError unless all are finite numbers and num-examples
    (the client's own claim, a weight in the average) a whole number ≥ 1."""
    metrics = {}
    for key, value in record.items():
        if isinstance(value, list) or not math.isfinite(float(value)):
            raise ValueError(f"metric {key} is not a finite number: {value!r}")
        metrics[key] = float(value)
    examples = metrics.get("num-examples")
    if examples is None or examples < 1 or examples != int(examples):
        raise ValueError(f"num-examples must be a whole number ≥ 1, got {examples!r}")
    return metrics


def _failure(round_: int, user: str, reason: str) -> dict[str, Any]:
    return {"round": round_, "user": user, "status": "failed", "reason": reason}


def evaluate(
    fed: Federation, round_: int, trained: dict[str, Reply], global_lora: LoraState | None
) -> float | None:
    """Federated evaluation on the emulator: each sampled user's held-out loss for the global
    adapter (where the scheme has one) or their own latest one."""
    transport = _nodes(fed)
    users = sorted(transport.users.values())
    count = round(fed.config.schedule.fraction_evaluate * len(users))
    chosen = set(random.Random(f"eval:{fed.config.seed}:{round_}").sample(users, count))
    nodes = [n for n, u in transport.users.items() if u in chosen]
    base_config = m.train_config_record(
        fed.config.train(), emulator=fed.emulator_version, **_repair_fields(fed)
    )

    def content(node: int) -> RecordDict | None:
        user = transport.users[node]
        own = trained[user].personal if user in trained else fed.run.latest(user)
        lora = global_lora or own
        if lora is None:
            return None
        config = ConfigRecord(
            {**base_config, "user-id": user, "lora-config": json.dumps(lora.config)}
        )
        records = transport.content(config)
        records[m.LORA] = m.lora_record(lora)
        return records

    replies, failed = transport.exchange(
        nodes, "evaluate", content, fed.config.schedule.round_timeout
    )
    for node, reason in failed.items():
        fed.log(f"  evaluate {transport.users[node]}: failed ({reason})")
    losses = [float(r.content[m.METRICS]["eval-loss"]) for r in replies.values()]
    return _mean(losses)


def compress(fed: Federation, round_: int) -> None:
    fed.log(f"compression round after round {round_}")
    if fed.select is not None:
        began = time.perf_counter()
        chosen = fed.select()
        say_served(chosen, fed.log, time.perf_counter() - began)
    config: CompressionConfig = fed.config.compression_config()
    compressed, version = compress_run(
        fed.run,
        config,
        export_rank=fed.config.compression.export_rank or None,
        refit_above=fed.config.compression.refit_above,
    )
    fed.run.set_state(compressed_round=round_, compressed=compressed.name, serving=version.name)
    track(fed.run, fed.config.sinks())
    manifest = CompressedStore(compressed).manifest()
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


def privacy_spent(config: FederationConfig, round_: int) -> dict[str, float]:
    """The global adapter's (ε, δ) after `round_` rounds of central DP."""
    spent = epsilon(config.privacy.noise, round_, config.privacy.delta)
    return {
        "noise": config.privacy.noise,
        "clip": config.privacy.clip,
        "delta": config.privacy.delta,
        "rounds": round_,
        "epsilon": spent,
    }


def say_robust(averaged: Averaged, log: Log) -> None:
    """Name the users whose reply the robust mean limited (an attack, or an outlier)."""
    if averaged.clipped:
        worst = ", ".join(f"{u} ×{r:.3g}" for u, r in sorted(averaged.clipped.items()))
        log(f"  clipped to the round's bound (norm over it): {worst}")
    if averaged.capped:
        claims = ", ".join(f"{u} ({n})" for u, n in sorted(averaged.capped.items()))
        log(f"  num-examples capped for {claims}")


# why a user is not served their own adapter, by what they are served instead
NOT_THEIR_OWN = {
    "global": ("the global adapter", "their own scored significantly worse or no better than base"),
    "base": ("no adapter (base model)", "their own scored worse"),
}


def say_served(chosen: dict[str, dict[str, Any]], log: Log, seconds: float = 0.0) -> None:
    """One line per kind of choice: how many users are served what, naming those not served
    their own adapter (an adapter that would harm them on their validation text)."""
    by_choice: dict[str, list[str]] = {}
    for user, entry in sorted(chosen.items()):
        by_choice.setdefault(entry["served"], []).append(user)
    log(
        "served, chosen on each user's validation text: "
        + ", ".join(f"{choice} {len(users)}" for choice, users in sorted(by_choice.items()))
        + (f" ({seconds:.0f} s)" if seconds else "")
    )
    for kind, (what, why) in NOT_THEIR_OWN.items():
        named = sorted(u for c, us in by_choice.items() if parse_served(c)[0] == kind for u in us)
        if named:
            log(f"  {what} for {', '.join(named)}: {why}")
    if 2 * len(by_choice.get("base", [])) > len(chosen):
        log(
            "  for most users no adapter of this run beats the base model: the client model "
            "does not carry a gain for their text (full mode, or public text of their kind, "
            "may)"
        )


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"
