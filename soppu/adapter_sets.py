"""Many users' adapters together: finding them, reading them all, checking they belong
together (one base model, one set of modules, one shape per module), naming who differs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from soppu.adapters import (
    CONFIG_NAME,
    PICKLED_NAMES,
    WEIGHTS_NAME,
    AdapterError,
    AdapterInfo,
    read_adapter,
)


def discover(inputs: Iterable[Path]) -> dict[str, Path]:
    """Adapter dirs by user id: each input is an adapter dir or a folder of adapter dirs."""
    found: dict[str, Path] = {}
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise AdapterError(f"{path}: no such file or directory")
        candidates = [path] if _looks_like_adapter(path) else sorted(p for p in path.iterdir())
        for candidate in candidates:
            if not candidate.is_dir() or candidate.name.startswith("."):
                continue
            if not _looks_like_adapter(candidate):
                continue
            if candidate.name in found:
                raise AdapterError(
                    f"{candidate}: user id {candidate.name!r} also comes from "
                    f"{found[candidate.name]}; user ids must be unique"
                )
            found[candidate.name] = candidate
    if not found:
        names = ", ".join(str(p) for p in inputs)
        raise AdapterError(f"{names}: no PEFT adapter dirs found ({CONFIG_NAME} + weights)")
    return found


def _looks_like_adapter(path: Path) -> bool:
    return path.is_dir() and (
        (path / CONFIG_NAME).exists()
        or (path / WEIGHTS_NAME).exists()
        or any((path / name).exists() for name in PICKLED_NAMES)
    )


def read_population(paths: Mapping[str, Path], *, check_values: bool = True) -> list[AdapterInfo]:
    """Read every adapter, check they belong together, and (by default) that values are finite.

    Raises one AdapterError that lists everything wrong, so a user fixes it in one pass.
    """
    infos, problems = [], []
    for user, path in sorted(paths.items()):
        try:
            infos.append(read_adapter(path, user))
        except AdapterError as exc:
            problems.append(str(exc))
    if problems:
        raise AdapterError("\n".join(problems))
    check_population(infos)
    if check_values:
        for info in infos:
            info.check_finite()
    return infos


def check_population(infos: list[AdapterInfo]) -> None:
    """Same base model, same modules, same shapes per module; else name who differs."""
    problems = []
    problems += _differs(infos, "base model", lambda i: i.base_model)
    problems += _differs(infos, "target modules", lambda i: tuple(sorted(i.modules)))
    problems += _differs(infos, "fan_in_fan_out", lambda i: bool(i.config.get("fan_in_fan_out")))
    shapes: dict[str, dict[tuple[int, int], list[str]]] = {}
    for info in infos:
        for module, mod in info.modules.items():
            shapes.setdefault(module, {}).setdefault(mod.shape, []).append(info.user)
    for module, by_shape in shapes.items():
        if len(by_shape) > 1:
            listing = "; ".join(f"{list(s)}: {_names(u)}" for s, u in by_shape.items())
            problems.append(f"module {module} has different shapes across users: {listing}")
    if problems:
        raise AdapterError("adapters do not belong together:\n  " + "\n  ".join(problems))


def _differs(infos: list[AdapterInfo], what: str, key) -> list[str]:
    groups: dict[Any, list[str]] = {}
    for info in infos:
        groups.setdefault(key(info), []).append(info.user)
    if len(groups) <= 1:
        return []
    ranked = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    majority = ranked[0][0]
    others = "; ".join(f"{_short(v)} for {_names(users)}" for v, users in ranked[1:])
    return [f"{what} differs: most users have {_short(majority)}, but {others}"]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _names(users: list[str]) -> str:
    shown = ", ".join(users[:8])
    return shown + (f" and {len(users) - 8} more" if len(users) > 8 else "")
