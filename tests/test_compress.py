"""The compression math: exact cases, invariances, monotonicity, the certificate, the errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import random_factors

from soppu.compression import CompressionConfig, LoRAFactors, canonicalize, compress_slot
from soppu.compression import spectrum as spectrum_module
from soppu.compression.joint import hosvd_spectra, user_weights
from soppu.compression.spectrum import top_eigen


def dense_errors(items, result):
    out = []
    for i, item in enumerate(items):
        D = item.delta()
        out.append(float((D - result.reconstruct(i)).norm() / D.norm()))
    return torch.tensor(out, dtype=torch.float64)


def test_rank_covering_every_delta_is_lossless():
    # 5 users of rank 3 span at most 15 directions on each side; r = 15 must be exact.
    items = random_factors(5, 40, 30, 3, seed=1)
    result = compress_slot(items, CompressionConfig(rank=15))
    for i, item in enumerate(items):
        torch.testing.assert_close(result.reconstruct(i), item.delta(), rtol=0, atol=2e-5)
    assert float(result.errors.max()) < 1e-5
    assert result.fit.bracket.relative(result.fit.bracket.lower) < 1e-6


def test_one_user_equals_truncated_svd():
    (item,) = random_factors(1, 50, 40, 8, seed=2)
    result = compress_slot([item], CompressionConfig(rank=3))
    U, S, Vh = torch.linalg.svd(item.delta())
    best = (U[:, :3] * S[:3]) @ Vh[:3]
    torch.testing.assert_close(result.reconstruct(0), best, rtol=0, atol=1e-5)


def test_one_user_diag_with_enough_rank_is_its_svd():
    (item,) = random_factors(1, 30, 20, 4, seed=3)
    result = compress_slot([item], CompressionConfig(rank=4, sigma="diag"))
    torch.testing.assert_close(result.reconstruct(0), item.delta(), rtol=0, atol=1e-5)


def test_gauge_transform_gives_the_same_result():
    items = random_factors(6, 48, 36, 4, seed=4, shared=10)
    gen = torch.Generator().manual_seed(9)
    gauged = []
    for item in items:
        G = torch.randn(4, 4, generator=gen) + 3 * torch.eye(4)
        gauged.append(LoRAFactors(torch.linalg.solve(G, item.A), item.B @ G, item.scale))
    a = compress_slot(items, CompressionConfig(rank=6))
    b = compress_slot(gauged, CompressionConfig(rank=6))
    torch.testing.assert_close(a.errors, b.errors, rtol=1e-4, atol=1e-6)
    for i in range(len(items)):
        torch.testing.assert_close(a.reconstruct(i), b.reconstruct(i), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sigma", ["full", "diag"])
@pytest.mark.parametrize("weights", ["uniform", "norm"])
def test_objective_never_decreases_and_result_is_inside_the_bracket(sigma, weights):
    items = random_factors(12, 60, 50, 4, seed=5)
    for i, item in enumerate(items):  # spread the norms so the weighting matters
        items[i] = LoRAFactors(item.A, item.B, item.scale * (1 + i))
    result = compress_slot(items, CompressionConfig(rank=8, sigma=sigma, weights=weights))
    history = result.fit.history
    assert len(history) > 2
    for before, after in itertools.pairwise(history):
        assert after >= before - 1e-6 * abs(before)
    b = result.fit.bracket
    assert b.lower <= b.achieved * (1 + 1e-6)
    assert b.hosvd <= b.upper * (1 + 1e-6)
    if sigma == "full":
        assert b.achieved <= b.hosvd * (1 + 1e-6)


def test_reported_errors_equal_dense_errors():
    items = random_factors(8, 36, 28, 3, seed=6, shared=5)
    items += random_factors(3, 36, 28, 5, seed=7)  # mixed ranks
    result = compress_slot(items, CompressionConfig(rank=6))
    torch.testing.assert_close(result.errors, dense_errors(items, result), rtol=1e-4, atol=1e-6)


def test_personal_part_error_is_measured_against_the_users_own_mean():
    items = random_factors(7, 30, 24, 3, seed=8, shared=4)
    result = compress_slot(items, CompressionConfig(rank=5, sigma="diag"))
    D = [item.delta() for item in items]
    Dhat = [result.reconstruct(i) for i in range(len(items))]
    mean, mean_hat = sum(D) / len(D), sum(Dhat) / len(D)
    expected = torch.tensor(
        [
            float(((d - mean) - (h - mean_hat)).norm() / (d - mean).norm())
            for d, h in zip(D, Dhat, strict=True)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(result.personal_errors, expected, rtol=1e-4, atol=1e-6)


def test_personal_error_of_a_single_user_is_undefined():
    result = compress_slot(random_factors(1, 10, 10, 2), CompressionConfig(rank=1))
    assert torch.isnan(result.personal_errors).all()


def test_scale_and_rank_enter_the_delta():
    (item,) = random_factors(1, 20, 16, 2, seed=10)
    doubled = LoRAFactors(item.A, item.B, item.scale * 2)
    a = compress_slot([item], CompressionConfig(rank=2))
    b = compress_slot([doubled], CompressionConfig(rank=2))
    torch.testing.assert_close(b.reconstruct(0), 2 * a.reconstruct(0), rtol=1e-5, atol=1e-6)


def test_energy_target_is_met_with_the_cheapest_guaranteed_pair_of_ranks():
    items = random_factors(10, 50, 40, 4, seed=11, shared=8)
    items += random_factors(10, 50, 40, 4, seed=12)
    result = compress_slot(items, CompressionConfig(energy=0.9))
    b = result.fit.bracket
    assert b.achieved <= 0.1 * b.total * (1 + 1e-6)
    stack = canonicalize(items)
    spec_u, spec_v = hosvd_spectra(stack, torch.ones(stack.count, dtype=torch.float64), 40, 40)
    r_u, r_v = result.fit.ranks

    def cost(a, b):  # cores as stored: dense r_U × r_V, or k = 4 rank factors if smaller
        return a * 50 + b * 40 + 20 * min(a * b, 4 * (a + b))

    for a in range(1, 41):
        for c in range(1, 41):
            if cost(a, c) < cost(r_u, r_v):  # anything cheaper is not guaranteed
                assert spec_u.tail(a) + spec_v.tail(c) > 0.1 * b.total, (a, c)


def test_norm_weights_protect_small_users():
    items = random_factors(10, 40, 40, 4, seed=13)
    items[0] = LoRAFactors(items[0].A, items[0].B, 1e-3)  # a user with a tiny delta
    uniform = compress_slot(items, CompressionConfig(rank=8, weights="uniform"))
    fair = compress_slot(items, CompressionConfig(rank=8, weights="norm"))
    assert float(fair.errors[0]) < float(uniform.errors[0])


def test_export_is_exact_when_the_core_fits_and_optimal_when_truncated():
    items = random_factors(6, 40, 32, 4, seed=14)
    result = compress_slot(items, CompressionConfig(rank=12))
    A, B = result.export(0, 8)  # core rank ≤ k = 4 ≤ 8: exact
    assert A.shape == (8, 32) and B.shape == (40, 8)
    torch.testing.assert_close((B @ A).double(), result.reconstruct(0), rtol=0, atol=1e-5)
    A, B = result.export(0, 2)
    U, S, Vh = torch.linalg.svd(result.reconstruct(0))
    torch.testing.assert_close((B @ A).double(), (U[:, :2] * S[:2]) @ Vh[:2], rtol=0, atol=1e-5)


def test_iterative_spectrum_matches_the_exact_one(monkeypatch):
    items = random_factors(30, 120, 100, 4, seed=15, shared=12)
    stack = canonicalize(items)
    coef = (user_weights(stack, "uniform")[:, None] * stack.S.double() ** 2).float()
    exact = top_eigen(stack.Et, coef, 10)
    monkeypatch.setattr(spectrum_module, "EXACT_FLOPS", 0)
    monkeypatch.setattr(spectrum_module, "_TYPICAL_ITERATIONS", 0)
    iterative = top_eigen(stack.Et, coef, 10, tol=1e-9, max_iters=300)
    assert exact.exact and not iterative.exact
    torch.testing.assert_close(iterative.values[:10], exact.values[:10], rtol=1e-4, atol=1e-6)
    assert abs(iterative.tail(10) - exact.tail(10)) <= 1e-4 * exact.trace


def test_exact_spectrum_from_the_float32_gram_keeps_float64_values():
    """More rows than dimensions: the subspace comes from a float32 Gram, the values from a
    float64 Rayleigh–Ritz step; they match a float64 eigh to what float32 inputs hold (the
    rows and weights are float32; G = rows·√coef is rounded once), far below 1e-7 of the trace
    that a float32 eigh alone would give."""
    items = random_factors(40, 120, 100, 4, seed=16, shared=12)  # 160 rows > d = 120
    stack = canonicalize(items)
    coef = (user_weights(stack, "uniform")[:, None] * stack.S.double() ** 2).float()
    spectrum = top_eigen(stack.Et, coef, 10)
    Gt = (stack.Et.double() * coef.double().sqrt()[:, :, None]).reshape(-1, 120)
    reference = torch.linalg.eigvalsh(Gt.T @ Gt).flip(0)
    assert spectrum.exact
    assert (spectrum.values[:10] - reference[:10]).abs().max() <= 5e-9 * spectrum.trace
    assert abs(spectrum.tail(10) - float(reference[10:].sum())) <= 5e-9 * spectrum.trace


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="rank"):
        CompressionConfig()
    with pytest.raises(ValueError, match="sigma"):
        CompressionConfig(rank=2, sigma="triangular")
    with pytest.raises(ValueError, match="energy"):
        CompressionConfig(energy=1.5)
    with pytest.raises(ValueError, match="group"):
        CompressionConfig(rank=2, group="layer")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            CompressionConfig(rank=2, device="cuda")


@pytest.mark.parametrize("shape", [(48, 48), (16, 64), (64, 16)], ids=["square", "narrow", "wide"])
def test_full_span_is_exact_at_any_shape_with_mixed_user_ranks(shape):
    """6 users of ranks 2–5 span 21 directions: a 16-row side can hold only 16 of them, so
    r_U = 16 and r_V = 21 (a rectangular core) is exact where one shared r could not be."""
    m, n = shape
    items = []
    for seed, k in enumerate((2, 3, 3, 4, 4, 5)):
        items += random_factors(1, m, n, k, seed=40 + seed)
    for rank in (21, 32, 500):  # at the span, and asked for more than there is
        result = compress_slot(items, CompressionConfig(rank=rank))
        assert result.fit.ranks == (min(m, 21), min(n, 21))
        assert float(result.errors.max()) <= 1e-5
        assert float(dense_errors(items, result).max()) <= 1e-5
        A, B = result.export(0, 32)
        torch.testing.assert_close(
            (B.double() @ A.double()),
            items[0].delta(),
            rtol=0,
            atol=1e-5 * float(items[0].delta().norm()),
        )
    capped = compress_slot(items, CompressionConfig(rank=500, sigma="diag"))
    assert capped.fit.ranks == (min(m, n, 21), min(m, n, 21))


def test_rectangular_storage_counts_each_side_and_the_cheaper_core_form():
    items = random_factors(6, 16, 64, 4, seed=50)  # 24 directions; the 16-row side caps at 16
    result = compress_slot(items, CompressionConfig(rank=24))
    assert result.fit.ranks == (16, 24)
    # bases 16·16 + 24·64; each core 16 × 24 = 384 numbers, or 4·(16 + 24) = 160 factored
    assert result.params_after() == 16 * 16 + 24 * 64 + 6 * 160
    assert result.params_before() == 6 * 4 * (16 + 64)


@pytest.mark.parametrize("late", [True, False], ids=["full-rank-user-late", "all-deficient"])
def test_max_core_rank_is_the_largest_numerical_core_rank(late):
    """Nine rank-2 users, then (or not) a rank-5 one: the shortcut over the first cores must
    still find the late user's rank, and never report more than any core has."""
    items = random_factors(9, 40, 30, 2, seed=21) + random_factors(1, 40, 30, 5, seed=22)
    if not late:
        items[-1] = LoRAFactors(items[-1].A[:2], items[-1].B[:, :2], 1.0)
    result = compress_slot(items, CompressionConfig(rank=12))
    assert result.max_core_rank() == int(result.core_ranks().max()) == (5 if late else 2)
