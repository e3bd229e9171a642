"""Several bases per slot: users who do not share one subspace get one each (Compress-then-
Serve's clusters).

Users start in clusters by k-means on how their energy falls on the leading joint directions
(users living in different subspaces light up different directions). Then, alternately, each
cluster is fitted on its users and each user moves to the cluster whose bases hold most of its
delta, ‖Q_uᵀ D_i Q_v‖², until no user moves. Every fit is the ordinary joint diagonalisation,
so a cluster's result is an ordinary `SlotResult` over its users.

`engine.cluster_slot` compares counts at one storage budget: the single basis at the requested
rank sets it, and c clusters get the largest rank whose storage fits it (with an energy target,
the count that meets it most cheaply wins). Clusters are used only where they do better.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from soppu.compression.factors import CanonicalStack, project
from soppu.compression.joint import hosvd_spectra, user_weights
from soppu.compression.methods import CompressionMethod

MAX_AUTO_CLUSTERS = 4


@dataclass
class Clustering:
    labels: Tensor  # cluster of every item
    results: list  # SlotResult per cluster, over the items with that label, in order

    @property
    def count(self) -> int:
        return len(self.results)

    def members(self, cluster: int) -> list[int]:
        return torch.nonzero(self.labels == cluster).flatten().tolist()

    def sq_error(self) -> float:
        return sum(float((r.fit.weights.cpu() * r.sq_errors).sum()) for r in self.results)

    def bytes_after(self) -> int:
        return sum(r.bytes_after() for r in self.results)


def subset(stack: CanonicalStack, members: Sequence[int]) -> CanonicalStack:
    """The members' items, padded only to their own largest rank (so a cluster's storage is
    counted, and stored, at its own k)."""
    index = torch.as_tensor(list(members), dtype=torch.long, device=stack.S.device)
    S = stack.S[index]
    k = max(1, int((S != 0).sum(dim=1).max()))  # singular values sort, padding zeros last
    return CanonicalStack(stack.Et[index, :k], S[:, :k], stack.Ft[index, :k])


def initial_labels(stack: CanonicalStack, count: int, rank: int, seed: int = 0) -> Tensor:
    """k-means++ (seeded) on each item's normalised energy over the leading directions."""
    p = min(count * rank, *stack.shape)
    weights = user_weights(stack, "norm")
    spec_u, spec_v = hosvd_spectra(stack, weights, p)
    left = (stack.S[:, :, None] * project(stack.Et, spec_u.vectors[:, :p])).pow(2).sum(1)
    right = (stack.S[:, :, None] * project(stack.Ft, spec_v.vectors[:, :p])).pow(2).sum(1)
    features = torch.cat([left, right], dim=1).double()
    features = features / features.sum(1, keepdim=True).clamp_min(1e-300)
    return _kmeans(features.cpu(), count, seed)


def _kmeans(x: Tensor, count: int, seed: int, iters: int = 50) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(len(x), (1,), generator=gen)]
    while len(centres) < count:  # k-means++: far points are likelier next centres
        distance = torch.cdist(x, centres).min(dim=1).values ** 2
        if not distance.sum() > 0:  # every item alike: any is as good a centre
            distance = torch.ones_like(distance)
        pick = torch.multinomial(distance / distance.sum(), 1, generator=gen)
        centres = torch.cat([centres, x[pick]])
    labels = torch.zeros(len(x), dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(x, centres).argmin(dim=1)
        if torch.equal(new, labels):
            break
        labels = new
        for c in range(count):
            if (labels == c).any():
                centres[c] = x[labels == c].mean(0)
    return _no_empty(labels, count)


def _no_empty(labels: Tensor, count: int) -> Tensor:
    """Every cluster keeps at least one item: an empty one takes one from the largest."""
    labels = labels.clone()
    for c in range(count):
        if not (labels == c).any():
            largest = int(torch.bincount(labels, minlength=count).argmax())
            labels[torch.nonzero(labels == largest)[0]] = c
    return labels


def captured(stack: CanonicalStack, Qu: Tensor, Qv: Tensor) -> Tensor:
    """‖Quᵀ D_i Qv‖² for every item: how much of it the bases hold."""
    left = (stack.S[:, :, None] * project(stack.Et, Qu)).transpose(1, 2)
    return ((left @ project(stack.Ft, Qv)).double() ** 2).sum(dim=(1, 2))


def fit_clusters(
    stack: CanonicalStack,
    count: int,
    rank: int,
    fit: Callable[[CanonicalStack, list[int]], object],
    *,
    max_rounds: int = 10,
    seed: int = 0,
) -> Clustering:
    """Alternate per-cluster fits and reassignment until no item moves; `fit(stack_c,
    members)` fits one cluster (a `SlotResult`)."""
    labels = (
        initial_labels(stack, count, rank, seed)
        if count > 1
        else torch.zeros(stack.count, dtype=torch.long)
    )

    def fit_all(labels: Tensor) -> list:
        groups = [torch.nonzero(labels == c).flatten().tolist() for c in range(count)]
        return [fit(subset(stack, members), members) for members in groups]

    for _ in range(max_rounds):
        results = fit_all(labels)
        if count == 1:
            break
        held = torch.stack([captured(stack, r.form.Qu, r.form.Qv) for r in results], dim=1)
        new = _no_empty(held.argmax(dim=1).cpu(), count)
        if torch.equal(new, labels):
            break
        labels = new
    else:  # still moving after max_rounds: the results must be fitted on the final labels
        results = fit_all(labels)
    return Clustering(labels, results)


def rank_for_budget(
    budget: int, count: int, items: int, shape: tuple[int, int], k: int, method: CompressionMethod
) -> int:
    """The largest shared rank r whose storage with `count` clusters fits `budget` numbers:
    count·r·(m + n) + items·(one core at rank r, as `method` stores it)."""
    m, n = shape
    best = 0
    for r in range(1, min(m, n) + 1):
        cores = items * method.core_params(k, r, r)
        if count * r * (m + n) + cores > budget:
            break
        best = r
    return best
