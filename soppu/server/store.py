"""A federation's run folder and its adapter store: every user's latest LoRA, kept safe.

    RUN/run.json            config, base model, emulator version
    RUN/emulator/           the emulator the clients train against
    RUN/store/<user>/       the user's latest adapter: PEFT files + training.json
                            (round, metrics, emulator version; PEFT ignores it)
    RUN/global/             the averaged adapter (schemes that have one)
    RUN/selection.json      what each user is served (personal, global or base, at a
                            strength λ, or a blend of global and personal) and why
    RUN/no-adapter/         an all-zero LoRA: what a user served the base model gets
    RUN/metrics.jsonl       one line per (round, user): trained or failed, with metrics
    RUN/rounds.jsonl        one line per round: timings and counts
    RUN/state.json          the last complete round and the last compressed one
    RUN/staging/round-N/    a round's replies until the round commits
    RUN/compressed/vNNNN/   compressed stores;  RUN/serving/ the published versions
    RUN/evaluation.{json,md,csv}  per-user perplexities after the run

A round's replies are validated and staged as they arrive. The round commits by writing a
COMMITTED marker and then moving each staged adapter into the store; `recover()` finishes a
commit that was interrupted and discards a round that never committed. So a run killed at any
point resumes from its last complete round with every adapter exactly once.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from soppu import atomic
from soppu.adapters import (
    TRAINING_NAME,
    AdapterError,
    LoraState,
    blend,
    check_lora,
    read_lora,
    write_lora,
)
from soppu.emulator import META_NAME, read_info
from soppu.userids import check_user_id

COMMITTED = "COMMITTED"


class RunFolder:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.run_json = self.root / "run.json"
        self.emulator = self.root / "emulator"
        self.store = self.root / "store"
        self.global_dir = self.root / "global"
        self.selection = self.root / "selection.json"
        self.no_adapter = self.root / "no-adapter"
        self.metrics = self.root / "metrics.jsonl"
        self.rounds = self.root / "rounds.jsonl"
        self.state_file = self.root / "state.json"
        self.staging = self.root / "staging"
        self.compressed = self.root / "compressed"
        self.serving = self.root / "serving"
        self.evaluation = self.root / "evaluation.json"  # and .md, .csv beside it

    def state(self) -> dict[str, Any]:
        if not self.state_file.is_file():
            return {"round": 0, "compressed_round": 0}
        return json.loads(self.state_file.read_text())

    def set_state(self, **changes: Any) -> None:
        atomic.write_json(self.state_file, {**self.state(), **changes})

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive against other processes: a commit, or a snapshot by `compress --run`."""
        with atomic.lock(self.root / "run", f"the run {self.root}"):
            yield

    def users(self) -> list[str]:
        if not self.store.is_dir():
            return []
        return sorted(p.name for p in self.store.iterdir() if not p.name.startswith("."))

    def latest(self, user: str) -> LoraState | None:
        folder = self.store / check_user_id(user)
        return read_lora(folder) if folder.is_dir() else None

    def global_adapter(self) -> LoraState | None:
        return read_lora(self.global_dir) if self.global_dir.is_dir() else None

    def selection_choices(self) -> dict[str, str]:
        """user → what they are served ("personal", "global", "base", one of the first two
        at a strength: "personal×0.75", or a blend: "blend@0.5", see `served_label`); {}
        before a choice."""
        if not self.selection.is_file():
            return {}
        users = json.loads(self.selection.read_text())["users"]
        return {user: entry["served"] for user, entry in users.items()}

    def served_sources(self) -> dict[str, ServedSource]:
        """user → where the adapter they are served now comes from (their own where no
        choice was made). The dirs are the current ones: a user chosen "personal×0.75"
        rounds ago is served their latest adapter at 0.75."""
        choices = self.selection_choices()
        found = {}
        for user in self.users():
            kind, value = parse_served(choices.get(user, "personal"))
            own = self.store / user
            if kind == "blend":
                found[user] = ServedSource(own, shared=self.global_dir, weight=value)
            else:
                folder = {"global": self.global_dir, "base": self.no_adapter}.get(kind, own)
                modules = self.strength_modules(value)
                found[user] = ServedSource(folder, scale=value, modules=modules)
        return found

    def strength_modules(self, scale: float) -> tuple[str, ...] | None:
        """Where a served strength `scale` applies in this run: below 1, the layers its
        emulator stands in for (`EmulatorInfo.strength_modules`: scaling down undoes their
        overshoot on the full model, which the exact top layers' part does not have); at 1
        and above, and without an emulator, None: every layer (scaling up makes up for too
        few steps, wherever they were taken)."""
        if scale >= 1.0 or not (self.emulator / META_NAME).is_file():
            return None
        return read_info(self.emulator).strength_modules

    def served_adapter(self, user: str) -> LoraState:
        """What `user` is served now (`served_sources`)."""
        return self.served_sources()[user].lora()

    def read_jsonl(self, path: Path) -> list[dict[str, Any]]:
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class ServedSource:
    """Where a user's served adapter comes from: the adapter in `folder` at strength `scale`
    (λ·ΔW on `modules`, the layers the run's emulator stands in for), or, where `shared` is
    set, the blend ΔW_shared + weight·(ΔW_folder − ΔW_shared)."""

    folder: Path
    scale: float = 1.0
    shared: Path | None = None
    weight: float = 1.0
    modules: tuple[str, ...] | None = None  # where `scale` applies (`LoraState.scaled`)

    @property
    def as_stored(self) -> bool:
        """Served exactly as the adapter in `folder` is."""
        return self.shared is None and self.scale == 1.0

    def lora(self, folder: Path | None = None, shared: Path | None = None) -> LoraState:
        """The served adapter, read from `folder` and `shared` (default: this source's own;
        `snapshot` passes its links)."""
        own = read_lora(folder or self.folder)
        if self.shared is not None:
            return blend(read_lora(shared or self.shared), own, self.weight)
        return own.scaled(self.scale, self.modules)


def served_label(kind: str, value: float = 1.0) -> str:
    """What a user is served, as RUN/selection.json and the manifest name it: the kind
    ("base", "global", "personal") and "×λ" after it where the adapter is scaled by λ; for
    a blend ΔW_global + μ·(ΔW_personal − ΔW_global), "blend@μ"."""
    if kind == "blend":
        return f"blend@{value:g}"
    return kind if value == 1.0 or kind == "base" else f"{kind}×{value:g}"


def parse_served(label: str) -> tuple[str, float]:
    """`served_label`'s (kind, λ) back; for a blend ("blend", μ)."""
    kind, sep, value = label.partition("@") if "@" in label else label.partition("×")
    return kind, float(value) if sep else 1.0


def check_reply(user: str, lora: LoraState, template: dict[str, torch.Size], source: str) -> None:
    """Refuse an unsafe user id, and tensors with other keys or shapes or with NaN/inf."""
    check_user_id(user, source)
    check_lora(lora, template, source)


class RoundStage:
    """One round's replies, staged under RUN/staging/round-N until the round commits."""

    def __init__(self, run: RunFolder, round_: int):
        self.run = run
        self.round = round_
        self.dir = run.staging / f"round-{round_:04d}"
        shutil.rmtree(self.dir, ignore_errors=True)  # leftovers of an uncommitted attempt
        (self.dir / "users").mkdir(parents=True)

    def add(self, user: str, lora: LoraState, record: dict[str, Any]) -> None:
        write_lora(lora, self.dir / "users" / check_user_id(user), record, cache=True)

    def add_global(self, lora: LoraState, record: dict[str, Any]) -> None:
        write_lora(lora, self.dir / "global", record, cache=True)

    def commit(self, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        atomic.write_json(self.dir / "rows.json", {"rows": rows, "summary": summary})
        with self.run.locked():
            atomic.write_text(self.dir / COMMITTED, "")
            _apply(self.run, self.dir, self.round)


def recover(run: RunFolder) -> dict[str, Any]:
    """Finish an interrupted commit, drop a round that never committed; return the state."""
    if run.staging.is_dir():
        for stage in sorted(run.staging.iterdir()):
            round_ = int(stage.name.removeprefix("round-"))
            # Past the state's round, a committed stage has moves left to make; at or before
            # it, only its clean-up was cut short.
            if (stage / COMMITTED).is_file() and round_ > run.state()["round"]:
                with run.locked():
                    _apply(run, stage, round_)
            else:
                shutil.rmtree(stage, ignore_errors=True)
        _remove_if_empty(run.staging)
    for leftover in run.store.glob(".*.old") if run.store.is_dir() else []:
        shutil.rmtree(leftover, ignore_errors=True)
    return run.state()


def _apply(run: RunFolder, stage: Path, round_: int) -> None:
    """Move a committed round into place; safe to repeat after a crash at any step."""
    run.store.mkdir(parents=True, exist_ok=True)
    staged_users = stage / "users"
    staged = sorted(staged_users.glob("[!.]*")) if staged_users.is_dir() else []
    for folder in staged:  # not the locks and owner files beside them
        _swap_in(folder, run.store / folder.name)
    if (stage / "global").is_dir():
        _swap_in(stage / "global", run.global_dir)
    saved = json.loads((stage / "rows.json").read_text())
    _rewrite_jsonl(run, run.metrics, saved["rows"], round_)
    _rewrite_jsonl(run, run.rounds, [saved["summary"]], round_)
    run.set_state(round=round_)
    os.unlink(stage / COMMITTED)  # first, so a clean-up cut short reads as "nothing to redo"
    shutil.rmtree(stage)
    _remove_if_empty(run.staging)


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _swap_in(new: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _rewrite_jsonl(run: RunFolder, path: Path, rows: list[dict[str, Any]], round_: int) -> None:
    kept = [row for row in run.read_jsonl(path) if row["round"] < round_]
    text = "".join(json.dumps(row) + "\n" for row in [*kept, *rows])
    atomic.write_text(path, text)


def stored_round(run: RunFolder, user: str) -> int | None:
    meta = run.store / check_user_id(user) / TRAINING_NAME
    return json.loads(meta.read_text()).get("round") if meta.is_file() else None


def snapshot(
    run: RunFolder, into: Path, sources: dict[str, ServedSource] | None = None
) -> dict[str, Path]:
    """Every user's served adapter (`sources`; default their stored one as it is) into
    `into`: hard links (files are only ever replaced by rename, never rewritten, so links are
    a consistent, instant copy), and an adapter served at a strength λ ≠ 1 or blended with
    the global one written there from the links; user → dir."""
    paths, served = {}, {}
    with run.locked():
        for user in run.users():
            source = (sources or {}).get(user, ServedSource(run.store / user))
            paths[user] = _link_dir(source.folder, into / user)
            if source.shared is not None:
                shared = into / ".shared" / user  # not a user id: a dot is never one
                served[user] = (source, _link_dir(source.shared, shared))
            elif not source.as_stored:
                served[user] = (source, None)
    if not paths:
        raise AdapterError(f"{run.store}: no adapters stored yet")
    for user, (source, shared) in served.items():  # outside the lock: the links hold still
        lora = source.lora(paths[user], shared)
        shutil.rmtree(paths[user])  # the links only
        record = {"strength": source.scale} if shared is None else {"blend": source.weight}
        if source.modules is not None and shared is None:
            record["strength_on"] = list(source.modules)  # the rest as trained
        write_lora(lora, paths[user], record)
    shutil.rmtree(into / ".shared", ignore_errors=True)
    return paths


def _link_dir(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for file in source.iterdir():
        os.link(file, target / file.name)
    return target
