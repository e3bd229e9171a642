"""New users into a compressed store without recompressing everyone.

Each new user's adapter is projected onto every slot's existing bases (`compression.project`):
their cores only, the old users' bytes copied unchanged. The report gives the new users'
errors and each slot's drift, the share of the new users' energy outside its bases. A slot
whose drift passes `refit_above` is refit on every user's own adapter, warm-started from its
bases (full cores; diagonal ones refit from the HOSVD start); only there do old users' cores
change, and the manifest says which slots refit.

    STORE/                 the store as it was (never modified)
    OUT/                   a complete store: old users + new ones, with manifest["added"]
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from soppu import atomic
from soppu.adapter_sets import read_population
from soppu.adapters import AdapterError, AdapterInfo
from soppu.compression.clusters import subset
from soppu.compression.compress import CompressionConfig, SlotResult, cluster_slot, fit_stack
from soppu.compression.core_size import core_params
from soppu.compression.factors import canonicalize
from soppu.compression.methods import method_named
from soppu.compression.project import Projected
from soppu.compression.report import (
    build_report,
    item_record,
    slot_entry,
    slot_record,
    write_report,
)
from soppu.compression.residuals import OrthoForm, relative, squared_errors
from soppu.compression.slots import Slot
from soppu.compression.storage import SlotStorage
from soppu.server.compress_store import LazySlotItems, Progress, clustered_parts, manifest_slot
from soppu.server.compressed_store import CompressedStore, StoredSlot, StoreError


def add_adapters(
    store: Path,
    paths: Mapping[str, Path],
    out: Path,
    *,
    refit_above: float | None = None,
    originals: Mapping[str, Path] | None = None,
    progress: Progress | None = None,
    replace: bool = False,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `out`: `store` with the users in `paths` added. Returns the new manifest.

    `originals` (user → adapter dir) are the old users' own adapters, needed only where a
    slot refits; by default the paths the store recorded, if they still exist. `source`
    updates the manifest's record of where the adapters came from.
    """
    # Long for a reason: one pass over the slots that reads, projects or refits, and writes
    # each in turn, so that no slot's factors outlive its own step.
    store, out = Path(store), Path(out)
    manifest = CompressedStore(store).verified()
    new = _check_new(store, manifest, read_population(paths))
    # Projection is cheap and the bases are read on the CPU, so adding runs there (a store
    # compressed on a GPU grows on any machine).
    config = CompressionConfig(**{**manifest["config"], "device": "cpu"})
    previous = _old_report(store)
    read_originals: dict[str, AdapterInfo] = {}  # each old user's adapter read once
    entries, manifest_slots, added = [], [], {}
    groups = _slot_groups(manifest["slots"])
    inputs = [store, *paths.values(), *(originals or {}).values()]
    with atomic.building_dir(out, replace=replace, inputs=inputs, kind="compressed store") as tmp:
        for done, (name, members) in enumerate(groups):
            if progress:
                progress(name, done, len(groups))
            began = time.perf_counter()
            slot = Slot(name, tuple(members[0]["shape"]), _new_items(members, new))
            items = LazySlotItems(slot, new)
            stack = canonicalize(items, device=config.device)
            stored = [CompressedStore(store).slot(member) for member in members]
            choice, drift = _assign(stack, stored)
            refit = refit_above is not None and drift > refit_above
            added[name] = {"drift": drift, "refit": refit}
            old = tuple(tuple(item) for member in members for item in member["items"])
            everyone = Slot(name, slot.shape, (*old, *slot.items))
            if refit:
                found = _originals(store, manifest, originals, members, read_originals)
                adapters = {**found, **new}
                made = [
                    (
                        part,
                        slot_entry(part, result, 0.0),
                        CompressedStore(tmp).write_slot(part.name, result.stored),
                    )
                    for part, result in _refit(everyone, adapters, config, stored)
                ]
            else:
                new_rows = (slot, stack, items.ranks)
                made = [
                    _append_one(tmp, store, member, stored[j], new_rows, choice == j, previous)
                    for j, member in enumerate(members)
                ]
            seconds = (time.perf_counter() - began) / len(made)
            for part, entry, saved in made:
                entry |= {"drift": drift, "refit": refit, "seconds": seconds}
                if len(made) > 1:
                    entry["cluster"] = {"of": name, "count": len(made)}
                entries.append(entry)
                manifest_slots.append(manifest_slot(part, entry, saved))
        report = build_report(entries, config.as_dict())
        write_report(report, tmp / "report")
        result = _new_manifest(manifest, manifest_slots, report, new, added, refit_above)
        result["source"] |= source or {}
        result = CompressedStore(tmp).write_manifest(result)
    return result


def _slot_groups(slots: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Slots by the slot they belong to: a clustered slot's sub-slots together."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for entry in slots:
        groups.setdefault(entry.get("cluster", {}).get("of", entry["name"]), []).append(entry)
    return list(groups.items())


def _assign(stack, stored: list[StoredSlot]) -> tuple[Tensor, float]:
    """Each new item's cluster (the one it drifts least from) and the energy-weighted drift."""
    drifts = torch.stack([_project(stack, slot).drift for slot in stored])
    choice = drifts.argmin(dim=0)
    held = drifts.gather(0, choice[None]).flatten()
    norms = stack.sq_norms()
    total = float(norms.sum())
    return choice, float((held * norms).sum()) / total if total > 0 else 0.0


def _append_one(
    tmp: Path,
    store: Path,
    member: dict[str, Any],
    stored: StoredSlot,
    new_rows: tuple[Slot, Any, list[int]],
    mine: Tensor,
    previous: tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]],
) -> tuple[Slot, dict[str, Any], dict[str, Any]]:
    """One (sub-)slot with the new items assigned to it appended after its old ones;
    `new_rows`: the new items' slot, canonical stack and LoRA ranks."""
    slot, stack, lora_ranks = new_rows
    chosen = torch.nonzero(mine).flatten().tolist()
    items = tuple(slot.items[i] for i in chosen)
    part = Slot(member["name"], slot.shape, (*map(tuple, member["items"]), *items))
    old_items, old_slots = previous
    if not chosen:  # no new user here: the (sub-)slot as it was
        storage = _read(store, member)
        entry = {**old_slots[member["name"]], "per_item": old_items[member["name"]]}
        entry["bytes_after"] = storage.nbytes  # a format-1 slot is re-written in format 2
        entry["ratio"] = entry["bytes_before"] / storage.nbytes
        return part, entry, CompressedStore(tmp).write_slot(member["name"], storage)
    sub = subset(stack, chosen)
    projected = _project(sub, stored)
    storage = _appended(store, member, stored, projected)
    entry = _appended_entry(
        old_slots[member["name"]],
        old_items[member["name"]],
        part,
        storage,
        (sub, [lora_ranks[i] for i in chosen]),
        projected,
    )
    return part, entry, CompressedStore(tmp).write_slot(member["name"], storage)


def _check_new(
    store: Path, manifest: dict[str, Any], infos: list[AdapterInfo]
) -> dict[str, AdapterInfo]:
    """The new users by id; refused by name if already stored or if they do not fit."""
    clash = sorted(info.user for info in infos if info.user in manifest["users"])
    if clash:
        raise AdapterError(f"{store}: already holds {', '.join(clash)}; add only new users")
    shapes = {m: tuple(s["shape"]) for s in manifest["slots"] for _, m in s["items"]}
    for info in infos:
        if info.base_model != manifest["base_model"]:
            raise AdapterError(
                f"{info.path}: base model {info.base_model}, the store's is "
                f"{manifest['base_model']}"
            )
        missing = sorted(set(shapes) - set(info.modules))
        extra = sorted(set(info.modules) - set(shapes))
        if missing or extra:
            raise AdapterError(
                f"{info.path}: modules differ from the store's: missing {missing[:3]}, "
                f"extra {extra[:3]}"
            )
        for module, mod in info.modules.items():
            if mod.shape != shapes[module]:
                raise AdapterError(
                    f"{info.path}: {module} has shape {mod.shape}, the store's is {shapes[module]}"
                )
    return {info.user: info for info in infos}


def _new_items(members: list[dict[str, Any]], new: dict[str, AdapterInfo]) -> tuple:
    modules = sorted({module for member in members for _, module in member["items"]})
    return tuple((user, module) for user in sorted(new) for module in modules)


def _project(stack, stored: StoredSlot) -> Projected:
    """New users' cores by the method that made the slot."""
    try:
        method = method_named(stored.entry.get("sigma", "full"))
    except ValueError as exc:
        raise StoreError(f"{stored.path}: {exc}") from None
    return method.project(stack, stored.reader, stored.form)


def _appended(
    store: Path, slot_manifest: dict[str, Any], stored: StoredSlot, projected: Projected
) -> SlotStorage:
    """The old slot file's tensors with the new users' rows after them."""
    form = slot_manifest["core_form"]
    old = _read(store, slot_manifest)
    if form == "diag":
        return old.with_rows({"sigma": projected.sigma})
    left, right = projected.core_factors
    left, right = stored.reader.to_stored_coordinates(left, right)
    if form == "factored":
        left, right = _to_width(left, right, _factor_width(old), store / slot_manifest["file"])
        return old.with_rows({"core_left": left, "core_right": right})
    return old.with_rows({"cores": left @ right})


def _factor_width(storage: SlotStorage) -> int:
    """k of the stored core factors (N × r_U × k)."""
    if storage.bits == 32:
        return int(storage.floats["core_left"].shape[-1])
    return int(storage.quantized["core_left"].shape[-1])


def _to_width(left: Tensor, right: Tensor, width: int, file: Path) -> tuple[Tensor, Tensor]:
    """New users' core factors at the stored factors' width k: zero-padded when theirs is
    smaller; columns that are all zero (ranks above the user's own) dropped when larger."""
    k = left.shape[-1]
    if k < width:
        left = torch.nn.functional.pad(left, (0, width - k))
        right = torch.nn.functional.pad(right, (0, 0, 0, width - k))
    elif k > width:
        used = (left.abs().sum(dim=(0, 1)) > 0) | (right.abs().sum(dim=(0, 2)) > 0)
        if int(used.sum()) > width:
            raise AdapterError(
                f"{file}: the new users' LoRA rank ({int(used.sum())}) is above the rank the "
                f"store's core factors hold ({width}); compress everyone with `soppu compress`"
            )
        left, right = left[..., used], right[:, used]
        left, right = _to_width(left, right, width, file)
    return left, right


def _read(store: Path, slot_manifest: dict[str, Any]) -> SlotStorage:
    return SlotStorage.from_file(
        slot_manifest["core_form"],
        int(slot_manifest.get("bits", 32)),
        load_file(store / slot_manifest["file"]),
        slot_manifest.get("shapes", {}),
        slot_manifest.get("codec", "raw"),
    )


def _appended_entry(
    old_slot: dict[str, Any],
    old_items: list[dict[str, Any]],
    everyone: Slot,
    storage: SlotStorage,
    new: tuple[Any, list[int]],
    projected: Projected,
) -> dict[str, Any]:
    """The slot's report entry: the old users' numbers as they were, the new users' from
    what is now stored (after quantisation, if the store quantises); `new`: the new items'
    canonical stack and LoRA ranks."""
    stack, lora_ranks = new
    count = stack.count
    form = storage.form_read_back(start=len(old_items))  # the new rows only
    new_cores = form.cores
    sq_errors = squared_errors(stack, OrthoForm(form.Qu, form.Qv, new_cores))
    errors = relative(sq_errors, stack.sq_norms())
    m, n = everyone.shape
    k = _factor_width(storage) if storage.form == "factored" else stack.rank
    new_items = everyone.items[-count:]
    per_item = [dict(item) for item in old_items] + [
        item_record(user, module, float(errors[i]), float(projected.errors[i]), None)
        for i, (user, module) in enumerate(new_items)
    ]
    ranks = (form.Qu.shape[1], form.Qv.shape[1])
    params_before = old_slot["params_before"] + sum(lora_ranks) * (m + n)
    params_after = old_slot["params_after"] + _core_params(storage.form, ranks, k, count)
    new_ranks = int(torch.linalg.matrix_rank(new_cores.double(), rtol=1e-6).max())
    # no fit ran: the old certificate does not cover the new users
    return slot_record(
        everyone,
        ranks=ranks,
        sigma=old_slot["sigma"],
        params=(params_before, params_after),
        bits=storage.bits,
        bytes_after=storage.nbytes,
        max_core_rank=max(old_slot.get("max_core_rank", 0), new_ranks),
        per_item=per_item,
    )


def _core_params(form: str, ranks: tuple[int, int], k: int, count: int) -> int:
    return count * core_params(form, k, *ranks)


def _refit(
    everyone: Slot,
    adapters: dict[str, AdapterInfo],
    config: CompressionConfig,
    stored: list[StoredSlot],
) -> list[tuple[Slot, SlotResult]]:
    """Every user's own adapter, fitted again: from the slot's current bases, or (a clustered
    slot) into as many clusters as before."""
    items = LazySlotItems(everyone, adapters)
    if len(stored) > 1:
        config = replace(config, clusters=len(stored))
        return clustered_parts(everyone, cluster_slot(items, config, everyone.module_groups()))
    stack = canonicalize(items, device=config.device)
    ranks = torch.as_tensor(items.ranks)
    init = (stored[0].form.Qu, stored[0].form.Qv)
    return [(everyone, fit_stack(stack, ranks, config, everyone.module_groups(), init=init))]


def _originals(
    store: Path,
    manifest: dict[str, Any],
    originals: Mapping[str, Path] | None,
    members: list[dict[str, Any]],
    read: dict[str, AdapterInfo],
) -> dict[str, AdapterInfo]:
    """The old users' own adapters (given, else recorded), read once into `read`."""
    recorded = {u: Path(p) for u, p in manifest.get("source", {}).get("adapters", {}).items()}
    paths = {**recorded, **(originals or {})}
    users = sorted({user for member in members for user, _ in member["items"]})
    missing = [
        u for u in users if u not in read and (u not in paths or not Path(paths[u]).is_dir())
    ]
    if missing:
        raise StoreError(
            f"{store}: slot {members[0]['name']} drifts past --refit-above and a refit needs "
            f"every old user's own adapter; missing {', '.join(missing[:5])} (pass "
            "--originals DIR, or recompress)"
        )
    unread = {u: paths[u] for u in users if u not in read}
    read |= {info.user: info for info in read_population(unread)} if unread else {}
    return {u: read[u] for u in users}


def _old_report(store: Path) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict]]:
    """The old report's per-item numbers and slot entries by slot (they stay true for the
    old users: their cores are copied)."""
    path = store / "report" / "report.json"
    if not path.is_file():
        raise StoreError(f"{path}: missing; the store's report is needed to add users")
    report = json.loads(path.read_text())
    by_slot: dict[str, list[dict[str, Any]]] = {s["slot"]: [] for s in report["slots"]}
    keys = ("user", "module", "error", "error_float", "personal_error")
    for item in report["items"]:
        by_slot[item["slot"]].append({k: item.get(k) for k in keys})
    return by_slot, {s["slot"]: s for s in report["slots"]}


def _new_manifest(
    manifest: dict[str, Any],
    slots: list[dict[str, Any]],
    report: dict[str, Any],
    new: dict[str, AdapterInfo],
    added: dict[str, dict[str, Any]],
    refit_above: float | None,
) -> dict[str, Any]:
    drifts = [a["drift"] for a in added.values()]
    adapters = {**manifest.get("source", {}).get("adapters", {})}
    adapters |= {user: str(info.path) for user, info in new.items()}
    # (a refit slot read every old user's own adapter from `originals`, recorded as they were)
    return {
        **manifest,
        "users": sorted({*manifest["users"], *new}),
        "source": {**manifest.get("source", {}), "adapters": adapters},
        "slots": slots,
        "totals": report["totals"],
        "added": {
            "users": sorted(new),
            "refit_above": refit_above,
            "drift_max": max(drifts, default=0.0),
            "refit_slots": sorted(name for name, a in added.items() if a["refit"]),
            "slots": added,
        },
    }
