"""Nobody is served harm: what each user gets is chosen on their validation text, compressed,
published and judged with paired intervals, on a tiny model whose adapters are made harmful on
purpose."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import write_tiny_model, write_users_jsonl
from peft import PeftModel

from soppu import basemodel, lm
from soppu.adapters import LoraState, write_lora
from soppu.compression import CompressionConfig
from soppu.data import DataOptions, load_users
from soppu.emulator import EmulatorPlan, build, save
from soppu.personalize import fresh_lora, train_lora
from soppu.server.compression_round import compress_run
from soppu.server.evaluation import evaluate_run
from soppu.server.federation import say_served
from soppu.server.selection import choose, select_served
from soppu.server.store import RunFolder
from soppu.train_config import TrainConfig


def test_the_lowest_validation_loss_wins_and_a_tie_goes_to_the_simpler_choice():
    assert choose({"base": 3.0, "global": 2.5, "personal": 2.6}) == "global"
    assert choose({"base": 3.0, "global": 2.5, "personal": 2.4}) == "personal"
    assert choose({"base": 2.0, "global": 2.5, "personal": 2.4}) == "base"
    assert choose({"base": 2.0, "global": 2.0, "personal": 2.0}) == "base"
    assert choose({"base": 2.0, "personal": 1.0}) == "personal"  # no global adapter (none)
    # Only an adapter significantly better than the base model on validation may be served.
    losses = {"base": 3.0, "global": 2.5, "personal": 2.4}
    assert choose(losses, {"global"}) == "global"
    assert choose(losses, set()) == "base"


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
