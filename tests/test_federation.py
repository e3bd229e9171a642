"""The federation end to end on Flower's simulation engine, with a tiny random Llama.

Each simulation starts Ray (about 10 s), so the tests share a few runs and check much per run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Context
from flwr.clientapp import ClientApp
from helpers import write_tiny_model, write_users_jsonl
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from soppu import api, lm, messages
from soppu import emulator as E
from soppu.adapters import LoraState, read_lora
from soppu.cli import app as cli
from soppu.clients import client_app, task
from soppu.emulator import read_info
from soppu.personalize import attached
from soppu.server.config import FederationConfig
from soppu.server.selection import choose
from soppu.server.server_app import server_app
from soppu.server.store import RunFolder

USERS = [f"user{i}" for i in range(4)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model folder, four users' text and a private SOPPU cache for the clients."""
    root = tmp_path_factory.mktemp("federation")
    previous = os.environ.get("SOPPU_CACHE")
    os.environ["SOPPU_CACHE"] = str(root / "cache")  # Ray workers inherit it
    model = write_tiny_model(root / "model", layers=6)
    data = write_users_jsonl(root / "users.jsonl", {u: 3000 for u in USERS})
    write_users_jsonl(root / "public.jsonl", {"nobody": 6000}, seed=1)
    yield root, model, data
    if previous is None:
        os.environ.pop("SOPPU_CACHE", None)
    else:
        os.environ["SOPPU_CACHE"] = previous


def tiny_config(world, run: str, **changes) -> FederationConfig:
    root, model, data = world
    values = dict(
        run_dir=str(root / run),
        base_model=str(model),
        data=str(data),
        users=4,
        rounds=2,
        local_steps=4,
        lr=5e-3,
        seq_len=32,
        max_eval_tokens=256,
        align_steps=0,
        public=str(root / "public.jsonl"),
        compress_rank=32,  # = 4 users × LoRA rank 8: the compression is exact ...
        compress_bits=32,  # ... stored in float32 (the default 4-bit codes are not)
        threads=1,
    )
    return FederationConfig.from_run_config({**values, **changes})


def simulate(config: FederationConfig, app: ClientApp = client_app.app) -> list[str]:
    from flwr.simulation import run_simulation

    lines: list[str] = []
    run_simulation(
        server_app(config, log=lines.append),
        app,
        num_supernodes=config.data.users,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    return lines


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_federation_trains_every_user_and_publishes_what_peft_loads(world):
    """The default scheme on the users' own data with --public: the emulator is aligned on
    the public text, every round sends the gradient correction, and every user ends with a
    global and a personal perplexity."""
    config = tiny_config(world, "run-ok", align_steps=4)
    assert config.scheme.name == "local-prox" and config.client_mode == "emulator"
    lines = simulate(config)
    run = RunFolder(Path(config.run_dir))
    info = read_info(run.emulator)
    assert info.aligned and info.alignment["after"]["loss"] < info.alignment["before"]["loss"]
    assert any(f"emulator {info.version}" in line and "aligned (KL" in line for line in lines)
    assert not any("embedded public pool" in line for line in lines)  # --public was given
    assert sum("gradient correction for 1 starting adapter" in line for line in lines) == 2
    assert run.state()["round"] == 2 and run.state()["compressed_round"] == 2
    assert run.users() == USERS
    rows = run.read_jsonl(run.metrics)
    assert sorted((r["round"], r["user"]) for r in rows) == [(r, u) for r in (1, 2) for u in USERS]
    assert all(r["status"] == "trained" for r in rows)
    for user in USERS:
        training = json.loads((run.store / user / "training.json").read_text())
        assert training["round"] == 2 and training["emulator"].startswith("emu-")

    # What each user is served was chosen on their validation text (their own adapter where
    # it beats the base model significantly and the global one does not beat it; else the
    # lowest loss among the base model and the adapters significantly better than it), and
    # the published adapter is that one (rank N·k compresses exactly): the user's own, the
    # global one, or all zeros (the base model).
    selection = json.loads(run.selection.read_text())["users"]
    assert sorted(selection) == USERS
    for entry in selection.values():
        gains = entry["validation_gains"]
        beat = {name for name, gain in gains.items() if gain["low"] > 0}
        rival = entry["global_over_personal"]["low"] > 0
        assert entry["served"] == choose(entry["validation"], beat, global_beats_personal=rival)
    assert any("served, chosen on each user's validation text" in line for line in lines)
    manifest = json.loads((run.compressed / "v0001" / "manifest.json").read_text())
    assert manifest["source"]["served"] == {u: e["served"] for u, e in selection.items()}
    serving = run.serving / "current" / "users"
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(world[1], dtype=torch.float32).eval()
    plain = logits(base, ids)
    for user in run.users()[:2]:
        own = PeftModel.from_pretrained(base, run.store / user)
        assert not torch.allclose(logits(own, ids), plain, atol=1e-4)
        base = own.unload()
        with attached(base, run.served_adapter(user)) as served:
            served_logits = logits(served, ids)
        published = PeftModel.from_pretrained(base, serving / user)
        assert torch.allclose(logits(published, ids), served_logits, atol=1e-4)
        base = published.unload()

    evaluation = json.loads((run.root / "evaluation.json").read_text())
    assert [r["user"] for r in evaluation["users"]] == USERS
    for row in evaluation["users"]:
        assert row["served"] == selection[row["user"]]["served"]
        assert row["compressed"] == pytest.approx(row["chosen"], rel=1e-4)
        kind, _, scale = row["served"].partition("×")
        if not scale:  # as trained: the chosen one is that column
            assert row["chosen"] == row[kind]
        assert row["emulator"] is not None and row["global"] is not None
        assert row["personal"] < row["base"] and row["global"] < row["base"]
        assert row["personal"] != row["global"]
        served_gain = row["gains"]["served_over_base"]
        assert served_gain["low"] <= served_gain["point"] <= served_gain["high"]
        assert (
            row["verdict"]
            == {"better": "helped", "worse": "harmed", "same": "unchanged"}[served_gain["verdict"]]
        )
        over_global = row["gains"]["personal_over_global"]
        if over_global["verdict"] == "better" and row["served"] == "personal":
            # compressed is personal to rel 1e-4, so the share is 1 to that over the gain's size
            margin = 1e-4 * row["personal"] / (row["global"] - row["personal"])
            assert row["kept_over_global"] == pytest.approx(1.0, abs=max(1e-3, 2 * margin))
        else:
            assert row["kept_over_global"] is None  # no significant gain to keep a share of
    summary = evaluation["summary"]
    assert summary["with_global"] == 4 and 0 <= summary["beats_global"] <= 4
    assert summary["helped"] + summary["harmed"] + summary["unchanged"] == 4

    described = CliRunner().invoke(cli, ["inspect", str(run.root)])
    assert "federation run" in described.output and "rounds: 2 of 2 done" in described.output
    assert "adapters stored: 4" in described.output

    # A compression round from the command line on the stopped run: the next versions.
    result = CliRunner().invoke(cli, ["compress", "--run", str(run.root), "--rank", "8"])
    assert result.exit_code == 0, result.output
    assert (run.compressed / "v0002" / "manifest.json").is_file()
    assert (run.serving / "current").resolve().name == "v0002"
    manifest = json.loads((run.compressed / "v0002" / "manifest.json").read_text())
    assert manifest["source"]["round"] == 2 and manifest["users"] == USERS
    assert (manifest["config"]["rank"], manifest["config"]["bits"]) == (8, 32)
    # Without flags it compresses as the run's own rounds do (rank 32), not at the CLI's
    # stand-alone default (energy 0.9); a flag still wins over the run's setting.
    result = CliRunner().invoke(cli, ["compress", "--run", str(run.root), "--bits", "8"])
    assert result.exit_code == 0, result.output
    assert "rank 32, 8-bit storage" in result.output
    manifest = json.loads((run.compressed / "v0003" / "manifest.json").read_text())
    assert (manifest["config"]["rank"], manifest["config"]["bits"]) == (32, 8)

    # The same through the Python API: a compression round with the run's own settings, the
    # final evaluation again (the same figures: the same text, adapters and model), the report.
    version = api.compress_run(run.root)
    assert version.root.name == "v0004" and (run.serving / "current").resolve() == version.root
    assert version.users() == USERS and version.manifest["compression"]["rank"] == 32
    again = api.evaluate(run.root, log=lambda line: None)
    assert [(r["user"], r["base"], r["personal"]) for r in again["users"]] == [
        (r["user"], r["base"], r["personal"]) for r in evaluation["users"]
    ]
    assert api.report(run.serving)["totals"]["users"] == 4

    # Resuming the finished run does nothing but say so (no Ray, nothing rewritten); the
    # command line's --re-evaluate evaluates it again.
    before, said = run.evaluation.stat().st_mtime_ns, []
    resumed = api.simulate(config, resume=True, log=said.append)
    assert len(said) == 1 and said[0].startswith(f"{run.root} is finished: 2 rounds, serving v")
    assert said[0].endswith("nothing to do (--re-evaluate evaluates it again)")
    assert run.evaluation.stat().st_mtime_ns == before
    assert resumed.evaluation == json.loads(run.evaluation.read_text())
    with pytest.raises(ValueError, match="needs --resume"):
        api.simulate(config, re_evaluate=True)
    result = CliRunner().invoke(
        cli, ["simulate", "--out", str(run.root), "--resume", "--re-evaluate"]
    )
    assert result.exit_code == 0 and "evaluating it again" in result.output, result.output
    assert run.evaluation.stat().st_mtime_ns > before


def _after_round_one_committed() -> None:
    state = Path(os.environ["SOPPU_TEST_FLAKY_RUN"]) / "state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if state.is_file() and json.loads(state.read_text())["round"] >= 1:
            return
        time.sleep(0.2)


def _flaky_train(msg, context):
    """user1 raises, user2 answers too late, user3 sends NaN: all in round 1 only."""
    setup = messages.Setup.from_record(msg.content[messages.SETUP])
    user = task.my_user(context.node_config, setup)
    first = int(msg.content[messages.CONFIG]["round"]) == 1
    if first and user == "user1":
        raise RuntimeError("disk full")
    if first and user == "user2":
        _after_round_one_committed()  # too late on any machine, however loaded
    reply = client_app.train(msg, context)
    if first and user == "user3":
        tensors = reply.content[messages.LORA].to_torch_state_dict()
        poisoned = {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}
        reply.content[messages.LORA] = ArrayRecord(torch_state_dict=poisoned)
    return reply


def test_failed_slow_and_bad_clients_cost_only_their_own_round(world):
    flaky = ClientApp()
    flaky.query()(client_app.query)
    flaky.train()(_flaky_train)
    flaky.evaluate()(client_app.evaluate)
    # The others have 20 s to train 4 tiny steps; user2 answers only once round 1 is over.
    config = tiny_config(
        world, "run-flaky", round_timeout=20.0, scheme="fedavg-ft", fraction_evaluate=1.0
    )
    os.environ["SOPPU_TEST_FLAKY_RUN"] = config.run_dir  # Ray's workers inherit it
    lines = simulate(config, flaky)
    run = RunFolder(Path(config.run_dir))
    rows = {(r["round"], r["user"]): r for r in run.read_jsonl(run.metrics)}
    assert rows[(1, "user0")]["status"] == "trained"
    assert rows[(1, "user1")]["status"] == "failed" and "disk full" in rows[(1, "user1")]["reason"]
    assert "no reply within" in rows[(1, "user2")]["reason"]
    assert "NaN" in rows[(1, "user3")]["reason"]
    assert all(rows[(2, u)]["status"] == "trained" for u in USERS)
    assert run.users() == USERS  # every user has an adapter in the end
    assert (run.global_dir / "adapter_model.safetensors").is_file()
    summary = run.read_jsonl(run.rounds)
    assert [s["trained"] for s in summary] == [1, 4] and summary[0]["failed"] == 3
    assert all(s["federated_eval_loss"] > 0 for s in summary)  # the global adapter, evaluated
    assert any("user1: failed" in line and "disk full" in line for line in lines)
    assert any("NOT aligned" in line for line in lines)  # align_steps=0 is never silent


def test_a_killed_run_resumes_with_every_adapter_exactly_once(world, tmp_path):
    _, model, data = world
    run_dir = tmp_path / "run"
    args = [
        str(Path(sys.executable).with_name("soppu")),
        "simulate",
        "--out",
        str(run_dir),
        "--base-model",
        str(model),
        "--data",
        str(data),
        "--users",
        "4",
        "--rounds",
        "3",
        "--local-steps",
        "40",
        "--seq-len",
        "32",
        "--max-eval-tokens",
        "256",
        "--align-steps",
        "0",
        "--public",
        str(Path(data).with_name("public.jsonl")),
        "--rank",
        "32",
        "--threads",
        "1",
        "--no-final-evaluation",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    first = subprocess.Popen(
        args, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    state = run_dir / "state.json"
    deadline = time.monotonic() + 240
    try:
        while not (state.is_file() and json.loads(state.read_text())["round"] >= 1):
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "round 1 never committed"
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the CLI, Ray and its workers
        first.wait()
    killed_at = json.loads(state.read_text())["round"]
    assert killed_at < 3

    again = subprocess.run(
        [*args, "--resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"resuming after round {killed_at}" in again.stdout
    run = RunFolder(run_dir)
    assert run.state()["round"] == 3 and run.state()["compressed_round"] == 3
    rows = run.read_jsonl(run.metrics)
    keys = [(r["round"], r["user"]) for r in rows]
    assert sorted(keys) == [(r, u) for r in (1, 2, 3) for u in USERS]  # none lost or doubled
    for user in USERS:
        assert json.loads((run.store / user / "training.json").read_text())["round"] == 3
    assert not run.staging.exists()


def test_ditto_runs_two_tracks_through_flower_and_keeps_each_users_own(world):
    """Ditto end to end: every client trains a shared copy from the global adapter and its own
    adapter pulled towards it; the next global adapter is the average of the shared copies
    (not of what users keep), and every user's published adapter is what they are served."""
    from soppu.server.schemes import Robustness, robust_mean

    config = tiny_config(world, "run-ditto", scheme="ditto", prox=0.5, final_evaluation=False)
    lines = simulate(config)
    run = RunFolder(Path(config.run_dir))
    assert run.state()["round"] == 2 and run.state()["compressed_round"] == 2
    assert sum("gradient correction for 1 starting adapter" in line for line in lines) == 2
    rows = [r for r in run.read_jsonl(run.metrics) if r["round"] == 2]
    assert sorted(r["user"] for r in rows) == USERS and all(r["status"] == "trained" for r in rows)
    personal = {u: run.latest(u) for u in USERS}
    for user in USERS:
        assert json.loads((run.store / user / "training.json").read_text())["scheme"] == "ditto"
    global_lora = run.global_adapter()
    record = json.loads((run.global_dir / "training.json").read_text())
    assert record["scheme"] == "ditto" and record["round"] == 2
    previous = {r["user"]: (personal[r["user"]], global_lora, int(r["num-examples"])) for r in rows}
    kept = robust_mean(previous, Robustness(0, 0, 0)).lora  # what averaging the personal would give
    key = next(iter(global_lora.tensors))
    assert not torch.allclose(kept.tensors[key], global_lora.tensors[key], atol=1e-6)
    assert not torch.allclose(personal["user0"].tensors[key], personal["user1"].tensors[key])
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(world[1], dtype=torch.float32).eval()
    with attached(base, run.served_adapter("user2")) as own:  # unless it scored worse
        expected = logits(own, ids)
    published = PeftModel.from_pretrained(base, run.serving / "current" / "users" / "user2")
    assert torch.allclose(logits(published, ids), expected, atol=1e-4)


def _recording_train(msg, context):
    """The real client, with what it was sent and what it replied saved per round and user."""
    setup = messages.Setup.from_record(msg.content[messages.SETUP])
    user = task.my_user(context.node_config, setup)
    config = msg.content[messages.CONFIG]
    reply = client_app.train(msg, context)

    def lora(content, key):
        return content[key].to_torch_state_dict() if key in content else None

    record = {
        "tracks": int(config["tracks"]),
        "start": lora(msg.content, messages.LORA),
        "anchor": lora(msg.content, messages.ANCHOR),
        "reply": lora(reply.content, messages.LORA),
        "shared": lora(reply.content, messages.SHARED),
        "examples": int(reply.content[messages.METRICS]["num-examples"]),
    }
    folder = Path(os.environ["SOPPU_TEST_RECORD_DIR"])
    torch.save(record, folder / f"{int(config['round'])}-{user}.pt")
    return reply


def test_local_prox_trains_one_track_and_averages_what_users_keep(world, tmp_path, monkeypatch):
    """local-prox end to end through Flower: each client trains once a round (no shared copy),
    continuing its own adapter from round 1, pulled to the global adapter it is sent; the next
    global adapter is the robust mean of the personal adapters measured from that anchor."""
    from soppu.server.schemes import Robustness, robust_mean

    recording = ClientApp()
    recording.query()(client_app.query)
    recording.train()(_recording_train)
    recording.evaluate()(client_app.evaluate)
    monkeypatch.setenv("SOPPU_TEST_RECORD_DIR", str(tmp_path))  # Ray's workers inherit it
    config = tiny_config(
        world, "run-local-prox", scheme="local-prox", prox=0.5, final_evaluation=False
    )
    lines = simulate(config, recording)
    run = RunFolder(Path(config.run_dir))
    assert run.state()["round"] == 2
    assert sum("gradient correction for 1 starting adapter" in line for line in lines) == 2
    seen = {(r, u): torch.load(tmp_path / f"{r}-{u}.pt") for r in (1, 2) for u in USERS}
    assert all(s["tracks"] == 1 and s["shared"] is None for s in seen.values())

    def state(tensors) -> LoraState:
        return LoraState(tensors, dict(run.global_adapter().config))

    def mean(round_: int) -> LoraState:
        anchor = state(seen[(round_, USERS[0])]["anchor"])
        replies = {
            u: (state(seen[(round_, u)]["reply"]), anchor, seen[(round_, u)]["examples"])
            for u in USERS
        }
        return robust_mean(replies, Robustness()).lora  # the defaults' robust mean

    first = mean(1)
    for user in USERS:
        two = seen[(2, user)]
        for key, value in two["start"].items():  # continues its own, not the average
            assert torch.equal(value, seen[(1, user)]["reply"][key])
        for key, value in two["anchor"].items():  # pulled to round 1's average
            assert torch.allclose(value, first.tensors[key], atol=1e-6)
        assert json.loads((run.store / user / "training.json").read_text())["scheme"] == (
            "local-prox"
        )
    final, stored = mean(2), run.global_adapter()
    for key, value in stored.tensors.items():
        assert torch.allclose(value, final.tensors[key], atol=1e-6), key
    key = next(iter(stored.tensors))
    assert not torch.allclose(seen[(2, "user0")]["reply"][key], seen[(2, "user1")]["reply"][key])


def test_re_alignment_ships_a_new_emulator_before_every_round_after_the_first(world):
    """--realign-steps through real Flower: before rounds 2 and 3 the server re-aligns the
    emulator at the round's starting adapter and every node trains on the new version (sent
    to one, found in the machine's cache by the rest); the run's emulator is the last one, its
    adapter layers still the full model's, so what clients train still plugs in."""
    config = tiny_config(
        world,
        "run-realign",
        rounds=3,
        realign_steps=3,
        final_evaluation=False,
        validation_fraction=0,
    )
    lines = simulate(config)
    run = RunFolder(Path(config.run_dir))
    assert run.state()["round"] == 3 and run.state()["compressed_round"] == 3
    said = [line for line in lines if "emulator re-aligned at the round's starting adapter" in line]
    assert len(said) == 2 and all("3 steps" in line for line in said), lines
    versions = [r["emulator"] for r in run.read_jsonl(run.rounds)]
    assert len(set(versions)) == 3, versions  # one emulator per round
    for version in versions[1:]:  # round 1's may be in the cache from another test's run
        assert sum(f"emulator {version}: sent to 1 node(s)" in line for line in lines) == 1
    for user in USERS:
        record = json.loads((run.store / user / "training.json").read_text())
        assert record["round"] == 3 and record["emulator"] == versions[2]
    info = read_info(run.emulator)
    assert info.version == versions[2] and info.alignment["realigned"]["round"] == 3
    full = AutoModelForCausalLM.from_pretrained(world[1], dtype=torch.float32)
    emulator = AutoModelForCausalLM.from_pretrained(run.emulator, dtype=torch.float32)
    for j, layer in enumerate(info.full_layers):
        same = all(
            torch.equal(a, b)
            for a, b in zip(
                emulator.model.layers[j].parameters(),
                full.model.layers[layer].parameters(),
                strict=True,
            )
        )
        assert same == (layer in info.adapter_layers), layer  # the middle ones moved


def _untaught_train(msg, context):
    """user3 plays a real node (a user-id of its own) whose config names no teacher-url."""
    setup = messages.Setup.from_record(msg.content[messages.SETUP])
    if task.my_user(context.node_config, setup) == "user3":
        real = {**context.node_config, "user-id": "user3"}
        context = Context(context.run_id, context.node_id, real, context.state, context.run_config)
    return client_app.train(msg, context)


def test_clients_repair_their_emulator_once_on_their_own_text_and_train_on_it(world):
    """--repair-steps through real Flower: in round 1 every node (simulated: the full model in
    its own process is the teacher) repairs its emulator on its own text, judges the repair
    on its validation text and keeps in its cache the repaired middle layers or the record
    that it undid them (a tiny random model and its emulator are as far from the text as each
    other: no gap to close, so undone); round 2 repairs nothing. A real node that names no
    teacher says so, and only its own rounds are lost."""
    untaught = ClientApp()
    untaught.query()(client_app.query)
    untaught.train()(_untaught_train)
    untaught.evaluate()(client_app.evaluate)
    config = tiny_config(world, "run-repair", repair_steps=3, final_evaluation=False)
    lines = simulate(config, untaught)
    run = RunFolder(Path(config.run_dir))
    assert run.state()["round"] == 2
    assert any("clients repair their emulator on their own text first" in line for line in lines)
    rows = run.read_jsonl(run.metrics)
    taught = USERS[:3]
    assert {(r["round"], r["user"]) for r in rows if "repair-seconds" in r} == {
        (1, u) for u in taught
    }
    failed = [r for r in rows if r["user"] == "user3"]
    assert len(failed) == 2 and all(
        r["status"] == "failed" and "names no teacher-url" in r["reason"] for r in failed
    )
    pieces = 3 * config.training.batch_size  # every user has more training blocks
    assert all(r["repair-pieces"] == pieces for r in rows if "repair-pieces" in r)
    assert sum("repaired its emulator on" in line for line in lines) == len(taught)
    # each node judged its repair on its validation text; its file and its reply agree
    version = read_info(run.emulator).version
    files = sorted((world[0] / "cache" / "emulators" / version / "repairs").iterdir())
    assert [p.name.rsplit("-", 1)[0] for p in files] == taught
    emulator = AutoModelForCausalLM.from_pretrained(run.emulator, dtype=torch.float32)
    replies = {r["user"]: r for r in rows if "repair-kept" in r}
    for path in files:
        reply = replies[path.name.rsplit("-", 1)[0]]
        assert reply["repair-steps-taken"] == 3 and "repair-check-low" in reply
        middle = load_file(path)
        with safe_open(path, "pt") as f:
            assert f.metadata()["kept"] == ("true" if reply["repair-kept"] else "false")
        assert bool(middle) == bool(reply["repair-kept"])
        assert not any(torch.equal(v, emulator.state_dict()[k]) for k, v in middle.items())


def test_a_resumed_round_is_not_re_aligned_twice(world, tmp_path):
    """The re-aligned emulator is saved before its round trains, with the round it is for: a
    run resumed after that (the round never committed) trains on it as it is, not on an
    emulator re-aligned twice."""
    from soppu import basemodel
    from soppu.emulator import load
    from soppu.personalize import fresh_lora
    from soppu.server.prepare_run import round_realignment

    root, model, _ = world
    config = tiny_config(world, "unused", realign_steps=2, layer_select="even")
    base = basemodel.load(model)
    run = RunFolder(tmp_path / "run")
    emulator, info = E.build(base.model, config.plan(base.num_layers), base.name)
    E.save(emulator, info, run.emulator)
    emulator, info = load(run.emulator)
    lora = fresh_lora(emulator, info, config.train())
    lora = LoraState({k: v + 0.1 for k, v in lora.tensors.items()}, lora.config)
    public = lm.token_blocks(
        base.tokenizer, (root / "public.jsonl").read_text(), config.training.seq_len
    )

    first = info.version
    version, done = round_realignment(config, base, emulator, info, public, run)(lora, 2)
    assert done is not None and done["round"] == 2 and version != first
    assert read_info(run.emulator).version == version
    saved = {k: v.clone() for k, v in emulator.state_dict().items()}
    resumed, resumed_info = load(run.emulator)  # what a resumed run's prepare loads
    again = round_realignment(config, base, resumed, resumed_info, public, run)(lora, 2)
    assert again == (version, None)
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in saved.items())
    assert read_info(run.emulator).version == version
    later, _ = round_realignment(config, base, resumed, resumed_info, public, run)(lora, 3)
    assert later != version and read_info(run.emulator).alignment["realigned"]["round"] == 3


# at 5e-3 every pass keeps steps past the global adapter; at 100 some keep none
@pytest.mark.parametrize("lr", [5e-3, 100.0])
def test_a_personal_pass_after_the_last_round_keeps_each_users_best_step(world, lr):
    """--personal-pass: after the last round every user fine-tunes the final global adapter,
    keeping the step best on their validation text (the global adapter itself where no step
    beats it, and then the user keeps the adapter round 1 left them, or takes the global one
    where round 1 did not sample them); it commits as one more round and the run compresses
    once, after it. With --repair-for pass the clients repair their emulator for the pass
    only: round 1 (and so the global adapter) trains on the emulator as sent."""
    config = tiny_config(
        world,
        f"run-pass-{lr:g}",
        rounds=1,
        fraction_train=0.5,  # two users have no adapter of their own before the pass
        personal_pass=6,
        personal_pass_check=2,
        personal_pass_lr=lr,
        repair_steps=2 if lr < 1 else 4,  # its own repairs (a node keeps them; 3: run-repair)
        repair_for="pass",
        log_to="tensorboard,mlflow",
    )
    lines = simulate(config)
    run = RunFolder(Path(config.run_dir))
    assert run.state()["round"] == 2 and run.state()["compressed_round"] == 2
    assert run.compressed.is_dir() and [p.name for p in run.compressed.glob("v*")] == ["v0001"]
    assert any(line.startswith("personal pass: 4 users") for line in lines)
    assert any("their own text for the final personal pass only" in line for line in lines)
    every = run.read_jsonl(run.metrics)
    assert {(r["round"], r["user"]) for r in every if "repair-seconds" in r} == {
        (2, u) for u in USERS
    }
    rows = [r for r in every if r["round"] == 2]
    assert sorted(r["user"] for r in rows) == USERS
    global_lora = run.global_adapter()
    assert json.loads((run.global_dir / "training.json").read_text())["round"] == 1
    first = {r["user"] for r in every if r["round"] == 1}
    assert len(first) == 2
    kept_steps = [r["best-step"] > 0 for r in rows]
    assert all(kept_steps) if lr < 1 else not all(kept_steps)  # both paths, a run each
    for row in rows:  # a pass that beat the global adapter nowhere leaves round 1's adapter
        assert row["best-step"] in (0, 2, 4, 6)
        mine = run.latest(row["user"])
        record = json.loads((run.store / row["user"] / "training.json").read_text())
        replaced = row["best-step"] > 0 or row["user"] not in first
        assert record["round"] == (2 if replaced else 1), row
        same = all(torch.equal(mine.tensors[k], v) for k, v in global_lora.tensors.items())
        assert same == (row["best-step"] == 0 and row["user"] not in first), row
    summary = run.read_jsonl(run.rounds)[-1]
    assert summary["personal_pass"] and summary["best_steps"] == {
        r["user"]: r["best-step"] for r in rows
    }
    assert (run.root / "rounds.png").is_file() and (run.root / "tensorboard").is_dir()
    # --log-to mlflow beside: the round, the pass and the compression after it, by round
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run.root / 'mlflow' / 'mlflow.db'}")
    [mlrun] = client.search_runs(client.get_experiment_by_name("soppu").experiment_id)
    trained = client.get_metric_history(mlrun.info.run_id, "users/trained")
    assert [(m.step, m.value) for m in trained] == [(1, 2.0), (2, 4.0)]
    [ratio] = client.get_metric_history(mlrun.info.run_id, "compression/ratio in bytes")
    totals = json.loads((run.compressed / "v0001" / "manifest.json").read_text())["totals"]
    assert ratio.step == 2 and ratio.value == pytest.approx(totals["ratio"])
    assert mlrun.data.params["personal_pass"] == "6"


def test_central_privacy_noises_the_global_adapter_and_accounts_epsilon(world):
    """With --dp-noise the global adapter is the private mean (every update clipped to
    --dp-clip, Gaussian noise), each round logs and records ε, which adds up over rounds."""
    from soppu.server.schemes import epsilon

    config = tiny_config(world, "run-dp", dp_noise=1.0, dp_clip=1e-3, final_evaluation=False)
    lines = simulate(config)
    run = RunFolder(Path(config.run_dir))
    said = [line for line in lines if "central DP" in line]
    assert len(said) == 2
    for round_, line in zip((1, 2), said, strict=True):
        assert f"ε = {epsilon(1.0, round_, 1e-5):.3g} at δ = 1e-05 after {round_} rounds" in line
    record = json.loads((run.global_dir / "training.json").read_text())
    assert record["dp"] == {
        "noise": 1.0,
        "clip": 1e-3,
        "delta": 1e-5,
        "rounds": 2,
        "epsilon": pytest.approx(epsilon(1.0, 2, 1e-5)),
    }
    assert sorted(record["clipped"]) == USERS  # every real update is longer than 1e-3
    with pytest.raises(ValueError, match="dp-clip"):
        tiny_config(world, "run-dp-bad", dp_noise=1.0)


def test_split_clients_train_the_top_layers_exactly_through_flower(world):
    """client-mode split through real Flower: the clients hold the top 2 of 6 layers, fed by
    the full model in their own process (simulated nodes), nothing is aligned or corrected,
    each client's own held-out loss on its split model is the full model's with the adapter
    it returns, and what is published sits on the top layers' every projection and loads in
    PEFT. A real node, with nowhere to ask for its features, loses only its own rounds."""
    features_app = ClientApp()
    features_app.query()(client_app.query)
    features_app.train()(_untaught_train)
    features_app.evaluate()(client_app.evaluate)
    config = tiny_config(world, "run-split", client_mode="split", top=2, precision="fp32")
    lines = simulate(config, features_app)
    run = RunFolder(Path(config.run_dir))
    info = read_info(run.emulator)
    assert info.split and info.full_layers == [4, 5] and not info.aligned
    assert any("split mode" in line and "layer 4" in line for line in lines)
    assert not any("gradient correction" in line or "public text" in line for line in lines)
    rows = run.read_jsonl(run.metrics)
    trained = [r for r in rows if r["status"] == "trained"]
    assert sorted({r["user"] for r in trained}) == USERS[:3]
    failed = [r for r in rows if r["user"] == "user3"]
    assert len(failed) == 2 and all("names no teacher-url" in r["reason"] for r in failed)
    base = AutoModelForCausalLM.from_pretrained(world[1], dtype=torch.float32).eval()
    tokenizer = task.tokenizer_for(str(world[1]))
    users = task._users(str(world[2]), json.dumps(config.data_options().__dict__, sort_keys=True))
    for row in (r for r in trained if r["round"] == 2):
        user = row["user"]
        adapter = read_lora(run.store / user)
        assert adapter.config["layers_to_transform"] == [4, 5]
        assert set(adapter.config["target_modules"]) == {
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
        }  # fmt: skip
        blocks = lm.token_blocks(tokenizer, users[user].test, 32, 256)
        with attached(base, adapter) as model:
            full_loss = math.log(lm.perplexity(model, blocks, tokenizer.pad_token_id))
        assert row["eval-loss-after"] == pytest.approx(full_loss, abs=1e-4)
    served = run.serving / "current" / "users" / USERS[0]
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = logits(base, ids)
    peft = PeftModel.from_pretrained(base, served)  # (injects the LoRA into `base`)
    assert not torch.allclose(logits(peft, ids), plain, atol=1e-5) or (
        json.loads(run.selection.read_text())["users"][USERS[0]]["served"] == "none"
    )
