"""Which deltas share a basis.

By default one slot per (layer, module): each weight matrix of the base model gets its own
U, V. Grouping by shape (the seed's behaviour) puts every layer of the same shape into one
basis: far fewer parameters, far more error. Items are (user, module) pairs, so a user appears
once per member module of a shape slot.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

GROUPINGS = ("slot", "shape")


@dataclass(frozen=True)
class Slot:
    name: str
    shape: tuple[int, int]  # (out m, in n)
    items: tuple[tuple[str, str], ...]  # (user, module path), in fitting order

    @property
    def modules(self) -> list[str]:
        return sorted({module for _, module in self.items})

    def module_groups(self) -> list[list[int]]:
        """Item indices per module: the populations over which personal parts are measured."""
        groups: dict[str, list[int]] = {}
        for i, (_, module) in enumerate(self.items):
            groups.setdefault(module, []).append(i)
        return list(groups.values())


def group_slots(
    shapes: Mapping[str, Mapping[str, tuple[int, int]]], by: str = "slot"
) -> list[Slot]:
    """Group users' modules into slots. `shapes[user][module] = (m, n)`."""
    if by not in GROUPINGS:
        raise ValueError(f"unknown grouping {by!r}: use one of {', '.join(GROUPINGS)}")
    buckets: dict[str, list[tuple[str, str]]] = {}
    slot_shape: dict[str, tuple[int, int]] = {}
    for user in sorted(shapes):
        for module, shape in shapes[user].items():
            key = module if by == "slot" else f"shape-{shape[0]}x{shape[1]}"
            if slot_shape.setdefault(key, tuple(shape)) != tuple(shape):
                raise ValueError(
                    f"module {module} of user {user!r} has shape {shape}, "
                    f"but other users have {slot_shape[key]}"
                )
            buckets.setdefault(key, []).append((user, module))
    return [
        Slot(name, slot_shape[name], tuple(sorted(items, key=lambda it: (it[1], it[0]))))
        for name, items in sorted(buckets.items(), key=lambda kv: module_sort_key(kv[0]))
    ]


def module_sort_key(path: str) -> tuple:
    """Natural order: layers.2 before layers.10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path))


def layer_index(module: str) -> int | None:
    """The decoder-layer index in a module path such as model.layers.3.self_attn.q_proj."""
    numbers = re.findall(r"\.(\d+)\.", f".{module}.")
    return int(numbers[0]) if numbers else None


def module_kind(module: str) -> str:
    """The module's own name (q_proj, v_proj, c_attn, ...)."""
    return module.rsplit(".", 1)[-1]
