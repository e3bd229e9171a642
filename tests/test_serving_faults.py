"""`soppu serve` isolates faults: a bad request, a failing row, a client that leaves costs
that request and no more (adapter paths, health, versions that do not fit and a dead
engine: test_serving_lifecycle.py).

Timing is never raced: where speed matters the engine is slowed (a sleep per step) and the
assertions count tokens or allow minutes, so a loaded 2-core machine passes them too."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests
import torch
import uvicorn
from helpers import free_port, make_served
from transformers import AutoModelForCausalLM, AutoTokenizer

from soppu.server.serving import sampling
from soppu.server.serving.engine import Engine, Request, Sampling
from soppu.server.serving.runner import build
from soppu.server.serving.shared_weights import load_shared

PATIENCE = 120  # seconds: what "soon" may take on a loaded machine; never reached if it works


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[Path, Path]:
    return make_served(tmp_path_factory.mktemp("faults"))


@contextmanager
def live(serving: Path, model: Path, **options) -> Iterator[tuple[str, Engine]]:
    """`soppu serve`'s app (`build`'s `options`) under uvicorn on loopback, in a thread."""
    app, engine = build(serving, str(model), max_wait=0.01, watch_interval=0.2, **options)
    instance = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="critical")
    )
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    wait_for(lambda: instance.started, "the server to start")
    try:
        yield f"http://127.0.0.1:{instance.config.port}", engine
    finally:
        instance.should_exit = True
        thread.join(timeout=PATIENCE)


def live_server(served, tmp_path_factory):
    """A copy of the module's `served` serving dir, served live (a module-scoped fixture)."""
    root, model = served
    serving = tmp_path_factory.mktemp("live") / "serving"
    shutil.copytree(root / "serving", serving, symlinks=True)
    with live(serving, model) as (url, engine):
        yield url, serving, engine


server = pytest.fixture(scope="module", name="server")(live_server)


def wait_for(condition, what: str, timeout: float = PATIENCE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.02)


def slow_steps(monkeypatch, engine: Engine, seconds: float = 0.02) -> None:
    """Every model step takes at least `seconds`, so a long generation really is long."""
    forward = engine._forward

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine, "_forward", slow)


def finished_requests(monkeypatch, engine: Engine) -> list[Request]:
    """Every request the engine ends from now on, in order."""
    ended: list[Request] = []
    previous = engine.on_finish
    monkeypatch.setattr(engine, "on_finish", lambda r: (ended.append(r), previous(r)))
    return ended


def post_raw(url: str, path: str, raw: str) -> requests.Response:
    headers = {"content-type": "application/json"}
    return requests.post(f"{url}{path}", data=raw, headers=headers, timeout=PATIENCE)


def error_message(reply: requests.Response) -> str:
    """The error's message in the shape its route's clients expect: OpenAI's on /v1/…
    ({"error": {"message", "type", "param", "code"}}), LoRAX's elsewhere."""
    error = reply.json()["error"]
    if urlparse(reply.url).path.startswith("/v1/"):
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["code"] == reply.status_code
        return error["message"]
    assert isinstance(error, str) and "error_type" in reply.json(), reply.json()
    return error


def assert_one_line_error(reply: requests.Response, status: int, words: str) -> None:
    assert reply.status_code == status, reply.text
    error = error_message(reply)
    assert words in error and "\n" not in error and "Traceback" not in reply.text, error


# ---------------------------------------------------------------------- parameters


def test_degenerate_parameters_are_refused_with_one_line_each(server):
    url, _, engine = server
    lorax = [
        ('{"do_sample": true, "temperature": 1e309}', "temperature"),  # parses as inf
        ('{"do_sample": true, "temperature": NaN}', "temperature"),
        ('{"temperature": 0}', "temperature"),
        ('{"temperature": -1}', "temperature"),
        ('{"seed": 18446744073709551616}', "seed"),  # 2**64
        ('{"seed": -1}', "seed"),
        ('{"top_p": 0}', "top_p"),
        ('{"top_p": 1.5}', "top_p"),
        ('{"top_p": Infinity}', "top_p"),
        ('{"top_k": 0}', "top_k"),
        ('{"max_new_tokens": 0}', "max_new_tokens"),
        ('{"max_new_tokens": 100000000000000000000000}', "exceed"),
        (json.dumps({"stop": ["x"] * 17}), "stop"),
    ]
    for parameters, words in lorax:
        raw = f'{{"inputs": "hi", "parameters": {parameters}}}'
        for path in ("/generate", "/generate_stream"):
            assert_one_line_error(post_raw(url, path, raw), 422, words)
    openai = [
        ('"temperature": 1e309', "temperature"),
        ('"temperature": -0.5', "temperature"),
        ('"top_p": 0', "top_p"),
        ('"seed": 18446744073709551616', "seed"),
        ('"max_tokens": 0', "max_tokens"),
    ]
    for field, words in openai:
        assert_one_line_error(
            post_raw(url, "/v1/completions", f'{{"prompt": "hi", {field}}}'), 422, words
        )
        chat = f'{{"messages": [{{"role": "user", "content": "hi"}}], {field}}}'
        assert_one_line_error(post_raw(url, "/v1/chat/completions", chat), 422, words)
    assert_one_line_error(post_raw(url, "/generate", '{"inputs": '), 422, "JSON")
    lone_surrogate = '{"inputs": "hi \\ud800"}'  # valid JSON, not text a tokenizer takes
    assert_one_line_error(post_raw(url, "/generate", lone_surrogate), 422, "tokenised")
    assert_one_line_error(
        post_raw(url, "/v1/chat/completions", '{"messages": []}'), 422, "messages"
    )
    assert engine.alive


def test_the_largest_seed_and_tiny_temperatures_work_beside_other_rows(server):
    """A temperature of 1e-45 (or the smallest float) is greedy in effect, not NaN for the
    batch; seed 2**64-1 is torch's largest."""
    url, _, _ = server
    greedy = {"inputs": "To be", "parameters": {"adapter_id": "user02", "max_new_tokens": 8}}
    expected = requests.post(f"{url}/generate", json=greedy, timeout=PATIENCE).json()
    bodies = [greedy] * 3 + [
        {**greedy, "parameters": {**greedy["parameters"], **extra}}
        for extra in (
            {"do_sample": True, "temperature": 1e-45},
            {"do_sample": True, "temperature": 5e-324, "seed": 2**64 - 1},
            {"do_sample": True, "temperature": 1e-300, "top_p": 0.5, "top_k": 3},
        )
    ]
    replies = in_parallel(
        lambda b: requests.post(f"{url}/generate", json=b, timeout=PATIENCE), bodies
    )
    assert [r.status_code for r in replies] == [200] * len(bodies), [r.text for r in replies]
    assert all(r.json() == expected for r in replies)


def test_sampling_is_finite_at_any_positive_temperature():
    logits = torch.tensor([1.0, 3.0, 2.0, float("-inf")])
    for temperature in (1e-45, 5e-324, 1e-3, 1.0, 1e300):
        for top_p in (1.0, 0.3):
            rule = Sampling(do_sample=True, temperature=temperature, top_p=top_p)
            token = sampling.choose(logits, rule, torch.Generator().manual_seed(0))
            assert 0 <= token < 3, (temperature, top_p)
    assert sampling.choose(logits, Sampling(do_sample=True, temperature=1e-45), None) == 1


def in_parallel(call, items: list) -> list:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(call, items))


# ---------------------------------------------------------------------- a failing row


def engine_batch(engine: Engine, jobs: list[tuple[str | None, Sampling]]) -> list[Request]:
    """Submit every job at once (one batch, the engine waits for company) and wait."""
    done = [threading.Event() for _ in jobs]
    requests_ = [
        Request([5, 9, 14, 3], user, rule, lambda e, d=d: d.set() if e is None else None)
        for (user, rule), d in zip(jobs, done, strict=True)
    ]
    for request in requests_:
        engine.submit(request)
    for event in done:
        assert event.wait(PATIENCE)
    return requests_


@pytest.fixture
def engine(served) -> Iterator[Engine]:
    root, model_dir = served
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    adapters = load_shared(root / "serving" / "current")
    engine = Engine(model, tokenizer, adapters, max_wait=2.0).start()  # waits for company
    yield engine
    engine.stop()


def test_a_row_whose_sampling_raises_or_logits_are_nan_fails_alone(engine, monkeypatch):
    jobs = [
        ("user00", Sampling(max_new_tokens=12)),
        ("user01", Sampling(max_new_tokens=12, do_sample=True, seed=13)),  # sampling raises
        (None, Sampling(max_new_tokens=12, seed=99)),  # its logits turn NaN
        ("user02", Sampling(max_new_tokens=12)),
        ("user03", Sampling(max_new_tokens=12, do_sample=True, seed=4)),
    ]
    clean = engine_batch(engine, jobs)
    assert all(r.error is None for r in clean)

    choose = sampling.choose

    def choose_or_fail(logits, rule, generator):
        if rule.seed == 13:
            raise RuntimeError("injected sampling failure\nsecond line")
        return choose(logits, rule, generator)

    emit = engine._emit

    def emit_with_nan(batch, logits):
        for i, request in enumerate(batch):
            if request.sampling.seed == 99 and len(request.tokens) == 3:
                logits[i] = float("nan")
        return emit(batch, logits)

    monkeypatch.setattr(sampling, "choose", choose_or_fail)
    monkeypatch.setattr(engine, "_emit", emit_with_nan)
    steps: list[int] = []
    monkeypatch.setattr(engine, "on_step", lambda rows, seconds: steps.append(rows))
    faulty = engine_batch(engine, jobs)
    assert max(steps) == len(jobs)  # they really shared a batch
    raised, nan = faulty[1], faulty[2]
    assert raised.finish_reason == "error" and len(raised.tokens) == 0
    assert raised.error == "generation failed: RuntimeError: injected sampling failure"
    assert nan.finish_reason == "error" and len(nan.tokens) == 3 and "not finite" in nan.error
    for i in (0, 3, 4):  # the others: as if nothing had happened
        assert faulty[i].error is None and faulty[i].finish_reason == "length"
        assert [t.id for t in faulty[i].tokens] == [t.id for t in clean[i].tokens]
    wait_for(lambda: not engine.active, "the finished rows to leave")
    assert engine.alive


def test_over_http_the_failing_request_gets_an_error_and_the_others_their_answers(
    server, monkeypatch
):
    url, _, engine = server
    slow_steps(monkeypatch, engine, 0.01)  # the requests overlap in the batch
    choose = sampling.choose

    def choose_or_fail(logits, rule, generator):
        if rule.seed == 13:
            raise RuntimeError("injected")
        return choose(logits, rule, generator)

    def body(seed: int | None, stream: bool = False) -> dict:
        parameters = {"adapter_id": "user01", "max_new_tokens": 10, "seed": seed}
        return {"inputs": "To be", "parameters": parameters, "stream": stream}

    expected = requests.post(f"{url}/", json=body(1), timeout=PATIENCE).json()
    monkeypatch.setattr(sampling, "choose", choose_or_fail)
    jobs = [body(1), body(13), body(2), body(13, stream=True), body(3)]
    replies = in_parallel(lambda b: requests.post(f"{url}/", json=b, timeout=PATIENCE), jobs)
    assert_one_line_error(replies[1], 500, "generation failed: RuntimeError: injected")
    events = [json.loads(line[5:]) for line in replies[3].iter_lines() if line]
    assert events == [
        {"error": "generation failed: RuntimeError: injected", "error_type": "generation"}
    ]
    for i in (0, 2, 4):
        assert replies[i].status_code == 200 and replies[i].json() == expected
    assert engine.alive


# ---------------------------------------------------------------------- bodies


def test_a_body_over_the_limit_is_refused_unread_and_others_go_on(server):
    url, _, _ = server
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) as sock:
        head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall(head + b"Content-Length: 10000000\r\n\r\n{")  # and not a byte more
        answer = sock.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 413") and "over the limit of 1,048,576 bytes" in answer
    big = json.dumps({"inputs": "word " * 2_000_000})  # 10 MB
    assert_one_line_error(post_raw(url, "/generate", big), 413, "over the limit")
    chunks = (b" " * 100_000 for _ in range(30))  # chunked: no Content-Length to go by
    reply = requests.post(
        f"{url}/generate", data=chunks, headers={"content-type": "application/json"}, timeout=60
    )
    assert_one_line_error(reply, 413, "over the limit")
    assert requests.get(f"{url}/health", timeout=PATIENCE).status_code == 200


def test_a_long_prompt_is_tokenised_without_stalling_other_requests(server):
    """Just under the body limit, ~0.8 M tokens: seconds of tokenising, off the event loop."""
    url, _, _ = server
    body = {"inputs": "word " * 200_000}
    result: dict = {}

    def big() -> None:
        began = time.perf_counter()
        result["reply"] = requests.post(f"{url}/generate", json=body, timeout=PATIENCE)
        result["seconds"] = time.perf_counter() - began

    thread = threading.Thread(target=big)
    thread.start()
    slowest = 0.0
    while thread.is_alive():
        began = time.perf_counter()
        assert requests.get(f"{url}/health", timeout=PATIENCE).status_code == 200
        slowest = max(slowest, time.perf_counter() - began)
        time.sleep(0.05)
    thread.join()
    assert_one_line_error(result["reply"], 422, "at most")
    if result["seconds"] > 1.0:  # tokenising took long enough to tell
        assert slowest < result["seconds"] / 2, (slowest, result["seconds"])


# ---------------------------------------------------------------------- clients that leave


def test_a_closed_stream_leaves_the_batch_at_once(server, monkeypatch):
    url, _, engine = server
    slow_steps(monkeypatch, engine)
    ended = finished_requests(monkeypatch, engine)
    for path, body in [
        ("/generate_stream", {"inputs": "To be", "parameters": {"max_new_tokens": 200}}),
        ("/v1/completions", {"prompt": "To be", "max_tokens": 200, "stream": True}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "stream": True},
        ),
    ]:
        ended.clear()
        with requests.post(f"{url}{path}", json=body, stream=True, timeout=PATIENCE) as reply:
            lines = reply.iter_lines()
            assert [next(lines) for _ in range(3)]  # two events and the blank line between
        wait_for(lambda: ended, f"{path}'s request to end")
        assert ended[0].finish_reason == "cancelled"
        assert len(ended[0].tokens) < 100, "it ran on after its client left"
        wait_for(lambda: not engine.active, "an empty batch")


def test_a_client_that_stops_waiting_cancels_its_request(server, monkeypatch):
    url, _, engine = server
    slow_steps(monkeypatch, engine)
    ended = finished_requests(monkeypatch, engine)
    body = {"inputs": "To be", "parameters": {"max_new_tokens": 200}}
    with pytest.raises(requests.Timeout):
        requests.post(f"{url}/generate", json=body, timeout=1.0)
    wait_for(lambda: ended, "the request to end")
    assert ended[0].finish_reason == "cancelled" and len(ended[0].tokens) < 150
    wait_for(lambda: not engine.active, "an empty batch")
    metrics = requests.get(f"{url}/metrics", timeout=PATIENCE).text
    assert 'soppu_requests_total{route="/generate",status="499"}' in metrics
    assert 'soppu_generations_total{reason="cancelled"}' in metrics


def test_a_version_whose_files_changed_is_never_served(served, tmp_path):
    """An inf injected into a published user's PEFT file (which LoRAX or PEFT would load)
    fails the manifest's checksum: `soppu serve` refuses to start on it, `soppu inspect` says
    it is not servable, and hot-swapped in under a running server it is refused, shown in
    /health, while the old version keeps serving."""
    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from soppu.cli import app
    from soppu.server.publish import publish
    from soppu.server.serving.runner import build as build_app

    root, model = served
    serving = tmp_path / "serving"
    shutil.copytree(root / "serving", serving, symlinks=True)

    def poison(version: Path) -> None:
        path = version / "users" / "user01" / "adapter_model.safetensors"
        state = load_file(path)
        key = next(iter(state))
        state[key][0, 0] = float("inf")
        save_file(state, path)

    with live(serving, model) as (url, engine):
        new = publish(root / "store", serving)  # v0002, then corrupted before the swap
        poison(new)
        wait_for(lambda: new.name in engine.refused, "the corrupt version to be refused")
        health = requests.get(f"{url}/health", timeout=60).json()
        assert health["version"] == "v0001" and "checksum" in health["refused_versions"]["v0002"]
        body = {"inputs": "hi", "parameters": {"adapter_id": "user01", "max_new_tokens": 2}}
        assert requests.post(f"{url}/generate", json=body, timeout=60).status_code == 200
    described = CliRunner().invoke(app, ["inspect", str(new)])
    assert "NOT SERVABLE" in described.output and "checksum" in described.output
    with pytest.raises(Exception, match="checksum mismatch"):
        build_app(serving, str(model))


def test_a_prompt_too_long_to_fit_is_refused_before_it_is_tokenised(server, monkeypatch):
    """Past the input limit × the vocabulary's longest token in bytes, a prompt cannot fit
    however it tokenises: refused from its length, the tokenizer never called; a prompt just
    under that bound is still tokenised and answered by its token count."""
    url, _, engine = server
    calls = []
    original = engine.tokenizer.__class__.__call__

    def counting(self, *args, **kwargs):
        calls.append(len(args[0]) if args else 0)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(engine.tokenizer.__class__, "__call__", counting)
    reply = requests.post(f"{url}/generate", json={"inputs": "x" * 900_000}, timeout=PATIENCE)
    assert_one_line_error(reply, 422, "bytes")
    assert calls == []
    bound = int(error_message(reply).split("at most ")[1].split(" bytes")[0].replace(",", ""))
    under = requests.post(f"{url}/generate", json={"inputs": "x" * bound}, timeout=PATIENCE)
    assert under.status_code == 422 and "tokens; at most" in error_message(under)
    assert calls == [bound]
