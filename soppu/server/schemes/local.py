"""Purely local: every user continues their own adapter; nothing is shared or averaged (the
baseline a personal part must beat where users differ)."""

from __future__ import annotations

from soppu.adapters import LoraState
from soppu.server.schemes.aggregate import Averaged
from soppu.server.schemes.base import Reply, Scheme
from soppu.server.store import RunFolder


class Local(Scheme):
    name = "local"

    def starts(self, run: RunFolder, users: list[str], template: LoraState):
        return {user: run.latest(user) or template for user in users}

    def aggregate(self, replies: dict[str, Reply]) -> Averaged | None:
        return None
