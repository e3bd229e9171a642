"""Local adapters pulled towards their average (L2GD: Hanzely & Richtárik, 2020, "Federated
Learning of a Mixture of Global and Local Models", with local steps): every user continues
their own adapter P from round to round, pulled towards the global adapter G by
prox/2 · ‖P − G‖², and the next global adapter is the (robust) average of the personal ones.

It is Ditto's personal track without Ditto's second, shared track: one training a round, so
the client pays fedavg-ft's steps, not twice them. Over the default two rounds its personal
adapters are Ditto's to within the round-1 anchor (Ditto averages copies trained without the
pull; here the pulled adapters themselves); its global adapter is the average of adapters that
each continued their own, not of copies fine-tuned from the last global one."""

from __future__ import annotations

from soppu.server.schemes.aggregate import Averaged
from soppu.server.schemes.base import Reply
from soppu.server.schemes.ditto import Ditto


class LocalProx(Ditto):
    """Ditto's starts, anchor and correction point; one track, and a different average."""

    name = "local-prox"
    two_tracks = False

    def aggregate(self, replies: dict[str, Reply]) -> Averaged | None:
        # Each personal adapter measured from the anchor everyone was pulled to, so the robust
        # mean clips and takes the median of where users ended, not of steps from starts that
        # are the users' own (and would enter the average unclipped).
        if any(r.anchor is None for r in replies.values()):
            raise ValueError("local-prox: a reply without the anchor it was pulled to")
        return self.average({u: (r.personal, r.anchor, r.examples) for u, r in replies.items()})
