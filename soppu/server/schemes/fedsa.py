"""FedSA-LoRA (Guo et al., 2025): the A matrices learn what users share, the B matrices what is
theirs. Every user starts a round from the global A and their own latest B (zero before their
first round, so round 1 is FedAvg's); the replies' A matrices are averaged into the global
adapter, whose B is the replies' average too: the "one adapter for everyone" the served choice
and the evaluation compare with."""

from __future__ import annotations

from soppu.adapters import LoraState
from soppu.server.schemes.aggregate import Averaged
from soppu.server.schemes.base import Reply, Scheme, global_or
from soppu.server.store import RunFolder


def is_shared(key: str) -> bool:
    """FedSA shares a LoRA's A matrices (`lora_A`); B (`lora_B`) stays personal."""
    return ".lora_A." in key


class FedSA(Scheme):
    name = "fedsa"

    def starts(self, run: RunFolder, users: list[str], template: LoraState):
        shared = global_or(run, template)
        out = {}
        for user in users:
            own = run.latest(user)
            if own is None:
                out[user] = shared  # the first round: everyone alike, one correction
                continue
            tensors = {
                k: (shared.tensors[k] if is_shared(k) else own.tensors[k]) for k in own.tensors
            }
            out[user] = LoraState(tensors, own.config)
        return out

    def correction_point(self, run: RunFolder, template: LoraState) -> LoraState | None:
        return global_or(run, template)

    def aggregate(self, replies: dict[str, Reply]) -> Averaged | None:
        return self._mean_of_personal(replies)
