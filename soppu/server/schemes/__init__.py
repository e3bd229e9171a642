"""Federated schemes: what each user starts a round from, what the server averages, what stays
personal. The round loop (`soppu/server/federation.py`) knows no scheme by name; it calls these.

    fedavg-ft   every user starts from the global adapter; the replies are the personal
                adapters and their average the next global one (FedAvg + fine-tuning)
    local       every user continues their own adapter; nothing is averaged
    fedsa       FedSA-LoRA: every user starts from the global A and their own B; the replies'
                A matrices are what the federation shares, the B matrices stay personal
    ditto       Ditto: two tracks per user, a shared copy trained from the global adapter (the
                average of those is the next global one) and the personal adapter continued
                from the user's own, pulled towards the global one by prox/2 · ‖P − G‖²
    local-prox  the default: Ditto's personal track alone (L2GD), every user continues their
                own adapter, pulled towards the global one, and their average is the next
                global one

Every scheme publishes one plain PEFT adapter per user (the personal one), so compression,
serving, PEFT and vLLM see no difference; the global adapter, where a scheme has one, is the
"one adapter for everyone" the served choice and the evaluation compare with.
"""

from __future__ import annotations

from soppu.server.schemes.aggregate import DEFAULT, Averaged, Robustness, robust_mean
from soppu.server.schemes.base import Reply, Scheme
from soppu.server.schemes.ditto import Ditto
from soppu.server.schemes.fedavg_ft import FedAvgFT
from soppu.server.schemes.fedsa import FedSA
from soppu.server.schemes.local import Local
from soppu.server.schemes.local_prox import LocalProx
from soppu.server.schemes.privacy import Privacy, epsilon, private_mean

SCHEMES: dict[str, type[Scheme]] = {s.name: s for s in (FedAvgFT, Local, FedSA, Ditto, LocalProx)}

__all__ = [
    "SCHEMES",
    "Averaged",
    "Privacy",
    "Reply",
    "Robustness",
    "Scheme",
    "epsilon",
    "private_mean",
    "robust_mean",
    "scheme_for",
]


def scheme_for(
    name: str,
    prox: float = 0.0,
    robustness: Robustness = DEFAULT,
    privacy: Privacy | None = None,
) -> Scheme:
    if name not in SCHEMES:
        raise ValueError(f"scheme must be one of {tuple(SCHEMES)}, got {name!r}")
    return SCHEMES[name](prox=prox, robustness=robustness, privacy=privacy)
