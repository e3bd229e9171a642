"""Nobody is served harm: what each user gets is chosen on their validation text, compressed,
published and judged with paired intervals, on a tiny model whose adapters are made harmful on
purpose."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import write_tiny_model, write_users_jsonl
from peft import PeftModel

from soppu import basemodel, lm
from soppu.adapters import LoraState, write_lora
from soppu.compression import CompressionConfig
from soppu.data import DataOptions, load_users
from soppu.emulator import EmulatorPlan, build, read_info, save
from soppu.personalize import attached, fresh_lora, scored, train_lora
from soppu.server.compression_round import compress_run
from soppu.server.config import EvaluationSettings, FederationConfig
from soppu.server.evaluation import evaluate_run
from soppu.server.federation import say_served
from soppu.server.selection import best_of, choose, select_served, strength_walk
from soppu.server.store import RunFolder, ServedSource, parse_served, served_label, snapshot
from soppu.train_config import TrainConfig


def test_the_users_own_adapter_is_served_unless_the_global_one_is_significantly_better():
    losses = {"base": 3.0, "global": 2.5, "personal": 2.6}
    assert choose(losses, {"global", "personal"}) == "personal"  # 2.5 against 2.6: noise
    assert choose(losses, {"global", "personal"}, global_beats_personal=True) == "global"
    assert choose(losses) == "personal"  # no significance given: below base's loss will do
    # The own adapter at its best strength, whatever the other candidates' losses.
    scaled = {"base": 3.0, "personal": 2.0, "personal×0.75": 1.9, "global×1.25": 1.8}
    assert choose(scaled, set(scaled) - {"base"}) == "personal×0.75"
    assert choose(scaled, set(scaled) - {"base"}, global_beats_personal=True) == "global×1.25"
    assert choose({"base": 3.0, "personal×0.5": 2.0, "personal": 2.0}) == "personal"
    assert best_of(scaled, "global") == "global×1.25"
    assert best_of({"base": 3.0, "personal": 2.0}, "global") is None
    # Blends are the user's own family: its best is served, unless the global one beats it.
    mixed = {"base": 3.0, "personal": 2.0, "blend@0.5": 1.8, "global": 1.7}
    assert choose(mixed, set(mixed) - {"base"}) == "blend@0.5"
    assert choose(mixed, set(mixed) - {"base"}, global_beats_personal=True) == "global"
    assert choose({"base": 3.0, "personal": 2.0, "blend@0.75": 2.0}) == "personal"  # tie
    assert best_of(mixed, "personal", "blend") == "blend@0.5"


def test_otherwise_the_lowest_loss_significantly_better_than_base_and_ties_go_simpler():
    losses = {"base": 3.0, "global": 2.5, "personal": 2.4}
    assert choose(losses, {"global"}) == "global"  # the own one is not significantly better
    assert choose(losses, set()) == "base"
    assert choose({"base": 2.0, "global": 2.5, "personal": 2.4}) == "base"
    assert choose({"base": 2.0, "global": 2.0, "personal": 2.0}) == "base"
    assert choose({"base": 2.0, "global": 1.0}) == "global"  # no personal adapter
    # Strengths: the lowest loss; on a tie the strength nearest 1, then the simpler kind.
    scaled = {"base": 3.0, "global": 2.0, "global×0.75": 1.9, "personal×1.25": 1.9}
    assert choose(scaled, {"global", "global×0.75"}) == "global×0.75"
    assert choose({"base": 3.0, "global×0.5": 2.0, "global×1.5": 2.0}) == "global×1.5"
    assert FederationConfig().evaluation.scales() == (0.5, 0.75, 1.0, 1.25)
    assert EvaluationSettings(serve_scales="2").scales() == (1.0, 2.0)  # 1 always tried
    for wrong in ("0", "nan", "5", "x"):
        with pytest.raises(ValueError, match="serve-scales must be numbers in"):
            EvaluationSettings(serve_scales=wrong)
    assert FederationConfig().evaluation.blends() == ()  # an option, off by default
    assert EvaluationSettings(serve_blends="0.75,0.25").blends() == (0.25, 0.75)
    for wrong in ("0", "1", "nan", "x", "0.5,2"):
        with pytest.raises(ValueError, match="serve-blends must be numbers in"):
            EvaluationSettings(serve_blends=wrong)


def _harmful(lora: LoraState, seed: int) -> LoraState:
    """A LoRA blown up as a wild learning rate would: large random factors."""
    gen = torch.Generator().manual_seed(seed)
    return LoraState(
        {k: torch.randn(v.shape, generator=gen) for k, v in lora.tensors.items()}, lora.config
    )


def _pretrained_tiny_model(path, text: str):
    """A tiny Llama trained a little on `text`, so that its base perplexity is far below the
    vocabulary's (a random one predicts uniformly, which no adapter can make much worse)."""
    folder = write_tiny_model(path, layers=4)
    base = basemodel.load(folder)
    model, pad = base.model.requires_grad_(True).train(), base.tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for batch in lm.training_batches(lm.token_blocks(base.tokenizer, text, 32), 4, 60, pad, 0):
        lm.lm_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().requires_grad_(False).save_pretrained(folder)
    return basemodel.load(folder)


def _assert_published_as(model, folder, lora: LoraState) -> None:
    """The adapter published in `folder`, loaded by PEFT, gives `model` the logits that
    `lora` attached gives it."""
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), attached(model, lora) as expected:
        want = expected(input_ids=ids).logits
    with torch.no_grad():
        published = PeftModel.from_pretrained(model, folder)
        assert torch.allclose(published(input_ids=ids).logits, want, atol=1e-4)
        published.unload()


def _one_user_and_a_good_adapter(tmp_path, user: str, plan: EmulatorPlan | None = None):
    """A tiny pretrained model, `user`'s text, and a LoRA trained on it in the emulator of
    `plan` (default: all 4 layers, full mode's); the run folder holds that emulator (what
    `select_served` reads besides the store)."""
    torch.set_num_threads(1)
    data = write_users_jsonl(tmp_path / "users.jsonl", {user: 6000})
    users = load_users(data, DataOptions(validation_fraction=0.2))
    base = _pretrained_tiny_model(tmp_path / "model", users[user].train)
    emulator, info = build(base.model, plan or EmulatorPlan(4, top=2, drop=0.0), base.name)
    config = TrainConfig(steps=40, lr=1e-2, seq_len=32, max_eval_tokens=4096)
    blocks = lm.token_blocks(base.tokenizer, users[user].train, config.seq_len)
    pad = base.tokenizer.pad_token_id
    good, _ = train_lora(emulator, info, blocks, pad, config, fresh_lora(emulator, info, config))
    run = RunFolder(tmp_path / "run")
    save(emulator, info, run.emulator, cache=True)
    return users, base, config, good, run


@pytest.mark.parametrize(
    ("curve", "visited"),
    [
        ({0.5: 1.0, 0.75: 2.0, 1.0: 3.0, 1.25: 4.0}, [0.5, 0.75, 1.0]),  # lowest at 0.5
        ({0.5: 3.0, 0.75: 2.0, 1.0: 2.5, 1.25: 4.0}, [0.5, 0.75, 1.0]),  # at 0.75
        ({0.5: 3.0, 0.75: 2.0, 1.0: 1.0, 1.25: 4.0}, [0.75, 1.0, 1.25]),  # at 1
        ({0.5: 4.0, 0.75: 3.0, 1.0: 2.0, 1.25: 1.0}, [0.75, 1.0, 1.25]),  # at 1.25
        ({0.5: 3.0, 0.75: 2.0, 1.0: 2.0, 1.25: 3.0}, [0.75, 1.0, 1.25]),  # a tie stops
        ({1.0: 5.0}, [1.0]),
        ({0.25: 9, 0.5: 8, 0.75: 7, 1.0: 6, 1.25: 5, 1.5: 4, 2: 4.5}, [0.75, 1, 1.25, 1.5, 2]),
    ],
)
def test_the_strength_walk_goes_downhill_from_1_and_scores_nothing_uphill(curve, visited):
    asked = []

    def score(strength: float) -> tuple[torch.Tensor, torch.Tensor]:
        asked.append(strength)  # each strength scored once, and only those visited
        return torch.tensor([curve[strength] * 2], dtype=torch.float64), torch.tensor([2])

    found = strength_walk(sorted(curve), score)
    assert sorted(asked) == visited and sorted(found) == visited
    assert min(float(sums) / 2 for sums, _ in found.values()) == min(curve.values())


def test_a_harmful_adapter_is_never_served_and_the_run_says_so(tmp_path):
    """calm's own adapter helps; wild's and the global one are wrecked. calm is served their
    own, wild the base model (an all-zero LoRA, exactly the base model in PEFT); nobody is
    judged harmed, and the log names wild."""
    torch.set_num_threads(1)
    data = write_users_jsonl(tmp_path / "users.jsonl", {"calm": 6000, "wild": 6000})
    users = load_users(data, DataOptions(validation_fraction=0.2))
    base = _pretrained_tiny_model(tmp_path / "model", users["calm"].train)
    emulator, info = build(base.model, EmulatorPlan(4, top=2, drop=0.0), base.name)
    config = TrainConfig(steps=40, lr=1e-2, seq_len=32, max_eval_tokens=4096)
    pad = base.tokenizer.pad_token_id
    blocks = lm.token_blocks(base.tokenizer, users["calm"].train, config.seq_len)
    calm, _ = train_lora(emulator, info, blocks, pad, config, fresh_lora(emulator, info, config))

    run = RunFolder(tmp_path / "run")
    save(emulator, info, run.emulator, cache=True)
    write_lora(calm, run.store / "calm", {"round": 1})
    write_lora(_harmful(calm, 1), run.store / "wild", {"round": 1})
    write_lora(_harmful(calm, 2), run.global_dir, {"round": 1})
    run.set_state(round=1)

    chosen = select_served(run, base.model, base.tokenizer, users, config)
    assert {u: c["served"] for u, c in chosen.items()} == {"calm": "personal", "wild": "base"}
    assert chosen["wild"]["validation"]["personal"] > 2 * chosen["wild"]["validation"]["base"]
    assert chosen["calm"]["validation_gains"]["personal"]["verdict"] == "better"
    assert chosen["wild"]["validation_gains"]["personal"]["verdict"] == "worse"
    assert chosen["calm"]["global_over_personal"]["verdict"] == "worse"
    assert chosen["wild"]["why"].startswith("base model")
    assert json.loads(run.selection.read_text())["users"] == chosen
    lines: list[str] = []
    say_served(chosen, lines.append)
    assert lines == [
        "served, chosen on each user's validation text: base 1, personal 1",
        "  no adapter (base model) for wild: their own scored worse",
    ]

    _, version = compress_run(run, CompressionConfig(rank=16, bits=32))
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["source"]["served"] == {"calm": "personal", "wild": "base"}
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = base.model(input_ids=ids).logits
        published = PeftModel.from_pretrained(base.model, version / "users" / "wild")
        assert torch.allclose(published(input_ids=ids).logits, plain, atol=1e-6)
        published.unload()

    result = evaluate_run(run, base.model, base.tokenizer, users, config)
    rows = {r["user"]: r for r in result["users"]}
    assert rows["wild"]["personal"] > 2 * rows["wild"]["base"]  # its own would have harmed it
    assert rows["wild"]["served"] == "base"
    assert rows["wild"]["compressed"] == pytest.approx(rows["wild"]["base"], rel=1e-6)
    assert rows["wild"]["verdict"] == "unchanged" and rows["wild"]["kept"] is None
    assert rows["calm"]["served"] == "personal" and rows["calm"]["verdict"] == "helped"
    assert rows["calm"]["gains"]["personal_over_global"]["verdict"] == "better"
    assert result["summary"]["harmed"] == 0 and result["summary"]["helped"] == 1
    assert result["summary"]["served_counts"] == {"base": 1, "personal": 1}


def test_an_adapter_at_another_strength_is_served_where_validation_says_so(tmp_path):
    """loud's own adapter is a good one blown up ×4; tried at strengths 0.25 and 1, it is
    served at 0.25 (the good one, exactly), compressed and published as such, and judged at
    that strength; when the store moves on, the next compression serves the new adapter at
    0.25; chosen again with strength 1 only, it is served as it is."""
    users, base, config, good, run = _one_user_and_a_good_adapter(tmp_path, "loud")
    write_lora(good.scaled(4.0), run.store / "loud", {"round": 1})
    run.set_state(round=1)

    chosen = select_served(run, base.model, base.tokenizer, users, config, scales=(0.25, 1.0))
    entry = chosen["loud"]
    assert set(entry["validation"]) == {"base", "personal", "personal×0.25"}
    assert entry["served"] == "personal×0.25"
    assert entry["validation"]["personal×0.25"] < entry["validation"]["personal"]
    assert run.served_sources() == {"loud": ServedSource(run.store / "loud", scale=0.25)}
    served = run.served_adapter("loud")
    for key, tensor in good.tensors.items():
        assert torch.allclose(served.tensors[key], tensor, rtol=1e-6, atol=0), key

    _, version = compress_run(run, CompressionConfig(rank=16, bits=32))
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["source"]["served"] == {"loud": "personal×0.25"}
    result = evaluate_run(run, base.model, base.tokenizer, users, config)
    [row] = result["users"]
    assert row["served"] == "personal×0.25"
    assert row["compressed"] < row["personal"]  # what is served beats the adapter as trained
    assert row["gains"]["compression"]["point"] == pytest.approx(0.0, abs=1e-4)
    assert row["gains"]["chosen_over_base"]["point"] == pytest.approx(
        row["gains"]["served_over_base"]["point"], abs=1e-4
    )

    # the store moves on (a later round) before the next compression round chooses again:
    # what is compressed is the adapter as it is now, at the strength chosen
    write_lora(good.scaled(8.0), run.store / "loud", {"round": 2}, replace=True)
    _, version = compress_run(run, CompressionConfig(rank=16, bits=32))
    _assert_published_as(base.model, version / "users" / "loud", good.scaled(2.0))

    select_served(run, base.model, base.tokenizer, users, config)  # strength 1 only
    assert run.served_sources()["loud"].scale == 1.0


def test_in_emulator_mode_a_strength_scales_the_layers_the_emulator_stands_in_for(tmp_path):
    """An emulator of layers 1 (stood in for: 0 and 2 dropped around it) and 3 (the exact
    top). The candidate "personal×0.5" is scored, served, compressed and published as the
    adapter with layer 1's update halved and layer 3's as trained (PEFT logits); at 1.25
    every layer's update is scaled."""
    plan = EmulatorPlan(4, top=1, drop=0.5, select="even")
    users, base, config, own, run = _one_user_and_a_good_adapter(tmp_path, "u", plan)
    info = read_info(run.emulator)
    assert info.full_layers == [1, 3] and info.strength_modules == ("model.layers.1.",)
    write_lora(own, run.store / "u", {"round": 1})
    run.set_state(round=1)
    halved = {
        k: v * 0.5 if ".layers.1." in k and ".lora_B." in k else v for k, v in own.tensors.items()
    }
    by_hand = LoraState(halved, own.config)
    assert any(".layers.3." in k for k in own.tensors)  # the top layer has a part to keep

    entry = select_served(run, base.model, base.tokenizer, users, config, scales=(0.5, 1.0))["u"]
    val = lm.token_blocks(base.tokenizer, users["u"].validation, config.seq_len, 4096)
    pad = base.tokenizer.pad_token_id
    sums, counts = scored(base.model, by_hand, val, pad, config.batch_size)
    want = math.exp(float(sums.sum()) / int(counts.sum()))
    assert entry["validation"]["personal×0.5"] == pytest.approx(want, rel=1e-6)

    run.selection.write_text(json.dumps({"users": {"u": {"served": "personal×1.25"}}}))
    louder = run.served_adapter("u")  # above 1 a strength makes up for steps: every layer
    for key, tensor in own.tensors.items():
        assert torch.equal(louder.tensors[key], tensor * 1.25 if ".lora_B." in key else tensor)
    run.selection.write_text(json.dumps({"users": {"u": {"served": "personal×0.5"}}}))
    assert run.served_sources()["u"].modules == ("model.layers.1.",)
    served = run.served_adapter("u")
    for key, tensor in by_hand.tensors.items():
        assert torch.equal(served.tensors[key], tensor), key
    paths = snapshot(run, tmp_path / "snapshot", run.served_sources())
    record = json.loads((paths["u"] / "training.json").read_text())
    assert record == {"strength": 0.5, "strength_on": ["model.layers.1."]}
    _, version = compress_run(run, CompressionConfig(rank=16, bits=32))
    _assert_published_as(base.model, version / "users" / "u", by_hand)


def test_the_global_adapter_is_served_only_where_it_beats_the_users_own_significantly(tmp_path):
    """timid's own adapter is a good one at a fifth of its strength: better than the base
    model, and significantly worse than the global adapter (the good one itself), which is
    served; with the two swapped, timid is served their own."""
    users, base, config, good, run = _one_user_and_a_good_adapter(tmp_path, "timid")
    for own, shared, served in (
        (good.scaled(0.2), good, "global"),
        (good, good.scaled(0.2), "personal"),
    ):
        write_lora(own, run.store / "timid", {"round": 1}, replace=True)
        write_lora(shared, run.global_dir, {"round": 1}, replace=True)
        run.set_state(round=1)
        entry = select_served(run, base.model, base.tokenizer, users, config)["timid"]
        assert entry["validation_gains"]["personal"]["verdict"] == "better"
        assert entry["served"] == served
        rival = entry["global_over_personal"]["verdict"]
        assert rival == ("better" if served == "global" else "worse")
        why = {"global": "global adapter: significantly better", "personal": "own adapter"}
        assert entry["why"].startswith(why[served])


def test_labels_name_what_is_served_and_read_back():
    for kind, value, label in (
        ("personal", 1.0, "personal"),
        ("global", 1.25, "global×1.25"),
        ("base", 0.5, "base"),
        ("blend", 0.25, "blend@0.25"),
    ):
        assert served_label(kind, value) == label
        assert parse_served(label) == (kind, value if kind != "base" else 1.0)


def test_a_blend_of_the_users_own_and_the_global_adapter_is_served_where_it_is_best(tmp_path):
    """mixed's own adapter overshoots (the good one ×3) and the global one points the other
    way (×−1): neither is the good one, but their blend at μ = 0.5 is, exactly
    (0.5·(−1) + 0.5·3 = 1). The walk from μ = 1 finds it and stops past it; it is served,
    compressed and published as that blend (PEFT logits of the good adapter), and judged;
    with no blend weights the same user is served their own adapter or the global one."""
    users, base, config, good, run = _one_user_and_a_good_adapter(tmp_path, "mixed")
    write_lora(good.scaled(3.0), run.store / "mixed", {"round": 1})
    write_lora(good.scaled(-1.0), run.global_dir, {"round": 1})
    run.set_state(round=1)

    weights = (0.25, 0.5, 0.75)
    entry = select_served(run, base.model, base.tokenizer, users, config, weights=weights)["mixed"]
    assert entry["served"] == "blend@0.5"
    assert entry["why"].startswith("own adapter blended with the global one")
    assert {"blend@0.75", "blend@0.5", "blend@0.25"} == {
        c for c in entry["validation"] if c.startswith("blend")
    }  # 0.25 (the base model's update, 0×good) is scored and is worse: the walk stops
    assert entry["validation"]["blend@0.5"] < entry["validation"]["blend@0.25"]
    assert run.served_sources()["mixed"] == ServedSource(
        run.store / "mixed", shared=run.global_dir, weight=0.5
    )

    _, version = compress_run(run, CompressionConfig(rank=16, bits=32))
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["source"]["served"] == {"mixed": "blend@0.5"}
    _assert_published_as(base.model, version / "users" / "mixed", good)

    [row] = evaluate_run(run, base.model, base.tokenizer, users, config)["users"]
    assert row["served"] == "blend@0.5"
    assert row["chosen"] < min(row["personal"], row["global"])
    assert row["gains"]["compression"]["point"] == pytest.approx(0.0, abs=1e-4)

    entry = select_served(run, base.model, base.tokenizer, users, config)["mixed"]
    assert parse_served(entry["served"])[0] in ("personal", "global", "base")
