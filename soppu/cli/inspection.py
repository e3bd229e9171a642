"""`soppu inspect`: one readable summary of whatever a path holds."""

from __future__ import annotations

import json
import shlex
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from soppu.adapter_sets import discover
from soppu.adapters import CONFIG_NAME, AdapterError, read_adapter
from soppu.cli.common import shown
from soppu.server.compressed_store import MANIFEST, StoreError
from soppu.server.compressed_store import READS as STORE_FORMATS
from soppu.server.publish import SERVING_FORMAT, verify_version
from soppu.server.store import RunFolder
from soppu.server.versions import Versions


def describe(path: Path) -> Iterator[str]:
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise AdapterError(
            f"{path}: not a folder; give an adapter dir, a store, a serving dir or a run"
        )
    try:
        yield from _describe(path)
    except (KeyError, TypeError) as exc:
        raise AdapterError(f"{path / MANIFEST}: lacks or mangles {exc}") from None


def _describe(path: Path) -> Iterator[str]:
    if RunFolder(path).run_json.is_file():
        yield from _run(RunFolder(path))
        return
    manifest = _json(path / MANIFEST)
    versions = Versions(path)
    if manifest and manifest.get("format") in STORE_FORMATS:
        yield from _store(path, manifest)
    elif manifest and manifest.get("format") == SERVING_FORMAT:
        yield from _version(path, manifest)
    elif versions.current_link.is_symlink() or versions.names():
        yield from _serving(versions)
    elif (path / CONFIG_NAME).exists():
        yield from _adapter(path)
    else:
        yield from _adapters(path)


def _json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc})") from exc


def _run(run: RunFolder) -> Iterator[str]:
    path = run.root
    meta = _json(run.run_json) or {}
    state = run.state()
    config = meta.get("config", {})
    users = meta.get("users", [])
    yield f"[bold]federation run[/] {shown(path)}"
    yield (
        f"  base model: {shown(meta.get('base_model'))}; clients in "
        f"{config.get('client_mode')} mode (emulator {meta.get('emulator')})"
    )
    yield (
        f"  rounds: {min(state['round'], config.get('rounds'))} of {config.get('rounds')} done"
        f"{' + the personal pass' if state['round'] > config.get('rounds') else ''}; "
        f"users: {len(users)} "
        f"({_few(users)}); scheme {config.get('scheme') or config.get('aggregation')}"
    )
    yield f"  adapters stored: {len(run.users())} in {shown(run.store)}"
    if state.get("serving"):
        yield (
            f"  compressed after round {state.get('compressed_round')}: "
            f"{shown(run.compressed / state['compressed'])}; serving {shown(run.serving)} "
            f"(current → {state['serving']})"
        )
    summary = (_json(run.evaluation) or {}).get("summary")
    if summary and summary.get("compressed_gain_median") is not None:
        served = ", ".join(f"{c} {n}" for c, n in summary.get("served_counts", {}).items())
        yield (
            f"  evaluation: served ({served}) {summary['helped']} helped, {summary['harmed']} "
            f"harmed, {summary['unchanged']} unchanged of {summary['users']} (95% intervals); "
            f"median served gain {summary['compressed_gain_median']:.1%} "
            f"({shown(run.evaluation.with_suffix('.md'))})"
        )


def _store(path: Path, m: dict) -> Iterator[str]:
    t, c = m["totals"], m["config"]
    ranks = Counter(s["rank"] for s in m["slots"])
    yield f"[bold]compressed store[/] {shown(path)} (created {m['created']})"
    yield f"  base model: {shown(m['base_model'])}"
    yield f"  users: {len(m['users'])} ({_few(m['users'])})"
    yield (
        f"  slots: {len(m['slots'])} grouped by {c['group']}, sigma {c['sigma']}, "
        f"weights {c['weights']}; ranks {dict(sorted(ranks.items()))}"
    )
    yield (
        f"  parameters {t['params_before']:,} → {t['params_after']:,} ({t['ratio']:.1f}×); "
        f"error mean {t['mean']:.4f}, p95 {t['p95']:.4f}, max {t['max']:.4f}"
    )
    yield f"  report: {shown(path / 'report')}"


def _version(path: Path, m: dict) -> Iterator[str]:
    try:
        verify_version(path)
        integrity = "every file matches its checksum"
    except (StoreError, OSError, ValueError) as exc:
        integrity = f"[bold red]NOT SERVABLE[/]: {shown(exc)}"
    t = m["totals"]
    yield f"[bold]serving version[/] {m['version']} at {shown(path)} (created {m['created']})"
    yield f"  base model: {shown(m['base_model'])}"
    yield (
        f"  users: {len(m['users'])} ({_few(list(m['users']))}), each a PEFT dir under "
        f"users/ at rank {m['export_rank']} ({'exact' if m['export_exact'] else 'truncated'})"
    )
    yield (
        f"  shared bases and cores: {shown(path / 'shared')}; "
        f"source store: {shown(m['source']['store'])}"
    )
    yield (
        f"  parameters {t['params_before']:,} → {t['params_after']:,} ({t['ratio']:.1f}×); "
        f"error mean {t['mean']:.4f}, max {t['max']:.4f}"
    )
    yield f"  integrity: {integrity}"
    yield from _vllm(path, m)


# vLLM accepts these LoRA ranks only (its --max-lora-rank choices)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _vllm(path: Path, m: dict) -> Iterator[str]:
    """The base weights the adapters were trained on, and a vLLM command serving every user."""
    from soppu.basemodel import local_weights

    found = local_weights(m["base_model"])
    if found is None:
        model = m["base_model"]
        yield f"  base weights: {shown(model)} (not on this machine; vLLM fetches it)"
    else:
        model, digest = str(found[0]), found[1]
        yield f"  base weights: {shown(model)} (sha256 {digest or 'not recorded'})"
    rank = next((r for r in VLLM_LORA_RANKS if r >= m["export_rank"]), m["export_rank"])
    users = list(m["users"])
    modules = " ".join(shlex.quote(f"{u}={(path / 'users' / u).resolve()}") for u in users)
    yield (
        f"  vLLM: python -m vllm.entrypoints.openai.api_server --model {shlex.quote(model)} "
        f"--served-model-name {shlex.quote(m['base_model'])} --enable-lora --max-lora-rank {rank} "
        f"--max-loras {min(len(users), 16)} --max-cpu-loras {len(users)} "
        f"--lora-modules {modules}"
    )


def _serving(versions: Versions) -> Iterator[str]:
    current = versions.current()
    yield (
        f"[bold]serving dir[/] {shown(versions.root)}: versions "
        f"{', '.join(versions.names()) or 'none'}; current → {current.name if current else None}"
    )
    if current:
        yield from _version(current, _json(current / MANIFEST) or {})


def _adapter(path: Path) -> Iterator[str]:
    info = read_adapter(path)
    ranks = Counter(mod.rank for mod in info.modules.values())
    params = sum(mod.rank * sum(mod.shape) for mod in info.modules.values())
    kinds = Counter(m.rsplit(".", 1)[-1] for m in info.modules)
    yield f"[bold]PEFT LoRA adapter[/] {shown(path)} (user id {info.user!r})"
    yield f"  base model: {shown(info.base_model)}"
    yield f"  modules: {len(info.modules)} ({dict(kinds)}); ranks {dict(ranks)}"
    yield (
        f"  lora_alpha {info.config['lora_alpha']}, rsLoRA {bool(info.config.get('use_rslora'))}"
        f"; {params:,} parameters"
    )


def _adapters(path: Path) -> Iterator[str]:
    paths = discover([path])
    infos = [read_adapter(p, u) for u, p in paths.items()]
    bases = Counter(i.base_model for i in infos)
    modules = Counter(len(i.modules) for i in infos)
    yield f"[bold]folder of {len(infos)} PEFT adapters[/] {shown(path)} ({_few(sorted(paths))})"
    yield f"  base models: {dict(bases)}; modules per adapter: {dict(modules)}"


def _few(names: list[str], shown: int = 5) -> str:
    more = f", … {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
