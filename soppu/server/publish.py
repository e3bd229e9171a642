"""Publishing: a compressed store → a serving version that PEFT, LoRAX and vLLM load.

    SERVING/vNNNN/manifest.json        users, base model, rank, checksums, source store
    SERVING/vNNNN/users/<user>/        adapter_config.json + adapter_model.safetensors only
    SERVING/vNNNN/shared/              bases and cores (the store's slot files + manifest)
    SERVING/vNNNN/report/              the reconstruction-error report
    SERVING/current -> vNNNN           switched atomically once the version is complete

A version is built under a temporary name and renamed into place; `current` moves only after
that, so a failed publish leaves the previous version and `current` untouched.

Every published adapter has every target module on every layer of the base model: layers a
user's LoRA does not touch (an emulator-trained LoRA covers the layers the emulator keeps) get
zero factors, because LoRAX drops a module type for the whole adapter when any layer lacks it.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from soppu import atomic
from soppu.adapters import LoraState, lora_config, lora_files
from soppu.compression.export import SERVING_RANKS, export_lora, serving_rank
from soppu.server.compressed_store import MANIFEST, CompressedStore, StoreError, sha256
from soppu.server.versions import REPORT, ServingVersion, Versions
from soppu.userids import check_user_id

Progress = Callable[[str, int, int], None]
SERVING_FORMAT = "soppu-serving/1"


def publish(
    store: Path,
    serving: Path,
    *,
    export_rank: int | None = None,
    num_layers: int | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write the next serving version from `store`; returns its directory.

    `num_layers`: the base model's decoder layers, every one of which the published adapters
    cover (default: the store's record of it, else one past the highest layer adapted)."""
    store, serving = Path(store), Path(serving)
    manifest = CompressedStore(store).verified()
    num_layers = num_layers or manifest.get("source", {}).get("num_layers")
    needed = max((s["max_core_rank"] for s in manifest["slots"]), default=1)
    rank = export_rank or serving_rank(needed)
    if rank not in SERVING_RANKS:
        raise ValueError(f"export rank {rank} is not one of {SERVING_RANKS} (what LoRAX loads)")
    versions = Versions(serving)
    versions.check()
    with versions.lock():  # one publisher at a time takes the next number and moves `current`
        version = versions.next().name
        with atomic.building_dir(serving / version, locked=False, kind="serving version") as tmp:
            built = ServingVersion(tmp)  # the layout a version is read by, written here
            users = _write_users(store, manifest, built.users_dir, rank, num_layers, progress)
            CompressedStore(store).copy_to(built.shared)
            if (store / REPORT).is_dir():
                shutil.copytree(store / REPORT, built.report)
            atomic.write_json(
                built.manifest_path,
                _serving_manifest(store, manifest, version, rank, needed, users),
            )
        versions.point_current(serving / version)
    return serving / version


def _write_users(
    store: Path,
    manifest: dict[str, Any],
    out: Path,
    rank: int,
    num_layers: int | None,
    progress: Progress | None,
) -> dict[str, dict[str, Any]]:
    slots = [CompressedStore(store).slot(entry) for entry in manifest["slots"]]
    index: dict[str, list] = {user: [] for user in manifest["users"]}
    shapes: dict[str, tuple[int, int]] = {}
    for slot in slots:
        for i, (user, module) in enumerate(slot.entry["items"]):
            index[user].append((slot, i, module))
            shapes[module] = tuple(slot.entry["shape"])
    every = every_layer(shapes, num_layers)
    # Every layer is written (zeros where no user has a LoRA), so no layer selection remains.
    source = {**manifest.get("adapter_config", {}), "layers_to_transform": None}
    source["layers_pattern"] = None
    config = lora_config(rank=rank, base_model=manifest["base_model"], source=source)
    written = {}
    for done, user in enumerate(manifest["users"]):
        check_user_id(user, source=str(store / MANIFEST))
        if progress:
            progress(user, done, len(manifest["users"]))
        tensors = {
            module: (torch.zeros(rank, n), torch.zeros(m, rank)) for module, (m, n) in every.items()
        }
        for slot, i, module in index[user]:
            tensors[module] = export_lora(slot.form.Qu, slot.core(i), slot.form.Qv, rank)
        files = lora_files(LoraState.from_factors(dict(sorted(tensors.items())), config))
        (out / user).mkdir(parents=True)
        for name, data in files.items():
            (out / user / name).write_bytes(data)
        written[user] = {
            "adapter": (out / user).relative_to(out.parent).as_posix(),
            "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
        }
    return written


_LAYER = re.compile(r"^(?P<head>.+?\.)(?P<index>\d+)(?P<tail>\..+)$")


def every_layer(
    shapes: dict[str, tuple[int, int]], num_layers: int | None
) -> dict[str, tuple[int, int]]:
    """Every module path of `shapes`' kinds on each of `num_layers` layers, with its shape:
    `model.layers.3.self_attn.q_proj` stands for `model.layers.<i>.self_attn.q_proj`."""
    kinds: dict[tuple[str, str], tuple[int, int]] = {}
    highest = -1
    for module, shape in shapes.items():
        match = _LAYER.match(module)
        if match is None:
            continue  # not in a numbered layer list: nothing to pad
        kinds[match["head"], match["tail"]] = shape
        highest = max(highest, int(match["index"]))
    count = num_layers or highest + 1
    padded = {
        f"{head}{i}{tail}": shape for (head, tail), shape in kinds.items() for i in range(count)
    }
    return {**padded, **shapes}


def _serving_manifest(
    store: Path,
    manifest: dict[str, Any],
    version: str,
    rank: int,
    needed: int,
    users: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    return {
        "format": SERVING_FORMAT,
        "version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_model": manifest["base_model"],
        "export_rank": rank,
        "lora_alpha": rank,
        # Exact when every core's rank fits the serving rank; else best rank-k' truncation.
        "export_exact": needed <= rank,
        "max_core_rank": needed,
        "source": {
            "store": str(store.resolve()),
            "store_manifest_sha256": sha256(store / MANIFEST),
            "run": manifest.get("source", {}).get("run"),
            # what each user's adapter is (personal, global or base), where a run chose it
            **{k: v for k, v in manifest.get("source", {}).items() if k == "served"},
        },
        "compression": manifest["config"],
        "totals": manifest["totals"],
        "users": users,
    }


def verify_version(version: Path) -> dict[str, Any]:
    """A serving version's manifest, once every file it lists checks out: the shared bases
    and cores, and each user's published PEFT files; StoreError names the first that does
    not (changed, corrupt, missing). What is served, or called healthy, has passed this."""
    published = ServingVersion(version)
    CompressedStore(published.shared).verified()
    for path, digest in published.checksums():
        if not path.is_file():
            raise StoreError(f"{path}: missing")
        if sha256(path) != digest:
            raise StoreError(f"{path}: checksum mismatch (the file changed or is corrupt)")
    return published.manifest
