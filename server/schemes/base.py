"""The scheme interface: four questions the round loop asks, and FedAvg, which three share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from server.store import RunFolder
from soppu.adapters import LoraState


@dataclass(frozen=True)
class Reply:
    """One user's accepted reply in a round."""

    personal: LoraState  # what the user keeps and is published
    examples: int  # FedAvg's weight
    shared: LoraState | None = None  # two-track schemes: the copy trained from the anchor


class Scheme(ABC):
    name: ClassVar[str]
    # the client trains a second, shared copy from the anchor (twice the steps per round)
    two_tracks: ClassVar[bool] = False

    def __init__(self, prox: float = 0.0):
        self.prox = prox  # two-track schemes: the pull of the personal adapter to the anchor

    @abstractmethod
    def starts(self, run: RunFolder, users: list[str], template: LoraState) -> dict[str, LoraState]:
        """What each user's (personal) training starts from this round; users sharing a start
        share one LoraState object (one gradient correction for them all)."""

    def anchor(self, run: RunFolder, template: LoraState) -> LoraState | None:
        """Two-track schemes: the shared copy's start and the personal pull's target."""
        return None

    def correction_point(self, run: RunFolder, template: LoraState) -> LoraState | None:
        """Where one gradient correction is measured for every user (None: at each user's own
        start). The emulator's bias moves slowly with the adapter, so schemes whose starts
        differ only in their personal part measure it once, at the global adapter."""
        return None

    @abstractmethod
    def aggregate(self, replies: dict[str, Reply]) -> LoraState | None:
        """The next global adapter from this round's replies (None: the scheme has none)."""


def fedavg(loras: dict[str, tuple[LoraState, int]]) -> LoraState:
    """Average every LoRA tensor (A and B alike), weighted by training examples."""
    total = sum(n for _, n in loras.values())
    first = next(iter(loras.values()))[0]
    tensors = {
        key: sum(lora.tensors[key] * (n / total) for lora, n in loras.values())
        for key in first.tensors
    }
    return LoraState(tensors, first.config)


def global_or(run: RunFolder, template: LoraState) -> LoraState:
    """The global adapter, or the fresh LoRA before the first average."""
    return run.global_adapter() or template
