"""The scheme interface: the questions the round loop asks, and what every scheme shares."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from soppu.adapters import LoraState
from soppu.server.schemes.aggregate import DEFAULT, Averaged, Robustness, robust_mean
from soppu.server.schemes.privacy import Privacy, private_mean
from soppu.server.store import RunFolder


@dataclass(frozen=True)
class Reply:
    """One user's accepted reply in a round, beside what it was trained from."""

    personal: LoraState  # what the user keeps and is published
    start: LoraState  # what the personal adapter was trained from this round
    examples: int  # the user's claimed num-examples: a (capped) weight in the average
    shared: LoraState | None = None  # two-track schemes: the copy trained from the anchor
    anchor: LoraState | None = None  # ... and its start


class Scheme(ABC):
    name: ClassVar[str]
    # the client trains a second, shared copy from the anchor (twice the steps per round)
    two_tracks: ClassVar[bool] = False

    def __init__(
        self,
        prox: float = 0.0,
        robustness: Robustness = DEFAULT,
        privacy: Privacy | None = None,
    ):
        self.prox = prox  # two-track schemes: the pull of the personal adapter to the anchor
        self.robustness = robustness  # how replies are averaged (soppu/server/schemes/aggregate.py)
        self.privacy = privacy  # central DP instead of the robust mean (privacy.py)

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

    def replaces(self, metrics: Mapping[str, float]) -> bool:
        """Whether a user's accepted reply replaces the adapter they keep (else theirs stays
        as the last round left it; a user who has none yet takes the reply's)."""
        return True

    @abstractmethod
    def aggregate(self, replies: dict[str, Reply]) -> Averaged | None:
        """The next global adapter from this round's replies (None: the scheme has none)."""

    def average(self, items: dict[str, tuple[LoraState, LoraState, int]]) -> Averaged:
        """user → (trained, start, examples) averaged: privately where privacy is on, else by
        the robust mean."""
        if self.privacy is not None:
            return private_mean(items, self.privacy)
        return robust_mean(items, self.robustness)

    def _mean_of_personal(self, replies: dict[str, Reply]) -> Averaged:
        return self.average({u: (r.personal, r.start, r.examples) for u, r in replies.items()})


def global_or(run: RunFolder, template: LoraState) -> LoraState:
    """The global adapter, or the fresh LoRA before the first average."""
    return run.global_adapter() or template
