"""A compression round: users' PEFT adapters → compressed store with its report.

Headers, shapes and base models are validated before any work. Slots are then read in chunks
of a bounded size: each user's file is opened once per chunk and every tensor is read once
(and checked for NaN/inf as it is read), so memory holds a chunk of slots' factors, never the
whole population; a slot bigger than the chunk is read one delta at a time. The store is built
under a temporary name and appears whole or not at all, so bad values found while reading
leave nothing behind.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from soppu import atomic
from soppu.adapter_sets import read_population
from soppu.adapters import AdapterInfo
from soppu.compression.clusters import Clustering
from soppu.compression.compress import CompressionConfig, SlotResult, cluster_slot, compress_slot
from soppu.compression.factors import LoRAFactors
from soppu.compression.report import build_report, slot_entry, write_report
from soppu.compression.slots import Slot, group_slots
from soppu.server.compressed_store import CompressedStore

Progress = Callable[[str, int, int], None]  # (what, done, total)


# The raw factors read at once, before their canonical form: a smaller chunk lowers the
# peak memory and costs more file opens (one per user per chunk).
CHUNK_BYTES = 128 * 2**20


class LoadedSlotItems(Sequence[LoRAFactors]):
    """A slot's (user, module) deltas, already read (a chunk of slots at a time)."""

    def __init__(self, slot: Slot, loaded: Mapping[str, Mapping[str, tuple]]):
        self._factors = [LoRAFactors(*loaded[u][m]) for u, m in slot.items]
        self.ranks = [f.rank for f in self._factors]
        self.shape = slot.shape

    def __len__(self) -> int:
        return len(self._factors)

    def __getitem__(self, index):  # type: ignore[override]
        return self._factors[index]


def slot_chunks(
    slots: list[Slot], adapters: Mapping[str, AdapterInfo], budget: int | None = None
) -> Iterator[tuple[list[Slot], Callable[[Slot], Sequence[LoRAFactors]]]]:
    """Consecutive slots whose factors fit `budget` (default CHUNK_BYTES), with how to get a
    slot's items: read for the whole chunk with one open per user's file, or (a slot over
    budget) lazily."""
    budget = CHUNK_BYTES if budget is None else budget
    chunk: list[Slot] = []
    size = 0
    for slot in [*slots, None]:
        need = _slot_bytes(slot, adapters) if slot is not None else 0
        if chunk and (slot is None or size + need > budget):
            yield chunk, _reader(chunk, adapters, size > budget)
            chunk, size = [], 0
        if slot is not None:
            chunk.append(slot)
            size += need


def _slot_bytes(slot: Slot, adapters: Mapping[str, AdapterInfo]) -> int:
    m, n = slot.shape
    return sum(4 * adapters[u].modules[mod].rank * (m + n) for u, mod in slot.items)


def _reader(chunk: list[Slot], adapters: Mapping[str, AdapterInfo], lazy: bool):
    if lazy:
        return lambda slot: LazySlotItems(slot, adapters)
    wanted: dict[str, list[str]] = {}
    for slot in chunk:
        for user, module in slot.items:
            wanted.setdefault(user, []).append(module)
    loaded = {user: adapters[user].load_many(modules) for user, modules in wanted.items()}
    return lambda slot: LoadedSlotItems(slot, loaded)


class LazySlotItems(Sequence[LoRAFactors]):
    """A slot's (user, module) deltas, each read from its file only when indexed; its shape and
    ranks come from the headers (`compression.factors.KnownItems`)."""

    def __init__(self, slot: Slot, adapters: Mapping[str, AdapterInfo]):
        self._items = slot.items
        self._adapters = adapters
        self.ranks = [adapters[u].modules[m].rank for u, m in slot.items]
        self.shape = slot.shape

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        user, module = self._items[index]
        A, B, scale = self._adapters[user].load(module)
        return LoRAFactors(A, B, scale)


def compress_adapters(
    paths: Mapping[str, Path],
    out: Path,
    config: CompressionConfig,
    *,
    progress: Progress | None = None,
    replace: bool = False,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compress every user's adapter in `paths` (user → dir) into the store `out`.

    Returns the manifest. Raises AdapterError (naming the files) before doing any work if the
    adapters are bad or do not belong together.
    """
    infos = read_population(paths, check_values=False)  # values: checked as they are read
    adapters = {info.user: info for info in infos}
    shapes = {info.user: {m: mi.shape for m, mi in info.modules.items()} for info in infos}
    slots = group_slots(shapes, config.group)
    entries, manifest_slots = [], []
    with atomic.building_dir(
        Path(out), replace=replace, inputs=paths.values(), kind="compressed store"
    ) as tmp:
        done = 0
        for chunk, read in slot_chunks(slots, adapters):
            for slot in chunk:
                _compress_one(tmp, slot, read(slot), config, entries, manifest_slots)
                done += 1
                if progress:
                    progress(slot.name, done, len(slots))
            del read  # this chunk's factors go before the next chunk is read
        if progress:
            progress("report", len(slots), len(slots))
        report = build_report(entries, config.as_dict())
        write_report(report, tmp / "report")
        manifest = _manifest(infos, config, manifest_slots, report["totals"], source)
        manifest = CompressedStore(tmp).write_manifest(manifest)
    return manifest


def _compress_one(
    tmp: Path,
    slot: Slot,
    items: Sequence[LoRAFactors],
    config: CompressionConfig,
    entries: list[dict[str, Any]],
    manifest_slots: list[dict[str, Any]],
) -> None:
    """Fit one slot (or its clusters), write it, and record its report and manifest entries."""
    start = time.perf_counter()
    if config.clusters == 1:
        fitted = [(slot, compress_slot(items, config, slot.module_groups()))]
    else:
        fitted = clustered_parts(slot, cluster_slot(items, config, slot.module_groups()))
    seconds = (time.perf_counter() - start) / len(fitted)
    for part, result in fitted:
        entry = slot_entry(part, result, seconds)
        if len(fitted) > 1:
            entry["cluster"] = {"of": slot.name, "count": len(fitted)}
        entries.append(entry)
        saved = CompressedStore(tmp).write_slot(part.name, result.stored)
        manifest_slots.append(manifest_slot(part, entry, saved))


def clustered_parts(slot: Slot, clustering: Clustering) -> list[tuple[Slot, SlotResult]]:
    """One sub-slot per cluster (`<slot>.c<j>`), each an ordinary slot over its items."""
    if clustering.count == 1:
        return [(slot, clustering.results[0])]
    parts = []
    for j, result in enumerate(clustering.results):
        items = tuple(slot.items[i] for i in clustering.members(j))
        parts.append((Slot(f"{slot.name}.c{j}", slot.shape, items), result))
    return parts


def manifest_slot(slot: Slot, entry: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    out = {
        "name": slot.name,
        **saved,
        "shape": list(slot.shape),
        "rank": entry["rank"],
        "sigma": entry["sigma"],
        "max_core_rank": entry["max_core_rank"],
        "params_after": entry["params_after"],
        "items": [list(item) for item in slot.items],
    }
    if "cluster" in entry:
        out["cluster"] = entry["cluster"]
    return out


def _manifest(
    infos: list[AdapterInfo],
    config: CompressionConfig,
    slots: list[dict[str, Any]],
    totals: dict[str, Any],
    source: dict[str, Any] | None,
) -> dict[str, Any]:
    first = infos[0].config
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": config.as_dict(),
        "base_model": infos[0].base_model,
        "adapter_config": {
            k: first[k]
            for k in (
                "task_type",
                "target_modules",
                "layers_to_transform",
                "layers_pattern",
                "fan_in_fan_out",
            )
            if k in first
        },
        "users": sorted(info.user for info in infos),
        "source": {
            **(source or {}),
            "adapters": {info.user: str(info.path) for info in infos},
        },
        "slots": slots,
        "totals": totals,
    }
