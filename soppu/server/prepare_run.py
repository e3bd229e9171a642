"""Everything the server prepares before round 1, or finds again when it resumes.

A new run gets its folder, its emulator (an existing one, one from the cache of aligned
emulators, or one built and aligned now), its users and its fresh-LoRA template, all recorded
in run.json. The server also keeps the full model, the emulator and the public text, to
measure each round's gradient correction. A resumed run takes run.json's config; only the
number of rounds and the operational knobs (timeouts, threads, final evaluation) may change.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import tomllib
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from flwr.app import RecordDict
from torch import Tensor, nn

from soppu import atomic, basemodel, cache, lm, precision
from soppu import messages as m
from soppu.adapters import LoraState
from soppu.alignment import AlignConfig, build_aligned, gradient_correction, realign
from soppu.basemodel import BaseModel
from soppu.cache import cache_dir
from soppu.data import DataError, UserText, load_users
from soppu.emulator import EmulatorError, EmulatorInfo, load, read_info, save, version_id
from soppu.personalize import fresh_lora
from soppu.public import describe, public_texts
from soppu.server.config import FederationConfig
from soppu.server.federation import Correction, Federation, Log, Realign, Selection
from soppu.server.selection import select_served
from soppu.server.store import RunFolder

MAY_CHANGE_ON_RESUME = {
    "rounds",
    "run_dir",
    "round_timeout",
    "node_wait",
    "threads",
    "final_evaluation",
    "final_eval_tokens",
    "log_to",
    "device",
    "client_gpus",
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
    stored, asked = stored_config(run).flat(), requested.flat()
    differ = [
        f"{key} (run: {stored[key]!r}, now: {asked[key]!r})"
        for key in stored
        if key not in MAY_CHANGE_ON_RESUME and stored[key] != asked[key]
    ]
    if differ:
        raise ValueError(f"{run.run_json}: a resumed run keeps its settings; {'; '.join(differ)}")
    return FederationConfig.from_run_config(
        stored, **{key: asked[key] for key in MAY_CHANGE_ON_RESUME}
    )


def stored_config(run: RunFolder) -> FederationConfig:
    """A run folder's config, from run.json's flat `config` (an older folder's keys upgraded)."""
    return FederationConfig.from_run_config(json.loads(run.run_json.read_text())["config"])


def load_config(
    overrides: dict[str, Any], *, config_file: Path | None = None, resume: bool = False
) -> FederationConfig:
    """The config a run asks for, by precedence: FederationConfig's defaults, then the
    resumed run's run.json (or else a TOML file of run-config keys, bare or under
    `[tool.flwr.app.config]`), then `overrides` (field names; `run_dir` among them)."""
    run = RunFolder(Path(overrides["run_dir"]))
    if resume and run.run_json.is_file():
        values = stored_config(run).to_run_config()
    elif config_file is not None:
        values = _read_toml(config_file)
    else:
        values = {}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    return FederationConfig.from_run_config({**values, **overrides})


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the config ({exc})") from None
    return data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", data)


def prepare(config: FederationConfig, base: BaseModel, log: Log) -> Federation:
    run = RunFolder(Path(config.run_dir))
    run.root.mkdir(parents=True, exist_ok=True)
    public = public_for(config, log, base)
    say_precision(config, log)
    say_repair(config, log)
    emulator, info = _emulator(run, config, base, public, log)
    say_alignment(info, log)
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
                "config": config.flat(),
                "base_model": base.name,
                "emulator": info.version,
                "users": sorted(users),
            },
        )
    setup = m.Setup(config.data.source, config.data_options(), tuple(sorted(users)), base.name)
    correction = realigner = None
    if (config.emulator.correction_batches or config.emulator.realign_steps) and not info.exact:
        # tokenised once: both measure on the same public text
        blocks = lm.token_blocks(base.tokenizer, "\n".join(public), config.training.seq_len)
        emulator.to(config.device)
        if config.emulator.correction_batches:
            correction = round_correction(config, base, emulator, info, blocks)
        if config.emulator.realign_steps and blocks:
            realigner = round_realignment(config, base, emulator, info, blocks, run)
    return Federation(
        run=run,
        config=config,
        setup=setup,
        emulator_version=info.version,
        emulator_content=lambda: emulator_message(run.emulator),
        template=template,
        log=log,
        correction=correction,
        realign=realigner,
        select=served_choice(run, config, base, users, log),
    )


def say_precision(config: FederationConfig, log: Log) -> None:
    """The precision of what the server does in this run, and only of that."""
    emulated, e = config.client_mode == "emulator", config.emulator
    work = [
        what
        for what, done in (
            ("aligns the emulator", emulated and config.align_steps() > 0 and not e.path),
            ("re-aligns it every round", emulated and e.realign_steps > 0),
            ("corrects the clients' gradients", emulated and e.correction_batches > 0),
        )
        if done
    ]
    resolved = precision.resolve(config.precision, config.device)
    server = f"the server {' and '.join(work)} in it; " if work else ""
    log(
        f"precision {config.precision} ({resolved} on the server's {config.device}): "
        f"{server}the final evaluation is fp32"
    )
    if emulated and not e.correction_batches:
        log("no gradient correction (correction-batches 0): clients train on the bare emulator")


def say_repair(config: FederationConfig, log: Log) -> None:
    """Where the clients repair their emulator first (soppu.repair), and taught by what."""
    e = config.emulator
    if config.client_mode == "emulator" and e.repair_steps:
        when = "first" if e.repair_for == "rounds" else "for the final personal pass only"
        log(
            f"clients repair their emulator on their own text {when} ({e.repair_steps} steps "
            f"at lr {e.repair_lr:g}), taught by what scoring it answers: the serving API a node "
            "names (teacher-url), in simulation the full model in the client's process"
        )


def served_choice(
    run: RunFolder, config: FederationConfig, base: BaseModel, users: dict[str, UserText], log: Log
) -> Selection | None:
    """What chooses each user's served adapter on their validation text, where the server can
    read it (a simulation); None, said in the log, where it cannot."""
    if not users or not config.data.validation_fraction:
        why = "validation-fraction 0" if users else "the server cannot read their text"
        log(f"every user is served their own adapter, unchosen ({why})")
        return None

    def select() -> dict[str, dict[str, Any]]:
        return select_served(
            run,
            base.model,
            base.tokenizer,
            users,
            config.judge(),
            scales=config.evaluation.scales(),
            weights=config.evaluation.blends(),
        )

    return select


def public_for(config: FederationConfig, log: Log, base: BaseModel) -> list[str]:
    """The run's public text (`soppu.public`), said in the log, with a word where the users'
    data is their own and the pool may not share its domain. None in full and split mode,
    which align and correct nothing."""
    if config.client_mode in ("full", "split"):
        return []
    source = config.public_source()
    log(f"public text: {describe(source)}")
    if source == "pool" and config.data.source:
        log("  the users' data is their own: --public generated or FILE may fit them better")
    return public_texts(
        source,
        base,
        seq_len=config.training.seq_len,
        seed=config.seed,
        precision=precision.resolve(config.precision, config.device),
        progress=step_logger(log, "writing public text, batch", 1, loss=False),
    )


def say_alignment(info: EmulatorInfo, log: Log) -> None:
    """Name what the clients will train against; an unaligned emulator is never silent."""
    kept = f"{len(info.full_layers)} of {info.plan['num_layers']} layers"
    if info.split:
        log(
            f"clients hold the top {kept} (split mode) and train them exactly: the hidden "
            f"states entering layer {info.features_layer} for their text reach them as "
            "features (in simulation, the full model in each client's process computes them)"
        )
    elif info.exact:
        log(f"clients train against the full model ({kept}): full mode")
    elif info.aligned:
        after = info.alignment["after"]
        log(f"emulator {info.version}: {kept}, aligned (KL to the full model {after['kl']:.3f})")
    else:
        log(
            f"WARNING: emulator {info.version} ({kept}) is NOT aligned to the full model; "
            "adapters trained on it may make the full model worse"
        )


def round_realignment(
    config: FederationConfig,
    base: BaseModel,
    emulator: nn.Module,
    info: EmulatorInfo,
    blocks: list[Tensor],
    run: RunFolder,
) -> Realign:
    """What re-aligns the emulator before a round with the round's starting adapter plugged
    into both models (FedBiOT's bi-level step), in place (the gradient correction then measures
    the new one), and saves it as the run's emulator under its new version. A round already
    re-aligned (a resumed run whose round did not commit) is not re-aligned twice. `blocks`:
    the public text's token blocks."""

    def realign_at(lora: LoraState, round_: int) -> tuple[str, dict[str, Any] | None]:
        if info.alignment.get("realigned", {}).get("round") == round_:
            return info.version, None
        align = AlignConfig(
            steps=config.emulator.realign_steps,
            batch_size=config.training.batch_size,
            seq_len=config.training.seq_len,
            seed=config.seed * 100_003 + round_,  # other public batches each round
            precision=config.precision,
        )
        result = realign(
            base.model, emulator, info, lora, blocks, base.tokenizer.pad_token_id, align
        )
        info.alignment["realigned"] = {"round": round_, **result}
        info.version = version_id(emulator, info)
        save(emulator, info, run.emulator, replace=True, cache=True)
        return info.version, info.alignment["realigned"]

    return realign_at


def round_correction(
    config: FederationConfig,
    base: BaseModel,
    emulator: nn.Module,
    info: EmulatorInfo,
    blocks: list[Tensor],
) -> Correction:
    """What measures a round's gradient correction at its starting adapter, on public batches
    (of `blocks`, the public text's token blocks) that differ from round to round."""

    def correction(lora: LoraState, round_: int) -> dict[str, Tensor]:
        return gradient_correction(
            base.model,
            emulator,
            info,
            lora,
            blocks,
            base.tokenizer.pad_token_id,
            batches=config.emulator.correction_batches,
            batch_size=config.training.batch_size,
            seed=config.seed * 100_003 + round_,  # other public batches each round
            precision=config.precision,
        )

    return correction


def choose_users(config: FederationConfig) -> dict[str, UserText]:
    """The `users` users with the most text (ties by id), or all of them."""
    everyone = load_users(config.data.source or None, config.data_options())
    ranked = sorted(everyone.values(), key=lambda u: (-u.chars, u.user_id))
    chosen = ranked[: config.data.users or None]
    return {u.user_id: u for u in chosen}


def emulator_message(folder: Path) -> RecordDict:
    model, _ = load(folder)
    files = {p.name: p.read_text() for p in sorted(folder.glob("*.json"))}
    return m.emulator_content(files, model.state_dict())


def _emulator(
    run: RunFolder, config: FederationConfig, base: BaseModel, public: list[str], log: Log
):
    if not run.emulator.is_dir():
        if config.emulator.path:
            _check_base(Path(config.emulator.path), base)
            _copy(Path(config.emulator.path), run.emulator)
        else:
            _into_run(_aligned(config, base, public, run, log), run, base)
    _check_base(run.emulator, base)
    return load(run.emulator)


def _into_run(source: Path, run: RunFolder, base: BaseModel) -> None:
    """The emulator from the cache into the run, named after this run's base model: a cache
    entry matches the base by its weights, and may have been built from another folder of it
    (then it is renamed, which changes its content id)."""
    if source == run.emulator:
        return
    if read_info(source).base_model == base.name:
        _copy(source, run.emulator)
        return
    emulator, info = load(source)
    info = replace(info, base_model=base.name)
    info.version = version_id(emulator, info)
    save(emulator, info, run.emulator, cache=True)


def _copy(source: Path, target: Path) -> None:
    with atomic.building_dir(target, cache=True) as copy:
        shutil.copytree(source, copy, dirs_exist_ok=True)


def _check_base(folder: Path, base: BaseModel) -> None:
    info: EmulatorInfo = read_info(folder)
    if info.base_model != base.name:
        raise EmulatorError(f"{folder}: built from {info.base_model}, not {base.name}")


def _aligned(
    config: FederationConfig, base: BaseModel, public: list[str], run: RunFolder, log: Log
) -> Path:
    """The aligned emulator for this recipe, from the cache or built (and cached) now; one
    with nothing to align (full mode, or 0 steps) is built into the run, never cached."""
    plan = config.plan(base.num_layers)
    align = AlignConfig(
        steps=config.align_steps(),
        batch_size=config.training.batch_size,
        seq_len=config.training.seq_len,
        # resolved: an emulator aligned in bf16 is another cache entry than one in fp32
        precision=precision.resolve(config.precision, config.device),
    )
    worth_caching = plan.drop > 0 and align.steps > 0 and bool(public)
    folder = cache_dir() / "aligned-emulators" / _recipe_key(base, plan, align, public)
    if worth_caching and (folder / "soppu_emulator.json").is_file():
        if read_info(folder).aligned:
            log(f"emulator: reusing the one cached in {folder}")
            cache.mark_used(folder)
            return folder
        cache.remove(folder)  # an unaligned entry never stands in for an aligned one
    if plan.split:
        log(f"split mode: the clients' model is the full model's top {plan.top} layers")
    elif plan.drop == 0:
        log("full mode: the clients' model is the full model itself (nothing to align)")
    else:
        log(
            f"emulator: keeping {plan.keep_count} of {len(plan.middle)} middle layers "
            f"(by {plan.select}), top {plan.top}, bottom {plan.bottom}; aligning it for "
            f"{align.steps} steps on {len(public):,} public texts"
            + ("; cached afterwards" if worth_caching else "")
        )
    emulator, info = build_aligned(
        base.model, base.tokenizer, base.name, plan, public, align, step_logger(log, "align")
    )
    target = folder if worth_caching else run.emulator
    save(emulator, info, target, cache=True)
    return target


def step_logger(
    log: Log, what: str, every: int = 10, *, loss: bool = True, window: int = 10
) -> Callable[[int, int, float], None]:
    """Progress lines for a loop of steps: at its start, after the first step, every `every`
    steps and at the end; each with its loss unless `loss` is off. The time estimate is the
    pace of the last `window` steps, never counting the first, which carries the start-up
    (compiling, caches, the first allocation) and would overstate the rest many times."""
    began = time.perf_counter()
    marks: deque[tuple[int, float]] = deque(maxlen=window + 1)  # (step, when it ended)

    def progress(step: int, total: int, value: float) -> None:
        shown = f": loss {value:.4f}" if loss else ""
        now = time.perf_counter()
        if step == 0:
            log(f"  {what} 0/{total}{shown}")
            return
        marks.append((step, now))
        if step == 1:
            log(f"  {what} 1/{total}{shown} (first step {now - began:.1f} s, with start-up)")
        elif step == total or step % every == 0:
            (first, then), (last, at) = marks[0], marks[-1]
            per_step = (at - then) / max(last - first, 1)
            left = per_step * (total - step)
            log(f"  {what} {step}/{total}{shown} ({per_step:.1f} s/step, ~{left:.0f} s left)")

    return progress


def _recipe_key(base: BaseModel, plan: Any, align: AlignConfig, public: list[str]) -> str:
    """`<model>-<hash>`: the base model by its weights (the same model in another folder is
    the same entry), the plan, the alignment settings and the public text."""
    # (a split plan is never cached; leaving its flag out keeps the entries made before it)
    described = {k: v for k, v in asdict(plan).items() if k != "split"}
    identity = [basemodel.fingerprint(base.model), described, asdict(align), len(public)]
    digest = hashlib.sha256(json.dumps(identity).encode())
    for text in public:
        digest.update(text.encode())
    # A Hub id names the entry; a local folder's name would split one model into many.
    name = base.model.config.model_type if Path(base.name).exists() else Path(base.name).name
    return f"{name[:60]}-{digest.hexdigest()[:16]}"


def load_base(config: FederationConfig) -> BaseModel:
    return basemodel.load(config.base_model or None, device=config.device)
