"""FedAvg + fine-tuning: everyone starts from the global adapter; the personal adapter is the
global one fine-tuned for a round on the user's text, and their average the next global one.
What a user learned in earlier rounds survives only through the average."""

from __future__ import annotations

from soppu.adapters import LoraState
from soppu.server.schemes.aggregate import Averaged
from soppu.server.schemes.base import Reply, Scheme, global_or
from soppu.server.store import RunFolder


class FedAvgFT(Scheme):
    name = "fedavg-ft"

    def starts(self, run: RunFolder, users: list[str], template: LoraState):
        return dict.fromkeys(users, global_or(run, template))

    def aggregate(self, replies: dict[str, Reply]) -> Averaged | None:
        return self._mean_of_personal(replies)
