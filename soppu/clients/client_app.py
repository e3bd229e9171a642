"""The Flower ClientApp: one node is one user, who trains their own LoRA on the emulator.

Run it with `flwr run .` (see pyproject.toml), with `soppu simulate`, or on a SuperNode. The
node's user is `user-id` from its node config (a real deployment), else its simulation
partition's entry in the server's user list. The handlers are plain functions so that other
apps (and tests) can wrap them.
"""

from __future__ import annotations

import math
import sys
import time
from functools import partial

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from soppu import features, teachers
from soppu import messages as m
from soppu.clients import task
from soppu.repair import TeacherError

# a repair the node cannot make: no teacher to ask, or no usable answer from it
REPAIR_FAILURES = (teachers.NoTeacher, TeacherError)
# a split client without its features: nowhere to ask, or an answer that does not fit
FEATURE_FAILURES = (features.NoFeatures, features.FeatureError)


def hello(msg: Message, context: Context) -> Message:
    setup = m.Setup.from_record(msg.content[m.SETUP])
    user = task.my_text(context.node_config, setup)  # fails early if this node lacks the text
    reply = ConfigRecord(
        {"user-id": user.user_id, "emulators": task.held_versions(), "chars": user.chars}
    )
    return Message(RecordDict({m.CONFIG: reply}), reply_to=msg)


def install(msg: Message, context: Context) -> Message:
    version = task.install(*m.emulator_files(msg.content))
    return Message(RecordDict({m.CONFIG: ConfigRecord({"installed": version})}), reply_to=msg)


def query(msg: Message, context: Context) -> Message:
    what = msg.content[m.CONFIG]["task"] if m.CONFIG in msg.content else m.HELLO
    return install(msg, context) if what == m.INSTALL else hello(msg, context)


def train(msg: Message, context: Context) -> Message:
    began = time.perf_counter()
    setup, config, user = _request(msg, context)
    train_config = m.train_config_from(config)
    start = None
    if m.LORA in msg.content:
        start = m.lora_from(msg.content[m.LORA], str(config["lora-config"]))
    correction = None
    if m.CORRECTION in msg.content:
        correction = m.tensors_from(msg.content[m.CORRECTION])
    anchor = None
    if m.ANCHOR in msg.content:
        anchor = m.lora_from(msg.content[m.ANCHOR], str(config["lora-config"]))
    run = partial(
        task.train,
        user,
        str(config["emulator"]),
        train_config,
        base_model=setup.base_model,
        correction=correction,
        device=_device(config, context),
        repair=m.repair_from(config),
        teacher=_teacher(context, setup, train_config.precision),
        feature_source=_feature_source(context, setup),
    )
    try:
        # Two tracks (Ditto): the shared copy from the anchor, which the server averages, and
        # the personal one from the user's own, pulled towards the anchor. One track
        # (local-prox): only the pulled personal one.
        two_tracks = anchor is not None and int(config.get("tracks", 2)) == 2
        shared, first_repair = run(anchor) if two_tracks else (None, None)
        result, repaired = run(
            start,
            anchor=anchor,
            prox=float(config.get("prox", 0.0)),
            stop_every=int(config.get("stop-every", 0)),  # a final pass: keep the best step
        )
    except task.MissingEmulator as exc:
        return Message(Error(m.NEEDS_EMULATOR, str(exc)), reply_to=msg)
    except REPAIR_FAILURES as exc:
        return Message(Error(m.NO_REPAIR, str(exc)), reply_to=msg)
    except FEATURE_FAILURES as exc:
        return Message(Error(m.NO_FEATURES, str(exc)), reply_to=msg)
    repaired = repaired or first_repair  # made by whichever track ran first
    ppl = result.perplexity
    metrics = m.metrics_record(
        {
            "num-examples": max(1, result.train_tokens // train_config.seq_len),
            "train-tokens": result.train_tokens,
            "train-loss": sum(result.train_loss[-5:]) / len(result.train_loss[-5:]),
            "train-loss-first": result.train_loss[0],
            "eval-loss-before": math.log(ppl["emulator_start"]),
            "eval-loss-after": math.log(ppl["emulator_adapter"]),
            "eval-tokens": result.test_tokens,
            "seconds": result.seconds + (shared.seconds if shared else 0.0),  # all training
            "handler-seconds": time.perf_counter() - began,  # + finding data and emulator
            "step-seconds": (result.seconds + (shared.seconds if shared else 0.0))
            / max(1, train_config.steps),  # with its own checks; both tracks of a two-track scheme
            **_peak_memory(),
            **({"best-step": result.stopping.best_step} if result.stopping else {}),
            **(_repair_metrics(repaired) if repaired else {}),
        }
    )
    # Tensors only: the LoRA config went one way, from the server, which keeps its own.
    about = ConfigRecord({"user-id": user.user_id, "emulator": str(config["emulator"])})
    content = RecordDict({m.LORA: m.lora_record(result.lora), m.METRICS: metrics, m.CONFIG: about})
    if shared is not None:
        content[m.SHARED] = m.lora_record(shared.lora)
    return Message(content, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    began = time.perf_counter()
    setup, config, user = _request(msg, context)
    lora = m.lora_from(msg.content[m.LORA], str(config["lora-config"]))
    try:
        loss, tokens = task.evaluate(
            user,
            str(config["emulator"]),
            m.train_config_from(config),
            lora,
            setup.base_model,
            _device(config, context),
            repair=m.repair_from(config),
            teacher=_teacher(context, setup, str(config["train.precision"])),
            feature_source=_feature_source(context, setup),
        )
    except task.MissingEmulator as exc:
        return Message(Error(m.NEEDS_EMULATOR, str(exc)), reply_to=msg)
    except REPAIR_FAILURES as exc:
        return Message(Error(m.NO_REPAIR, str(exc)), reply_to=msg)
    except FEATURE_FAILURES as exc:
        return Message(Error(m.NO_FEATURES, str(exc)), reply_to=msg)
    metrics = MetricRecord(
        {"eval-loss": loss, "num-examples": tokens, "seconds": time.perf_counter() - began}
    )
    about = ConfigRecord({"user-id": user.user_id})
    return Message(RecordDict({m.METRICS: metrics, m.CONFIG: about}), reply_to=msg)


def _teacher(context: Context, setup: m.Setup, precision: str):
    """The node's teacher, made only if a repair needs one (soppu.teachers.for_node)."""
    return partial(teachers.for_node, context.node_config, setup.base_model, precision)


def _repair_metrics(report) -> dict[str, float | int]:
    check = report.check
    return {
        "repair-seconds": report.seconds,
        "repair-loss-first": report.loss_first,
        "repair-loss-last": report.loss_last,
        "repair-pieces": report.pieces,
        "repair-kept": int(report.kept),
        **(
            {
                "repair-steps-taken": check.steps,
                "repair-check-before": check.before,
                "repair-check-after": check.after,
                "repair-check-full": check.full,
                "repair-check-closed": check.closed,
                "repair-check-gain": check.gain.point,
                "repair-check-low": check.gain.low,
                "repair-check-high": check.gain.high,
            }
            if check
            else {}
        ),
    }


def _peak_memory() -> dict[str, float]:
    """This client process's peak resident memory so far (MiB), where the OS reports it."""
    if sys.platform == "win32":
        return {}
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak-rss-mib": peak / (2**20 if sys.platform == "darwin" else 2**10)}


def _feature_source(context: Context, setup: m.Setup):
    """The node's feature source for a split layer, made only if its emulator is split
    (soppu.features.for_node)."""
    return partial(features.for_node, context.node_config, setup.base_model)


def _device(config: ConfigRecord, context: Context) -> str:
    """The node's own `device` setting wins over the server's request."""
    return str(context.node_config.get("device", config.get("device", "cpu")))


def _request(msg: Message, context: Context):
    setup = m.Setup.from_record(msg.content[m.SETUP])
    config = msg.content[m.CONFIG]
    user = task.my_text(context.node_config, setup)
    if user.user_id != config["user-id"]:
        raise ValueError(f"sent to user {config['user-id']!r}, but this node is {user.user_id!r}")
    return setup, config, user


app = ClientApp()
app.query()(query)
app.train()(train)
app.evaluate()(evaluate)
