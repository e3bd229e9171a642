"""Paired bootstrap intervals, checked against bootstraps small enough to compute by hand."""

from __future__ import annotations

import math

import pytest
import torch

from soppu.intervals import Gain, paired_gain


def test_two_blocks_give_the_hand_computed_bootstrap():
    """Two blocks of 10 tokens: `new` saves 2 nats on the first and loses 1 on the second.
    Resampling two blocks gives (first, first) with probability 1/4, a mix 1/2, (second,
    second) 1/4; the 2.5% and 97.5% percentiles are therefore the two pure resamples."""
    reference = torch.tensor([30.0, 20.0], dtype=torch.float64)
    new = torch.tensor([28.0, 21.0], dtype=torch.float64)
    counts = torch.tensor([10, 10])
    gain = paired_gain(reference, new, counts, resamples=20_000)
    assert gain.point == pytest.approx(1 - math.exp(-1 / 20), abs=1e-12)
    assert gain.low == pytest.approx(1 - math.exp(2 / 20), abs=1e-12)  # (second, second)
    assert gain.high == pytest.approx(1 - math.exp(-4 / 20), abs=1e-12)  # (first, first)
    assert gain.verdict == "same"


def test_a_consistent_difference_is_a_win_or_a_loss_and_noise_is_neither():
    counts = torch.full((40,), 128)
    reference = torch.full((40,), 128 * 4.0, dtype=torch.float64)
    better = paired_gain(reference, reference - 128 * 0.05, counts)
    # Every block gains alike: every resample is the point, the interval has no width.
    assert better.low == pytest.approx(better.point) == pytest.approx(better.high)
    assert better.point == pytest.approx(1 - math.exp(-0.05)) and better.verdict == "better"
    assert paired_gain(reference, reference + 128 * 0.05, counts).verdict == "worse"
    noise = torch.tensor([1.0, -1.0] * 20, dtype=torch.float64) * 128 * 0.05
    tied = paired_gain(reference, reference + noise, counts)
    assert tied.point == pytest.approx(0.0, abs=1e-12) and tied.verdict == "same"
    assert tied.low < 0 < tied.high


def test_the_same_seed_gives_the_same_interval_and_bad_shapes_are_refused():
    gen = torch.Generator().manual_seed(1)
    reference = torch.rand(30, generator=gen, dtype=torch.float64) * 100
    new = reference + torch.randn(30, generator=gen, dtype=torch.float64)
    counts = torch.full((30,), 50)
    assert paired_gain(reference, new, counts) == paired_gain(reference, new, counts)
    with pytest.raises(ValueError, match="one length"):
        paired_gain(reference, new[:-1], counts)
    with pytest.raises(ValueError, match="no tokens"):
        paired_gain(reference, new, torch.zeros(30))
    assert Gain(0.1, -0.01, 0.2).as_dict()["verdict"] == "same"


def test_score_advice_takes_only_significant_wins():
    """The deployment-side advice (`soppu score`): a model significantly better than the
    reference is used, one better by noise is not; the first (the user's own) is advised
    unless another beats it significantly, and else the lowest loss wins."""
    from soppu.server.serving.scoring import Scored, compare

    tokens = torch.full((40,), 100)
    noise = torch.linspace(-1, 1, 40, dtype=torch.float64)
    reference = Scored("", torch.full((40,), 400.0, dtype=torch.float64), tokens)
    clear = Scored("alice", reference.nll - 20 + noise, tokens)  # 5% less NLL per token
    clearer = Scored("alice-2", reference.nll - 40 + noise, tokens)
    swing = torch.tensor([30.0, -30.0] * 20, dtype=torch.float64)
    noisy = Scored("bob", reference.nll - 0.1 + swing, tokens)  # 0.1 better on average
    gains, best = compare(reference, [clear, noisy])
    assert best == "alice" and gains["alice"].verdict == "better"
    assert gains["bob"].verdict == "same"
    assert compare(reference, [noisy])[1] == ""  # nothing significant: the reference
    assert compare(reference, [clear, clearer])[1] == "alice-2"  # beats the first clearly
    # The first model is the user's own: another is advised over it only where it beats it
    # significantly, not where it is lower by noise.
    near = Scored("global", clear.nll - 0.1 + swing, tokens)
    assert float(near.nll.sum()) < float(clear.nll.sum())
    assert compare(reference, [clear, near])[1] == "alice"
    assert compare(reference, [near, clear])[1] == "global"
    assert compare(reference, [noisy, clear])[1] == "alice"  # the first beats no one
    worse = Scored("eve", reference.nll + 30, tokens)
    assert compare(reference, [worse])[0]["eve"].verdict == "worse"
    assert compare(reference, [worse])[1] == ""


def test_a_share_of_a_gain_has_the_hand_computed_paired_interval():
    """`whole` saves 2 nats on each of two 10-token blocks, `part` 1 on the first and 0.5 on
    the second: the pure resamples give the extreme shares, as in the test above."""
    from soppu.intervals import paired_share

    reference = torch.tensor([30.0, 20.0], dtype=torch.float64)
    part = torch.tensor([29.0, 19.5], dtype=torch.float64)
    whole = torch.tensor([28.0, 18.0], dtype=torch.float64)
    counts = torch.tensor([10, 10])
    share = paired_share(reference, part, whole, counts, resamples=20_000)
    whole_gain = 1 - math.exp(-4 / 20)
    assert share.point == pytest.approx((1 - math.exp(-1.5 / 20)) / whole_gain, abs=1e-12)
    assert share.low == pytest.approx((1 - math.exp(-1 / 20)) / whole_gain, abs=1e-12)
    assert share.high == pytest.approx((1 - math.exp(-2 / 20)) / whole_gain, abs=1e-12)
    assert paired_share(reference, whole, whole, counts).as_dict() == {
        "point": 1.0,
        "low": 1.0,
        "high": 1.0,
    }
    with pytest.raises(ValueError, match="gains nothing"):
        paired_share(reference, part, reference, counts)
    with pytest.raises(ValueError, match="gains nothing"):  # a loss has no share to keep
        paired_share(reference, part, reference + 1, counts)
    with pytest.raises(ValueError, match="one length"):
        paired_share(reference, part[:1], whole, counts)


def test_a_share_is_the_set_of_shares_the_paired_test_does_not_reject():
    """By test inversion: with two blocks whose whole gains differ (2 and 0.2 nats), every
    resample is one of three, each ≥ 25% likely, so the bounds are the smallest and largest
    resampled ratio; and where the whole gains nothing significant, no share is rejected,
    even where part and whole are the same model (a ratio's percentiles would say exactly 1)."""
    from soppu.intervals import paired_share

    counts = torch.tensor([10, 10])
    reference = torch.tensor([30.0, 20.0], dtype=torch.float64)
    whole = reference - torch.tensor([2.0, 0.2], dtype=torch.float64)
    part = reference - torch.tensor([1.0, 0.4], dtype=torch.float64)
    share = paired_share(reference, part, whole, counts, resamples=20_000)

    def ratio(part_saved: float, whole_saved: float) -> float:
        return (1 - math.exp(-part_saved / 20)) / (1 - math.exp(-whole_saved / 20))

    assert share.point == pytest.approx(ratio(1.4, 2.2), abs=1e-12)
    assert share.low == pytest.approx(ratio(2.0, 4.0), abs=1e-9)  # the first block twice
    assert share.high == pytest.approx(ratio(0.8, 0.4), abs=1e-9)  # the second twice

    tokens = torch.full((40,), 100)
    swing = torch.tensor([30.0, -30.0] * 20, dtype=torch.float64)
    reference = torch.full((40,), 400.0, dtype=torch.float64)
    unclear = reference - 0.1 + swing  # 0.1 nats better on average, the blocks ±30
    assert paired_share(reference, unclear, unclear, tokens).as_dict() == {
        "point": 1.0,
        "low": -math.inf,
        "high": math.inf,
    }
    # A part that saves half the NLL a clear whole saves, block by block: it keeps 52%
    # of the whole's gain, significantly below 80%.
    noise = torch.linspace(-1, 1, 40, dtype=torch.float64)
    clear = reference - 20 + noise
    half = reference - 10 + noise / 2
    kept = paired_share(reference, half, clear, tokens)
    assert kept.point == pytest.approx((1 - math.exp(-0.1)) / (1 - math.exp(-0.2)), rel=1e-9)
    assert kept.low < kept.point < kept.high < 0.8


def test_a_median_share_over_users_has_the_hand_computed_interval():
    """One user as in the hand-computed share above: the median is that user's share, and its
    interval the extreme resamples' ratios (each 25% likely). Users whose part is their whole
    (share 1 in every resample) or their reference (0) pin the median exactly."""
    from soppu.intervals import median_share

    reference = torch.tensor([30.0, 20.0], dtype=torch.float64)
    part = torch.tensor([29.0, 19.5], dtype=torch.float64)
    whole = torch.tensor([28.0, 18.0], dtype=torch.float64)
    counts = torch.tensor([10, 10])

    def ratio(part_saved: float) -> float:
        return (1 - math.exp(-part_saved / 20)) / (1 - math.exp(-4 / 20))

    alone = median_share([(reference, part, whole, counts)], resamples=20_000)
    assert alone.point == pytest.approx(ratio(1.5), abs=1e-12)
    assert alone.low == pytest.approx(ratio(1.0), abs=1e-12)
    assert alone.high == pytest.approx(ratio(2.0), abs=1e-12)
    kept, lost = (reference, whole, whole, counts), (reference, reference, whole, counts)
    assert median_share([kept, lost, kept]).as_dict() == {"point": 1.0, "low": 1.0, "high": 1.0}
    two = median_share([kept, lost]).as_dict()  # an even count: the middle two's mean
    assert two == {"point": 0.5, "low": 0.5, "high": 0.5}
    with pytest.raises(ValueError, match="no users"):
        median_share([])
    with pytest.raises(ValueError, match="user 1"):
        median_share([kept, (reference, part[:1], whole, counts)])
    with pytest.raises(ValueError, match="user 0: the whole gains nothing"):
        median_share([(reference, part, reference, counts)])
