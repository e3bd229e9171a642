"""Central differential privacy for the global adapter, at the level of users.

As Flower's `DifferentialPrivacyServerSideFixedClipping` does: every user's update (reply minus
the start it was sent) is clipped to a fixed L2 norm `clip`, the clipped updates are averaged
without weights (a user's claimed `num-examples` would change the sensitivity), and Gaussian
noise of standard deviation `noise × clip / n` is added to every weight of the average: on the
sum of the n updates, one user's presence moves it by at most `clip` and the noise is
`noise × clip`. The robust mean's bounds (a multiple of the round's median norm, the
coordinate-wise median) depend on the other users' data and so carry no such guarantee; with
privacy on they are not used, and fixed clipping already bounds what one user can do (by
`clip / n`).

What it protects: the global adapter, hence everything anyone learns from it (every user's
start, what is served as "global"). Each user's personal adapter is trained on their own text
and published for them; it is not covered, as in every personalised federation.

ε is accounted with Rényi DP (Mironov 2017): the Gaussian mechanism costs α / (2 noise²) at
order α per round, rounds compose by adding, and (ε, δ) is the best conversion over a grid of
orders. It counts every round as if every user took part; sampling fewer users per round only
lowers the true ε, so the figure is an upper bound.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

from soppu.adapters import LoraState
from soppu.server.schemes.aggregate import Averaged, _norm, _update

# Rényi orders the conversion to (ε, δ) searches (Opacus' default grid)
ORDERS = (*(1 + x / 10.0 for x in range(1, 100)), *range(12, 64))


@dataclass(frozen=True)
class Privacy:
    noise: float  # noise multiplier: the noise's std over the clipping norm, on the sum
    clip: float  # each user's update is clipped to this L2 norm (all its tensors together)
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not (0 < self.noise < math.inf and 0 < self.clip < math.inf):
            raise ValueError(
                f"dp-noise and dp-clip must be finite and > 0, got {self.noise}, {self.clip}"
            )
        if not 0 < self.delta < 1:
            raise ValueError(f"dp-delta must be in (0, 1), got {self.delta}")


def private_mean(
    items: dict[str, tuple[LoraState, LoraState, int]],
    privacy: Privacy,
    generator: torch.Generator | None = None,
) -> Averaged:
    """The unweighted mean of `start + clipped update` over users (user → (trained, start,
    examples); the examples are not used), plus Gaussian noise of std noise × clip / n."""
    if not items:
        raise ValueError("nothing to average")
    if generator is None:  # noise nobody can replay: seeded from the OS's randomness
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    users = sorted(items)
    updates = {u: _update(items[u][0], items[u][1]) for u in users}
    clipped, scales = {}, {}
    for user in users:
        norm = _norm(updates[user])
        scales[user] = min(1.0, privacy.clip / norm) if norm > 0 else 1.0
        if norm > privacy.clip:
            clipped[user] = norm / privacy.clip
    std = privacy.noise * privacy.clip / len(users)
    first = items[users[0]][0]
    tensors = {}
    for key, like in first.tensors.items():
        mean = sum(items[u][1].tensors[key].double() + scales[u] * updates[u][key] for u in users)
        noise = torch.randn(like.shape, generator=generator, dtype=torch.float64) * std
        tensors[key] = (mean / len(users) + noise).to(like.dtype)
    return Averaged(LoraState(tensors, first.config), clipped, {})


def epsilon(noise: float, rounds: int, delta: float) -> float:
    """ε of `rounds` Gaussian releases of noise multiplier `noise` at δ (an upper bound)."""
    if rounds <= 0:
        return 0.0
    return min(
        rounds * alpha / (2 * noise**2) + math.log(1 / delta) / (alpha - 1) for alpha in ORDERS
    )
