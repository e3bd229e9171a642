"""Federated schemes: what each user starts from, what is averaged, what stays personal, and
that a restarted server continues every personal part exactly."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from helpers import tiny_causal_lm, tiny_tokenizer
from test_personalize import CONFIG, TEXT
from test_store import KEY_A, KEY_B, commit_round, lora

from soppu import emulator as E
from soppu import lm
from soppu.adapters import LoraState
from soppu.personalize import fresh_lora, train_lora
from soppu.server.schemes import SCHEMES, Reply, Robustness, robust_mean, scheme_for
from soppu.server.schemes.fedsa import is_shared
from soppu.server.store import RoundStage, RunFolder

USERS = ["alice", "bob", "carol"]


def distinct(value: float) -> LoraState:
    """A LoRA whose A and B carry different values, so what a scheme takes from where shows."""
    a, b = lora(value), lora(10 * value)
    return LoraState({KEY_A: a.tensors[KEY_A], KEY_B: b.tensors[KEY_B]}, a.config)


def committed(tmp_path, global_value: float | None = 5.0) -> RunFolder:
    """A run after round 1: each user's personal adapter, and a global one."""
    run = RunFolder(tmp_path / "run")
    stage = RoundStage(run, 1)
    for i, user in enumerate(USERS):
        stage.add(user, distinct(i + 1.0), {"round": 1})
    if global_value is not None:
        stage.add_global(distinct(global_value), {"round": 1})
    stage.commit([{"round": 1, "user": u, "status": "trained"} for u in USERS], {"round": 1})
    return run


def test_every_scheme_is_chosen_by_name_and_unknown_ones_refused():
    assert set(SCHEMES) == {"fedavg-ft", "local", "fedsa", "ditto", "local-prox"}
    assert scheme_for("ditto", prox=0.5).prox == 0.5
    with pytest.raises(ValueError, match="scheme must be one of"):
        scheme_for("fedprox")


def test_before_any_round_everyone_starts_from_the_same_fresh_lora(tmp_path):
    """One object for all: one gradient correction, and round 1 is FedAvg's in every scheme
    with a global adapter."""
    run, template = RunFolder(tmp_path / "run"), distinct(0.5)
    for name in SCHEMES:
        starts = scheme_for(name).starts(run, USERS, template)
        assert all(s is template for s in starts.values()), name


def test_fedavg_ft_starts_everyone_from_the_global_adapter(tmp_path):
    run = committed(tmp_path)
    starts = scheme_for("fedavg-ft").starts(run, USERS, distinct(0.5))
    assert len({id(s) for s in starts.values()}) == 1
    assert torch.equal(starts["bob"].tensors[KEY_A], distinct(5.0).tensors[KEY_A])
    assert scheme_for("fedavg-ft").correction_point(run, distinct(0.5)) is None


def test_local_continues_each_users_own_and_averages_nothing(tmp_path):
    run = committed(tmp_path)
    local = scheme_for("local")
    starts = local.starts(run, [*USERS, "dave"], distinct(0.5))
    for i, user in enumerate(USERS):
        assert torch.equal(starts[user].tensors[KEY_B], distinct(i + 1.0).tensors[KEY_B])
    assert torch.equal(starts["dave"].tensors[KEY_A], distinct(0.5).tensors[KEY_A])  # new user
    assert local.aggregate({"alice": Reply(distinct(1.0), distinct(0.5), 3)}) is None


def test_fedsa_shares_the_global_a_and_keeps_each_users_own_b(tmp_path):
    run = committed(tmp_path)
    fedsa = scheme_for("fedsa")
    starts = fedsa.starts(run, USERS, distinct(0.5))
    for i, user in enumerate(USERS):
        assert torch.equal(starts[user].tensors[KEY_A], distinct(5.0).tensors[KEY_A])  # shared
        assert torch.equal(starts[user].tensors[KEY_B], distinct(i + 1.0).tensors[KEY_B])  # own
    assert is_shared(KEY_A) and not is_shared(KEY_B)
    # One correction for all, at the global adapter (the starts differ only in B).
    point = fedsa.correction_point(run, distinct(0.5))
    assert torch.equal(point.tensors[KEY_B], distinct(5.0).tensors[KEY_B])
    # The next global adapter is the examples-weighted average of the replies.
    replies = {
        "alice": Reply(distinct(1.0), starts["alice"], 1),
        "bob": Reply(distinct(4.0), starts["bob"], 3),
    }
    plain = scheme_for("fedsa", robustness=Robustness(clip=0, weight_cap=0, trim=0))
    averaged = plain.aggregate(replies).lora
    assert torch.allclose(averaged.tensors[KEY_A], distinct(3.25).tensors[KEY_A])
    assert torch.allclose(averaged.tensors[KEY_B], distinct(3.25).tensors[KEY_B])


def test_ditto_averages_the_shared_copies_and_continues_the_personal_ones(tmp_path):
    run = committed(tmp_path)
    ditto = scheme_for("ditto", prox=0.3)
    assert ditto.two_tracks
    starts = ditto.starts(run, [*USERS, "dave"], distinct(0.5))
    for i, user in enumerate(USERS):
        assert torch.equal(starts[user].tensors[KEY_A], distinct(i + 1.0).tensors[KEY_A])
    assert torch.equal(starts["dave"].tensors[KEY_A], distinct(5.0).tensors[KEY_A])  # global
    assert torch.equal(
        ditto.anchor(run, distinct(0.5)).tensors[KEY_B], distinct(5.0).tensors[KEY_B]
    )
    anchor, start = distinct(5.0), distinct(0.0)
    replies = {
        "alice": Reply(distinct(100.0), start, 1, shared=distinct(4.0), anchor=anchor),
        "bob": Reply(distinct(200.0), start, 1, shared=distinct(6.0), anchor=anchor),
    }
    averaged = ditto.aggregate(replies).lora  # of the shared copies, never the personal ones
    assert torch.allclose(averaged.tensors[KEY_A], distinct(5.0).tensors[KEY_A])
    with pytest.raises(ValueError, match="shared copy"):
        ditto.aggregate({"alice": Reply(distinct(1.0), start, 1)})


def test_local_prox_continues_the_personal_ones_and_averages_them_from_the_anchor(tmp_path):
    """One track: each user continues their own (a newcomer the global adapter), pulled to the
    global one, and the next global adapter is the average of what users keep, measured from
    that anchor: FedAvg of the personal adapters exactly without robustness."""
    run = committed(tmp_path)
    scheme = scheme_for("local-prox", prox=0.01)
    assert not scheme.two_tracks and scheme.prox == 0.01
    starts = scheme.starts(run, [*USERS, "dave"], distinct(0.5))
    for i, user in enumerate(USERS):
        assert torch.equal(starts[user].tensors[KEY_A], distinct(i + 1.0).tensors[KEY_A])
    assert torch.equal(starts["dave"].tensors[KEY_B], distinct(5.0).tensors[KEY_B])  # global
    for point in (scheme.anchor(run, distinct(0.5)), scheme.correction_point(run, distinct(0.5))):
        assert torch.equal(point.tensors[KEY_B], distinct(5.0).tensors[KEY_B])
    anchor = distinct(5.0)
    replies = {
        "alice": Reply(distinct(4.0), distinct(1.0), 1, anchor=anchor),
        "bob": Reply(distinct(8.0), distinct(2.0), 3, anchor=anchor),
    }
    plain = scheme_for("local-prox", robustness=Robustness(clip=0, weight_cap=0, trim=0))
    averaged = plain.aggregate(replies).lora  # (4 · 1 + 8 · 3) / 4
    assert torch.allclose(averaged.tensors[KEY_A], distinct(7.0).tensors[KEY_A])
    assert torch.allclose(averaged.tensors[KEY_B], distinct(7.0).tensors[KEY_B])
    with pytest.raises(ValueError, match="without the anchor"):
        scheme.aggregate({"alice": Reply(distinct(1.0), distinct(1.0), 1)})


def test_local_prox_clips_a_personal_adapter_however_far_it_was_before_the_round():
    """A user whose own adapter is already far off (sent so in an earlier round) and who does
    not move in this one: measured from its start it has a zero update and would enter the
    average whole; measured from the anchor it is clipped and left out by the median."""
    anchor = distinct(5.0)
    honest = {
        f"user{i}": Reply(distinct(5.0 + 0.1 * i), distinct(5.0), 10, anchor=anchor)
        for i in range(5)
    }
    far = distinct(1e4)
    replies = {**honest, "mallory": Reply(far, far, 10, anchor=anchor)}
    averaged = scheme_for("local-prox").aggregate(replies)
    assert "mallory" in averaged.clipped
    assert float(averaged.lora.tensors[KEY_A].max()) < 5.5
    from_starts = robust_mean({u: (r.personal, r.start, r.examples) for u, r in replies.items()})
    assert float(from_starts.lora.tensors[KEY_A].max()) > 1e3  # what the anchor avoids


def test_a_restarted_server_continues_every_personal_part_exactly(tmp_path):
    """Nothing personal lives in memory: a fresh scheme over the reopened run folder (what a
    resumed run has) starts every user from exactly what their last round stored."""
    committed(tmp_path)
    commit_round(RunFolder(tmp_path / "run"), 2, {"alice": 7.25})
    reopened = RunFolder(tmp_path / "run")
    for name in ("local", "fedsa", "ditto", "local-prox"):
        start = scheme_for(name).starts(reopened, ["alice"], distinct(0.5))["alice"]
        assert torch.equal(start.tensors[KEY_B], lora(7.25).tensors[KEY_B]), name


def test_without_robustness_the_mean_is_fedavg_exactly():
    plain = Robustness(clip=0, weight_cap=0, trim=0)
    averaged = robust_mean({"a": (lora(1.0), lora(0.0), 1), "b": (lora(2.0), lora(0.5), 3)}, plain)
    assert torch.equal(averaged.lora.tensors[KEY_A], torch.full((2, 8), 1.75))
    assert averaged.clipped == {} and averaged.capped == {}


def honest_round(count: int = 8, seed: int = 0) -> dict[str, tuple[LoraState, LoraState, int]]:
    """`count` users' replies from one start: small updates of similar size, 100 examples each."""
    generator = torch.Generator().manual_seed(seed)
    start = lora(0.5)
    out = {}
    for i in range(count):
        tensors = {
            k: v + 0.01 * torch.randn(v.shape, generator=generator)
            for k, v in start.tensors.items()
        }
        out[f"user{i}"] = (LoraState(tensors, start.config), start, 100)
    return out


@pytest.mark.parametrize(
    "rule", [Robustness(clip=1, weight_cap=4, trim=0), Robustness()], ids=["clip", "default"]
)
def test_a_scaled_or_noisy_reply_moves_the_mean_no_more_than_an_honest_one(rule):
    """One of 8 replies scaled by 1e4, or noise of ±9.9e5: plain FedAvg's mean goes where the
    attacker wants; the robust mean (clipped, and by default the median) moves no more than
    3× what one more honest user moves it, and names the attacker."""
    honest = honest_round()
    plain_rule = Robustness(0, 0, 0)

    def distance(state: LoraState, reference: LoraState) -> float:
        return sum(float((state.tensors[k] - reference.tensors[k]).norm()) for k in state.tensors)

    trained, start, _ = honest["user7"]
    scaled = {
        k: start.tensors[k] + 1e4 * (v - start.tensors[k]) for k, v in trained.tensors.items()
    }
    noisy = {k: v + 9.9e5 * torch.sign(torch.randn_like(v)) for k, v in trained.tensors.items()}
    seven = dict(list(honest.items())[:7])
    for attack in (scaled, noisy):
        attacked = {**honest, "user7": (LoraState(attack, start.config), start, 100)}
        for averaging, limit in ((plain_rule, None), (rule, 3)):
            reference = robust_mean(seven, averaging).lora
            spread = distance(robust_mean(honest, averaging).lora, reference)
            moved = robust_mean(attacked, averaging)
            if limit is None:
                assert distance(moved.lora, reference) > 100 * spread
            else:
                assert distance(moved.lora, reference) < limit * spread
                assert "user7" in moved.clipped and moved.clipped["user7"] > 1e3


def test_a_claim_of_1e12_examples_counts_as_four_medians():
    honest = honest_round()
    trained, start, _ = honest["user7"]
    greedy = {**honest, "user7": (trained, start, 10**12)}
    averaged = robust_mean(greedy, Robustness(clip=1, weight_cap=4, trim=0))  # weighted
    assert averaged.capped == {"user7": 10**12}
    by_hand = robust_mean(
        {**honest, "user7": (trained, start, 400)}, Robustness(clip=1, weight_cap=0, trim=0)
    )
    median = robust_mean(greedy)  # the default: the median has no weights to claim
    assert torch.equal(median.lora.tensors[KEY_A], robust_mean(honest).lora.tensors[KEY_A])
    assert torch.allclose(averaged.lora.tensors[KEY_A], by_hand.lora.tensors[KEY_A], atol=1e-7)
    for bad in (0, -5, float("nan")):
        with pytest.raises(ValueError, match="finite and positive"):
            robust_mean({**honest, "user7": (trained, start, bad)})
    with pytest.raises(ValueError, match="factor ≥ 1"):
        Robustness(clip=0.5)


def test_the_trimmed_mean_leaves_out_the_extremes_of_every_coordinate():
    """Five users' updates 1, 2, 3, 4, 100 (every weight alike) from one start of 0.5: trim 0.2
    leaves out 1 and 100 and averages 2, 3, 4 without weights; 0.5 is the median, 3."""
    start = lora(0.5)
    items = {f"u{v}": (lora(0.5 + v), start, 10 * v) for v in (1, 2, 3, 4, 100)}
    for trim in (0.2, 0.5):
        averaged = robust_mean(items, Robustness(clip=0, weight_cap=0, trim=trim)).lora
        assert torch.equal(averaged.tensors[KEY_A], torch.full((2, 8), 3.5))
    plain = robust_mean(
        items, Robustness(clip=0, weight_cap=0, trim=0)
    ).lora  # weighted by examples
    by_hand = 0.5 + sum(v * 10 * v for v in (1, 2, 3, 4, 100)) / sum(
        10 * v for v in (1, 2, 3, 4, 100)
    )
    assert torch.allclose(plain.tensors[KEY_A], torch.full((2, 8), by_hand))
    four = {f"u{v}": (lora(0.5 + v), start, 1) for v in (1, 2, 3, 100)}  # even: the middle two
    median = robust_mean(four, Robustness(clip=0, weight_cap=0, trim=0.5)).lora
    assert torch.equal(median.tensors[KEY_A], torch.full((2, 8), 3.0))
    assert Robustness(trim=0.5).trimmed(1) == 0 and Robustness(trim=0.34).trimmed(6) == 2
    with pytest.raises(ValueError, match="trim"):
        Robustness(trim=0.6)


def test_the_median_holds_against_two_noisy_replies_of_six():
    """Six users move the same way (+0.05 on every weight, ±0.01 of their own); two of them
    send noise of ±9.9e5 instead. Clipping alone still lets the clipped noise pull the mean a
    third of an update away from the honest one; the coordinate-wise median after clipping
    stays nearer the honest mean than one honest user is to it."""
    generator = torch.Generator().manual_seed(3)
    start = lora(0.5)

    def moved(scale: float) -> LoraState:
        return LoraState(
            {
                k: v + 0.05 + scale * torch.randn(v.shape, generator=generator)
                for k, v in start.tensors.items()
            },
            start.config,
        )

    honest = {f"user{i}": (moved(0.01), start, 100) for i in range(6)}
    reference = robust_mean(honest, Robustness(0, 0, 0)).lora
    attacked = {**honest, **{u: (moved(9.9e5), start, 100) for u in ("user4", "user5")}}

    def distance(state: LoraState) -> float:
        return sum(float((state.tensors[k] - reference.tensors[k]).norm()) for k in state.tensors)

    one_honest_user = distance(honest["user0"][0])
    clipped = distance(robust_mean(attacked, Robustness(clip=1, weight_cap=4, trim=0)).lora)
    median = distance(robust_mean(attacked, Robustness(clip=1, weight_cap=4, trim=0.5)).lora)
    assert median < one_honest_user < clipped


def test_the_proximal_term_adds_prox_times_the_distance_to_the_anchor():
    """One step with the pull equals one step with prox · (start − anchor) added to the
    gradient (the term's gradient at the start), and many steps end nearer the anchor."""
    full = tiny_causal_lm(layers=6)
    emulator, info = E.build(full, E.EmulatorPlan(6, top=2, drop=0.5, select="even"), "tiny")
    tokenizer = tiny_tokenizer()
    blocks = lm.token_blocks(tokenizer, TEXT, CONFIG.seq_len)[:4]
    pad, one = tokenizer.pad_token_id, replace(CONFIG, steps=1)
    start = fresh_lora(emulator, info, CONFIG)
    generator = torch.Generator().manual_seed(3)
    anchor = LoraState(
        {k: v + torch.randn(v.shape, generator=generator) for k, v in start.tensors.items()},
        start.config,
    )
    pulled, _ = train_lora(emulator, info, blocks, pad, one, start, anchor=anchor, prox=2.0)
    shift = {k: 2.0 * (start.tensors[k] - anchor.tensors[k]) for k in start.tensors}
    by_hand, _ = train_lora(emulator, info, blocks, pad, one, start, correction=shift)
    for key, value in by_hand.tensors.items():
        assert torch.allclose(pulled.tensors[key], value, atol=1e-7), key

    def distance(state: LoraState) -> float:
        return sum(float((state.tensors[k] - anchor.tensors[k]).norm()) for k in anchor.tensors)

    many = replace(CONFIG, steps=20)
    free, _ = train_lora(emulator, info, blocks, pad, many, start)
    held, _ = train_lora(emulator, info, blocks, pad, many, start, anchor=anchor, prox=50.0)
    assert distance(held) < min(distance(free), distance(start) - 1.0)


@pytest.mark.parametrize(
    ("metrics", "words"),
    [
        ({"eval-loss-after": 1.0}, "num-examples"),
        ({"num-examples": 0}, "num-examples"),
        ({"num-examples": -1e12}, "num-examples"),
        ({"num-examples": 2.5}, "num-examples"),
        ({"num-examples": float("nan")}, "not a finite number"),
        ({"num-examples": 3, "seconds": float("inf")}, "seconds is not a finite number"),
        ({"num-examples": 3, "seconds": [1.0, 2.0]}, "seconds is not a finite number"),
    ],
)
def test_a_replys_metrics_are_checked_before_they_weigh_anything(metrics, words):
    """What a client claims costs its own round when it is not a finite number, or when
    num-examples is missing, not whole or below 1 (a sum of 0 would crash the mean)."""
    from flwr.app import MetricRecord

    from soppu.server.federation import checked_metrics

    with pytest.raises(ValueError, match=words):
        checked_metrics(MetricRecord(metrics))
    assert checked_metrics(MetricRecord({"num-examples": 12, "seconds": 1.5})) == {
        "num-examples": 12.0,
        "seconds": 1.5,
    }


def test_early_stopping_keeps_the_step_best_on_validation_text():
    """A final pass keeps the adapter of the checked step with the lowest validation loss: at a
    wild lr that is the start itself, exactly; at a sane one, the very adapter a run of that
    many steps ends with (the data order and a constant lr make the runs share a prefix)."""
    from soppu.personalize import EarlyStopping

    full = tiny_causal_lm(layers=6)
    emulator, info = E.build(full, E.EmulatorPlan(6, top=2, drop=0.5, select="even"), "tiny")
    tokenizer = tiny_tokenizer()
    blocks = lm.token_blocks(tokenizer, TEXT, CONFIG.seq_len)
    train, validation, pad = blocks[:6], blocks[6:8], tokenizer.pad_token_id
    start = fresh_lora(emulator, info, CONFIG)
    wild = replace(CONFIG, steps=6, lr=100.0)
    stopping = EarlyStopping(validation, every=2)
    kept, _ = train_lora(emulator, info, train, pad, wild, start, stopping=stopping)
    assert stopping.best_step == 0 and [s for s, _ in stopping.checked] == [0, 2, 4, 6]
    assert all(torch.equal(kept.tensors[k], v) for k, v in start.tensors.items())

    sane = replace(CONFIG, steps=8, lr=1e-2)
    stopping = EarlyStopping(validation, every=1)
    kept, _ = train_lora(emulator, info, train, pad, sane, start, stopping=stopping)
    best = min(stopping.checked, key=lambda c: c[1])
    assert stopping.best_step == best[0] > 0
    shorter, _ = train_lora(emulator, info, train, pad, replace(sane, steps=best[0]), start)
    for key, value in shorter.tensors.items():
        assert torch.allclose(kept.tensors[key], value, atol=1e-6), key
    with pytest.raises(ValueError, match="validation text"):
        EarlyStopping([], every=2)


def test_a_pass_that_beats_the_global_adapter_nowhere_leaves_the_users_adapter():
    """The final pass replaces what a user keeps only where it kept a step past its start;
    a round of any scheme replaces it always."""
    from soppu.server.schemes.personal_pass import PersonalPass

    assert [PersonalPass().replaces({"best-step": s}) for s in (0.0, 5.0, 30.0)] == [
        False,
        True,
        True,
    ]
    assert not PersonalPass().replaces({})  # a reply that does not say: nothing replaced
    assert all(scheme_for(name).replaces({"best-step": 0.0}) for name in SCHEMES)


def test_the_private_mean_clips_to_the_fixed_norm_averages_unweighted_and_adds_the_noise():
    """Updates of norm 0.5 and 8 (clip 1: the second scaled by 1/8), claims 1 and 1e12 (not
    used): the mean of the starts plus the clipped updates' mean, plus N(0, (z·clip/n)²) drawn
    from the generator given, exactly."""
    from soppu.server.schemes import Privacy, private_mean

    start = lora(0.5)
    size = start.tensors[KEY_A].numel() + start.tensors[KEY_B].numel()
    small = LoraState({k: v + 0.5 / size**0.5 for k, v in start.tensors.items()}, start.config)
    large = LoraState({k: v + 8.0 / size**0.5 for k, v in start.tensors.items()}, start.config)
    privacy = Privacy(noise=0.7, clip=1.0)
    averaged = private_mean(
        {"a": (small, start, 1), "b": (large, start, 10**12)},
        privacy,
        torch.Generator().manual_seed(5),
    )
    assert averaged.clipped == pytest.approx({"b": 8.0}) and averaged.capped == {}
    replay = torch.Generator().manual_seed(5)
    for key, value in start.tensors.items():
        step = (0.5 + 1.0) / 2 / size**0.5  # (0.5 + 8/8) / 2 on every weight, norm-wise
        noise = torch.randn(value.shape, generator=replay, dtype=torch.float64) * 0.7 * 1.0 / 2
        assert torch.allclose(averaged.lora.tensors[key], (value + step + noise).float())
    with pytest.raises(ValueError, match="dp-noise and dp-clip"):
        Privacy(noise=1.0, clip=0.0)


def test_epsilon_is_the_renyi_bound_of_the_gaussian_mechanism():
    """One round at noise 1, δ 1e-5: min over α of α/2 + ln(1e5)/(α−1), whose optimum
    α = 1 + √(2 ln 1e5) gives 5.298; ε grows with rounds and falls with noise."""
    from soppu.server.schemes import epsilon

    best = 1 + (2 * math.log(1e5)) ** 0.5
    by_hand = best / 2 + math.log(1e5) / (best - 1)
    assert epsilon(1.0, 1, 1e-5) == pytest.approx(by_hand, abs=2e-3)
    assert epsilon(1.0, 4, 1e-5) > epsilon(1.0, 1, 1e-5) > epsilon(2.0, 1, 1e-5) > 0
    assert epsilon(1.0, 0, 1e-5) == 0.0


def test_a_scheme_with_privacy_averages_privately():
    from soppu.server.schemes import Privacy, Reply

    honest = honest_round(4)
    replies = {u: Reply(trained, start, n) for u, (trained, start, n) in honest.items()}
    plain = scheme_for("fedavg-ft").aggregate(replies)
    private = scheme_for("fedavg-ft", privacy=Privacy(noise=1.0, clip=1e-3)).aggregate(replies)
    assert sorted(private.clipped) == sorted(honest)  # every update is longer than 1e-3
    assert not torch.allclose(private.lora.tensors[KEY_A], plain.lora.tensors[KEY_A])


def test_at_the_federations_defaults_one_huge_user_cannot_take_the_shared_bases():
    """A hostile reply scaled ×1e4 is stored as that user's adapter and compressed with the
    others: under uniform weights it owns the bases and the honest users lose most of their
    deltas; at the federation's defaults (norm weights) they keep what they had without it."""
    from helpers import random_factors

    from soppu.compression import compress_slot
    from soppu.compression.factors import LoRAFactors
    from soppu.server.config import FederationConfig

    honest = random_factors(6, 48, 40, 4, seed=3, shared=10)
    noise = random_factors(1, 48, 40, 4, seed=4)[0]  # off the honest users' subspace
    hostile = LoRAFactors(noise.A, noise.B * 1e4, 1.0)
    config = FederationConfig().compression_config()
    alone = compress_slot(honest, config).errors
    defaults = compress_slot([*honest, hostile], config).errors[:6]
    uniform = compress_slot([*honest, hostile], replace(config, weights="uniform")).errors[:6]
    assert config.weights == "norm"
    assert float(uniform.max()) > 0.5  # the attack, without the defence
    assert float(defaults.max()) <= float(alone.max()) + 0.05
