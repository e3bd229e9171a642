"""`soppu serve` around the requests: adapters by path, /health and metrics; a new version
that does not fit the loaded model is refused and the old one keeps serving; an engine that
dies makes /health 503 and the process exit 1, while SIGTERM still stops it as usual. Waits
allow minutes; nothing races the clock."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
import torch
from helpers import free_port, make_served, tiny_population, write_users
from test_serving_faults import (
    PATIENCE,
    assert_one_line_error,
    live,
    live_server,
    post_raw,
    slow_steps,
    wait_for,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from soppu.compression.compress import CompressionConfig
from soppu.server.compress_store import compress_adapters
from soppu.server.publish import publish
from soppu.server.serving.engine import Engine, VersionMisfit
from soppu.server.serving.shared_weights import load_shared


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[Path, Path]:
    return make_served(tmp_path_factory.mktemp("lifecycle"))


server = pytest.fixture(scope="module", name="server")(live_server)


# ---------------------------------------------------------------------- adapters by path


def test_a_local_adapter_path_must_lie_inside_the_serving_dir(server):
    url, serving, _ = server

    def ask(adapter: str, source: str | None = "local") -> requests.Response:
        parameters = {"adapter_id": adapter, "adapter_source": source, "max_new_tokens": 3}
        return requests.post(
            f"{url}/generate", json={"inputs": "hi", "parameters": parameters}, timeout=PATIENCE
        )

    by_id = ask("user00", None).json()
    for inside in [
        str(serving / "current" / "users" / "user00"),
        str(serving / "v0001" / "users" / "user00"),
        "current/users/user00",  # relative to the serving dir
        "user00",  # a bare user id with `local`: lorax-client's habit
    ]:
        reply = ask(inside)
        assert reply.status_code == 200 and reply.json() == by_id, (inside, reply.text)
    for outside in [
        "/etc/user00",
        str(serving / "current" / "users" / ".." / ".." / ".." / "user00"),
        str(serving / "current"),
        str(serving.parent / "elsewhere" / "users" / "user00"),
        "bad/\x00path",
    ]:
        assert_one_line_error(ask(outside), 404, "not a published user dir")
    assert_one_line_error(ask("mallory"), 404, "mallory")
    assert_one_line_error(ask(str(serving / "current" / "users" / "mallory")), 404, "mallory")
    assert_one_line_error(ask("/etc/user00", None), 404, "not a published user dir")
    assert_one_line_error(ask("user00", "s3"), 422, "adapter_source")


# ---------------------------------------------------------------------- health and metrics


def test_health_says_the_version_users_and_engine_and_every_route_is_counted(server):
    url, _, _ = server
    health = requests.get(f"{url}/health", timeout=PATIENCE).json()
    assert health["engine_alive"] is True and health["users"] >= 3
    assert health["version"].startswith("v")
    completion = {"model": "user00", "prompt": "hi", "max_tokens": 2}
    assert requests.post(f"{url}/v1/completions", json=completion, timeout=PATIENCE).ok
    chat = {"model": "user00", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert requests.post(f"{url}/v1/chat/completions", json=chat, timeout=PATIENCE).ok
    metrics = requests.get(f"{url}/metrics", timeout=PATIENCE).text
    for route in ("/v1/completions", "/v1/chat/completions", "/health"):
        assert f'soppu_requests_total{{route="{route}",status="200"}}' in metrics, route
    assert "soppu_engine_up 1.0" in metrics and "soppu_queue_seconds_bucket" in metrics


# ---------------------------------------------------------------------- versions that do not fit


def publish_users(root: Path, name: str, users: dict, serving: Path, base_model: str) -> None:
    paths = write_users(root / f"{name}-adapters", users, rank=4, alpha=8, base_model=base_model)
    compress_adapters(paths, root / f"{name}-store", CompressionConfig(rank=8))
    publish(root / f"{name}-store", serving)


def test_a_version_made_for_another_model_is_refused_and_the_old_one_serves(served, tmp_path):
    root, model = served
    serving = tmp_path / "serving"
    shutil.copytree(root / "serving", serving, symlinks=True)
    gen = torch.Generator().manual_seed(5)
    wide = {  # q_proj 48 × 48: not the tiny Llama's 64 × 64
        f"user{u}": {
            f"model.layers.{layer}.self_attn.q_proj": (
                torch.randn(4, 48, generator=gen),
                torch.randn(48, 4, generator=gen),
            )
            for layer in range(2)
        }
        for u in range(2)
    }
    misfits = [
        ("wide", wide, str(model), "adapter shape (48, 48), the base model's is (64, 64)"),
        ("deep", tiny_population(2, layers=4), str(model), "no such module"),
        ("other", tiny_population(2, layers=2), "someone/else", "made for base model"),
    ]
    with live(serving, model) as (url, engine):
        body = {"inputs": "To be", "parameters": {"adapter_id": "user01", "max_new_tokens": 5}}
        before = requests.post(f"{url}/generate", json=body, timeout=PATIENCE).json()
        for number, (name, users, base, words) in enumerate(misfits, start=2):
            publish_users(tmp_path, name, users, serving, base)
            version = f"v{number:04d}"
            wait_for(lambda v=version: v in engine.refused, f"{version} to be refused")
            assert words in engine.refused[version], engine.refused[version]
            assert requests.post(f"{url}/generate", json=body, timeout=PATIENCE).json() == before
            health = requests.get(f"{url}/health", timeout=PATIENCE).json()
            assert health["version"] == "v0001" and health["engine_alive"]
            assert version in health["refused_versions"]
        assert engine.swaps == []
        # A version that fits is still taken after the refusals.
        publish_users(tmp_path, "fits", tiny_population(3, layers=2, seed=2), serving, str(model))
        wait_for(lambda: engine.swaps, "the fitting version")
        assert engine.swaps[0][0] == "v0005" and engine.alive


def test_swap_refuses_a_misfit_at_once(served):
    root, model_dir = served
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    version = (root / "serving" / "current").resolve()
    engine = Engine(model, AutoTokenizer.from_pretrained(model_dir), load_shared(version))
    wrong = load_shared(version)
    wrong.base_model = "someone/else"
    with pytest.raises(VersionMisfit, match="made for base model 'someone/else'"):
        engine.swap(wrong)
    assert engine.pending_adapters is None and "v0001" in engine.refused


# ---------------------------------------------------------------------- the engine dies


def test_a_dead_engine_makes_health_503_and_requests_503(served, monkeypatch):
    root, model = served
    with live(root / "serving", model) as (url, engine):
        slow_steps(monkeypatch, engine)
        body = {"inputs": "To be", "parameters": {"max_new_tokens": 200}}
        result: list = []
        pending = threading.Thread(
            target=lambda: result.append(requests.post(f"{url}/generate", json=body, timeout=60))
        )
        pending.start()
        wait_for(lambda: engine.active, "a request in flight")

        def broken() -> list:
            raise RuntimeError("injected engine failure")

        monkeypatch.setattr(engine, "_admit", broken)
        pending.join(timeout=PATIENCE)
        assert_one_line_error(result[0], 503, "the engine stopped: RuntimeError: injected")
        health = requests.get(f"{url}/health", timeout=PATIENCE)
        assert_one_line_error(health, 503, "the engine stopped")
        assert health.json()["engine_alive"] is False and health.json()["version"] == "v0001"
        assert_one_line_error(post_raw(url, "/generate", json.dumps(body)), 503, "engine stopped")


SERVE = """
import sys
import torch
torch.set_num_threads(1)
if sys.argv[1] == "die":
    from soppu.server.serving.engine import Engine
    admit = Engine._admit
    def admit_then_die(self):
        if admitted := admit(self):
            raise RuntimeError("injected engine failure")
        return admitted
    Engine._admit = admit_then_die
from soppu.cli import app
app(["serve", *sys.argv[2:]])
"""


def start_serve(mode: str, served, port: int, *options: str) -> subprocess.Popen:
    root, model = served
    command = [sys.executable, "-c", SERVE, mode, str(root / "serving"), "--base-model"]
    command += [str(model), "--port", str(port), "--threads", "1", *options]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, process.stdout.read()
        try:
            return requests.get(f"{url}/health", timeout=5).ok
        except requests.ConnectionError:
            return False

    wait_for(up, "soppu serve to start")
    return process


def test_soppu_serve_exits_1_when_the_engine_dies_and_stops_on_sigterm(served):
    process = start_serve("die", served, port := free_port())
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 3}}
    reply = requests.post(f"http://127.0.0.1:{port}/generate", json=body, timeout=PATIENCE)
    assert_one_line_error(reply, 503, "the engine stopped: RuntimeError: injected")
    assert process.wait(timeout=PATIENCE) == 1
    assert "injected engine failure" in process.stdout.read()

    process = start_serve("live", served, port := free_port(), "--max-body-bytes", "2000")
    big = json.dumps({"inputs": "x" * 3000})
    reply = post_raw(f"http://127.0.0.1:{port}", "/generate", big)
    assert_one_line_error(reply, 413, "over the limit of 2,000 bytes")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=PATIENCE) in (0, -signal.SIGTERM)  # uvicorn re-raises it
