"""Clusters: users in two different subspaces get a basis each (exact where one basis of that
rank is far off), the automatic choice takes clusters only where they do better at the same
storage, and clustered stores publish, serve and grow exactly like plain ones."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import random_factors, tiny_causal_lm, tiny_population, write_users

from soppu.compression import CompressionConfig, compress_slot
from soppu.compression.compress import cluster_slot
from soppu.server.add_users import add_adapters
from soppu.server.compress_store import compress_adapters
from soppu.server.publish import publish
from soppu.server.serving.shared_lora import batch_users, install
from soppu.server.serving.shared_weights import load_shared


def two_groups(count: int = 6, m: int = 40, n: int = 36, k: int = 3, shared: int = 5):
    return random_factors(count, m, n, k, seed=1, shared=shared) + random_factors(
        count, m, n, k, seed=2, shared=shared
    )


def test_two_subspaces_two_clusters_each_exact():
    items = two_groups()
    single = compress_slot(items, CompressionConfig(rank=5))
    clustered = cluster_slot(items, CompressionConfig(rank=5, clusters=2))
    assert float(single.errors.mean()) > 0.3  # one 5-dim basis cannot hold two 5-dim spaces
    assert clustered.count == 2
    labels = clustered.labels.tolist()
    assert len(set(labels[:6])) == 1 and len(set(labels[6:])) == 1 and labels[0] != labels[6]
    for result in clustered.results:
        assert float(result.errors.max()) < 1e-5


def test_the_automatic_count_takes_clusters_only_where_they_do_better():
    # One rank-8 basis cannot hold two 5-dim spaces; its storage buys two rank-6 bases.
    single = compress_slot(two_groups(count=20), CompressionConfig(rank=8))
    auto = cluster_slot(two_groups(count=20), CompressionConfig(rank=8, clusters=0))
    assert float(single.errors.mean()) > 0.1
    assert auto.count == 2 and max(float(r.errors.max()) for r in auto.results) < 1e-5
    assert sum(r.params_after() for r in auto.results) <= single.params_after()
    one_space = random_factors(20, 40, 36, 3, seed=1, shared=5)
    assert cluster_slot(one_space, CompressionConfig(rank=8, clusters=0)).count == 1


def _population():
    first = tiny_population(4, k=4, layers=2, seed=1, shared=4)
    second = tiny_population(4, k=4, layers=2, seed=2, shared=4)
    users = {f"a{u[-2:]}": t for u, t in first.items()}
    users |= {f"b{u[-2:]}": t for u, t in second.items()}
    return users


def test_a_clustered_store_publishes_serves_and_grows(tmp_path):
    from peft import PeftModel

    users = _population()
    newcomer = {"b99": users.pop("b03")}
    paths = write_users(tmp_path / "adapters", users, rank=4, alpha=8)
    manifest = compress_adapters(paths, tmp_path / "store", CompressionConfig(rank=4, clusters=2))
    single = compress_adapters(paths, tmp_path / "single", CompressionConfig(rank=4))
    assert all(s["cluster"]["count"] == 2 for s in manifest["slots"])
    assert manifest["totals"]["mean"] < 0.5 * single["totals"]["mean"]
    for s in manifest["slots"]:  # the a-users and the b-users each in a basis of their own
        assert len({user[0] for user, _ in s["items"]}) == 1
    report = json.loads((tmp_path / "store" / "report" / "report.json").read_text())
    assert {s["cluster"]["of"] for s in report["slots"]} == {
        s["name"].rsplit(".", 1)[0] for s in manifest["slots"]
    }

    version = publish(tmp_path / "store", tmp_path / "serving")
    shared = load_shared(version)
    model = tiny_causal_lm(layers=2)
    layers = install(model, shared)
    ids = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(3))
    chosen = ["a00", "b01", "a02"]  # rows on different clusters in one batch
    rows = torch.tensor([shared.users[u] for u in chosen])
    with torch.no_grad(), batch_users(layers, rows):
        batched = model(input_ids=ids).logits
    for i, user in enumerate(chosen):
        with torch.no_grad():
            published = version / "users" / user  # what PEFT, LoRAX and vLLM load
            reference = PeftModel.from_pretrained(tiny_causal_lm(layers=2), published)
            expected = reference(input_ids=ids[i : i + 1]).logits
        assert torch.allclose(batched[i : i + 1], expected, atol=1e-4), user

    new_paths = write_users(tmp_path / "new", newcomer, rank=4, alpha=8)
    grown = add_adapters(tmp_path / "store", new_paths, tmp_path / "grown")
    assert grown["added"]["drift_max"] < 0.2  # a b-user lands in the b cluster
    clusters_of_b99 = {s["name"] for s in grown["slots"] if any(u == "b99" for u, _ in s["items"])}
    clusters_of_b00 = {s["name"] for s in grown["slots"] if any(u == "b00" for u, _ in s["items"])}
    assert clusters_of_b99 == clusters_of_b00


@pytest.mark.parametrize("bad", [-1])
def test_bad_cluster_counts_are_refused(bad):
    with pytest.raises(ValueError, match="clusters"):
        CompressionConfig(rank=4, clusters=bad)


def test_each_clusters_result_is_fitted_on_its_own_members_even_when_moves_do_not_settle():
    """One reassignment round only: the results must still be the fits of the final labels
    (a result over other users would serve one user another's core)."""
    from soppu.compression.clusters import fit_clusters, subset
    from soppu.compression.compress import fit_stack
    from soppu.compression.factors import canonicalize

    items = two_groups()
    items = items[::2] + items[1::2]  # interleaved, so the seeded start is not the answer
    stack = canonicalize(items)
    ranks = torch.tensor([3] * len(items))
    config = CompressionConfig(rank=5)
    clustering = fit_clusters(
        stack, 2, 5, lambda sub, members: fit_stack(sub, ranks[members], config), max_rounds=1
    )
    for j, result in enumerate(clustering.results):
        members = clustering.members(j)
        expected = fit_stack(subset(stack, members), ranks[members], config)
        torch.testing.assert_close(result.errors, expected.errors)


def test_more_clusters_than_users_and_identical_users_still_compress():
    items = random_factors(1, 20, 16, 2, seed=3) * 3  # three identical users
    clustered = cluster_slot(items, CompressionConfig(rank=4, clusters=5))
    assert 1 <= clustered.count <= 3
    assert all(float(r.errors.max()) < 1e-5 for r in clustered.results)
    automatic = cluster_slot(items, CompressionConfig(rank=4, clusters=0))
    assert automatic.count == 1  # alike users never split
