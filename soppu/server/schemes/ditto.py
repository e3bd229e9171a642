"""Ditto (Li et al., 2021), on LoRA tensors: each user trains two adapters a round, on the same
batches. The shared copy starts from the global adapter and the average of those copies is the
next global one (FedAvg); the personal adapter continues from the user's own latest (the
global one before their first round) with the proximal pull prox/2 · ‖P − G‖² towards the
global adapter G, so what a user learned persists across rounds while staying near what all
share. A round costs the client twice the steps, and two LoRAs in memory (a few MB)."""

from __future__ import annotations

from soppu.adapters import LoraState
from soppu.server.schemes.aggregate import Averaged
from soppu.server.schemes.base import Reply, Scheme, global_or
from soppu.server.store import RunFolder


class Ditto(Scheme):
    name = "ditto"
    two_tracks = True

    def starts(self, run: RunFolder, users: list[str], template: LoraState):
        shared = global_or(run, template)
        return {user: run.latest(user) or shared for user in users}

    def anchor(self, run: RunFolder, template: LoraState) -> LoraState | None:
        return global_or(run, template)

    def correction_point(self, run: RunFolder, template: LoraState) -> LoraState | None:
        return global_or(run, template)

    def aggregate(self, replies: dict[str, Reply]) -> Averaged | None:
        shared = {
            u: (r.shared, r.anchor, r.examples)
            for u, r in replies.items()
            if r.shared is not None and r.anchor is not None
        }
        if len(shared) != len(replies):
            raise ValueError("ditto: a reply without its shared copy")
        return self.average(shared)
