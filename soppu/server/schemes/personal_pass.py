"""The final personalisation pass (`--personal-pass N`): after the last round every user
fine-tunes the final global adapter for up to N steps and keeps the step whose adapter is best
on their own validation text (the start counts, so a user's pass never ends worse there than
the global adapter). A user whose pass beats the global adapter at no step keeps the adapter
the rounds left them (their last fine-tune, or a scheme's personal part; one the rounds left
nothing takes the global adapter): the pass offers
nothing better, and the served choice still weighs that adapter against the global one on
the full model. Not a scheme of its own: it follows any scheme with a global adapter, so
the round loop runs it as one more round whose starts are this object's."""

from __future__ import annotations

from collections.abc import Mapping

from soppu.adapters import LoraState
from soppu.server.schemes.aggregate import Averaged
from soppu.server.schemes.base import Reply, Scheme, global_or
from soppu.server.store import RunFolder


class PersonalPass(Scheme):
    name = "personal-pass"

    def starts(self, run: RunFolder, users: list[str], template: LoraState):
        return dict.fromkeys(users, global_or(run, template))  # one object: one correction

    def replaces(self, metrics: Mapping[str, float]) -> bool:
        return metrics.get("best-step", 0) > 0

    def aggregate(self, replies: dict[str, Reply]) -> Averaged | None:
        return None  # the global adapter stays the last round's
