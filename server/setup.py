"""Everything the server prepares before round 1, or finds again when it resumes.

A new run gets its folder, its emulator (an existing one, one from the cache of aligned
emulators, or one built and aligned now), its users and its fresh-LoRA template, all recorded
in run.json. A resumed run takes run.json's config; only the number of rounds and the
operational knobs (timeouts, threads, final evaluation) may change.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from flwr.app import RecordDict

from server.config import FederationConfig
from server.federation import Federation, Log
from server.store import RunFolder
from soppu import atomic, basemodel
from soppu import messages as m
from soppu.alignment import AlignConfig, build_aligned
from soppu.basemodel import BaseModel, cache_dir
from soppu.data import DataError, UserText, load_users, public_text
from soppu.emulator import EmulatorError, EmulatorInfo, load, read_info, save
from soppu.personalize import fresh_lora

MAY_CHANGE_ON_RESUME = {
    "rounds",
    "run_dir",
    "round_timeout",
    "node_wait",
    "threads",
    "final_evaluation",
}


def resolve_config(requested: FederationConfig, *, resume: bool) -> FederationConfig:
    """The config to run: `requested` for a new run; to resume, run.json's, where only the
    rounds and the operational knobs may differ."""
    run = RunFolder(Path(requested.run_dir))
    if not run.run_json.is_file():
        if resume:
            raise FileNotFoundError(f"{run.run_json}: nothing to resume (no run.json)")
        if run.root.exists() and any(run.root.iterdir()):
            raise FileExistsError(f"{run.root} exists and is not a run; choose another --out")
        return requested
    if not resume:
        raise FileExistsError(f"{run.root} holds a run already; pass --resume to continue it")
    stored = stored_config(run)
    differ = [
        f"{f.name} (run: {getattr(stored, f.name)!r}, now: {getattr(requested, f.name)!r})"
        for f in fields(FederationConfig)
        if f.name not in MAY_CHANGE_ON_RESUME
        and getattr(stored, f.name) != getattr(requested, f.name)
    ]
    if differ:
        raise ValueError(f"{run.run_json}: a resumed run keeps its settings; {'; '.join(differ)}")
    return replace(stored, **{name: getattr(requested, name) for name in MAY_CHANGE_ON_RESUME})


def stored_config(run: RunFolder) -> FederationConfig:
    return FederationConfig(**json.loads(run.run_json.read_text())["config"])


def prepare(config: FederationConfig, base: BaseModel, log: Log) -> Federation:
    run = RunFolder(Path(config.run_dir))
    run.root.mkdir(parents=True, exist_ok=True)
    emulator, info = _emulator(run, config, base, log)
    try:
        users = choose_users(config)
    except DataError as exc:  # a real deployment: the users' text stays on their nodes
        log(
            f"the server cannot read the users' text ({exc}); each SuperNode must name its "
            "user in its node config (user-id=...)"
        )
        users = {}
    template = fresh_lora(emulator, info, config.train())
    if not run.run_json.is_file():
        atomic.write_json(
            run.run_json,
            {
                "config": asdict(config),
                "base_model": base.name,
                "emulator": info.version,
                "users": sorted(users),
            },
        )
    setup = m.Setup(config.data, config.data_options(), tuple(sorted(users)), base.name)
    del emulator  # the clients train; the server keeps only what it sends
    return Federation(
        run=run,
        config=config,
        setup=setup,
        emulator_version=info.version,
        emulator_content=lambda: emulator_message(run.emulator),
        template=template,
        log=log,
    )


def choose_users(config: FederationConfig) -> dict[str, UserText]:
    """The `users` users with the most text (ties by id), or all of them."""
    everyone = load_users(config.data or None, config.data_options())
    ranked = sorted(everyone.values(), key=lambda u: (-u.chars, u.user_id))
    chosen = ranked[: config.users or None]
    return {u.user_id: u for u in chosen}


def emulator_message(folder: Path) -> RecordDict:
    model, _ = load(folder)
    files = {p.name: p.read_text() for p in sorted(folder.glob("*.json"))}
    return m.emulator_content(files, model.state_dict())


def _emulator(run: RunFolder, config: FederationConfig, base: BaseModel, log: Log):
    if not run.emulator.is_dir():
        source = Path(config.emulator) if config.emulator else _aligned(config, base, log)
        _check_base(source, base)
        shutil.copytree(source, run.emulator.with_name(".emulator.copying"), dirs_exist_ok=True)
        run.emulator.with_name(".emulator.copying").rename(run.emulator)
    _check_base(run.emulator, base)
    return load(run.emulator)


def _check_base(folder: Path, base: BaseModel) -> None:
    info: EmulatorInfo = read_info(folder)
    if info.base_model != base.name:
        raise EmulatorError(f"{folder}: built from {info.base_model}, not {base.name}")


def _aligned(config: FederationConfig, base: BaseModel, log: Log) -> Path:
    """The aligned emulator for this recipe, from the cache or built (and cached) now."""
    plan = config.plan(base.num_layers)
    public = public_text(config.data or None)  # custom data has none unless it says so
    align = AlignConfig(
        steps=config.align_steps, batch_size=config.batch_size, seq_len=config.seq_len
    )
    key = _recipe_key(base, plan, align, public)
    folder = cache_dir() / "aligned-emulators" / key
    if (folder / "soppu_emulator.json").is_file():
        log(f"emulator: reusing the aligned one cached in {folder}")
        return folder
    steps = align.steps if public else 0
    log(
        f"emulator: building it (drop {plan.drop}, top {plan.top}) and aligning it for "
        f"{steps} steps on public text; cached afterwards"
    )
    emulator, info = build_aligned(
        base.model,
        base.tokenizer,
        base.name,
        plan,
        public,
        align,
        lambda step, total, loss: (
            log(f"  align {step}/{total}: loss {loss:.4f}")
            if step % 10 == 0 or step == total
            else None
        ),
    )
    save(emulator, info, folder, replace=True)
    return folder


def _recipe_key(base: BaseModel, plan: Any, align: AlignConfig, public: list[str]) -> str:
    digest = hashlib.sha256(
        json.dumps([base.name, asdict(plan), asdict(align), len(public)]).encode()
    )
    for text in public:
        digest.update(text.encode())
    return digest.hexdigest()[:16]


def load_base(config: FederationConfig) -> BaseModel:
    return basemodel.load(config.base_model or None)
