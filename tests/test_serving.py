"""Serving many users from the shared bases: exact against PEFT, through a real HTTP server."""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
import uvicorn
from helpers import (
    free_port,
    lorax_client,
    make_served,
    tiny_population,
    write_tiny_model,
    write_users,
)
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from soppu.compression.compress import CompressionConfig
from soppu.server.compress_store import compress_adapters
from soppu.server.publish import publish
from soppu.server.serving.engine import Engine, Request, Sampling
from soppu.server.serving.runner import build
from soppu.server.serving.shared_lora import batch_users
from soppu.server.serving.shared_weights import load_shared

USERS = ["user00", "user01", "user02", "user03"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny model and a serving dir whose version holds 4 users exactly (rank N·k)."""
    return make_served(tmp_path_factory.mktemp("serving"))


def peft_model(model_dir: Path, adapter: Path):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return PeftModel.from_pretrained(base, adapter).eval()


def test_batched_multi_user_logits_equal_each_users_peft_logits(served):
    root, model_dir = served
    version = root / "serving" / "current"
    adapters = load_shared(version)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = Engine(model, tokenizer, adapters)
    ids = torch.randint(0, 300, (5, 12), generator=torch.Generator().manual_seed(1))
    rows = torch.tensor([adapters.users[u] for u in USERS] + [0])  # the last row: base model
    with torch.no_grad(), batch_users(engine.layers, rows):
        batched = model(input_ids=ids).logits
    for i, user in enumerate(USERS):
        reference = peft_model(model_dir, version / "users" / user)
        with torch.no_grad():
            expected = reference(input_ids=ids[i : i + 1]).logits
        assert torch.allclose(batched[i : i + 1], expected, atol=1e-4), user
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(batched[4:], base(input_ids=ids[4:]).logits, atol=1e-5)


def test_rectangular_cores_publish_and_serve_exactly(tmp_path):
    """10 users of rank 4 span 40 directions; v_proj has 32 rows, so its cores are 32 × 40.
    Served from the shared bases and loaded by PEFT from the published dirs, every user
    gets their own adapter's logits."""
    model_dir = write_tiny_model(tmp_path / "model", layers=2)
    population = tiny_population(10, k=4, layers=2, shared=12)
    paths = write_users(
        tmp_path / "adapters", population, rank=4, alpha=8, base_model=str(model_dir)
    )
    manifest = compress_adapters(paths, tmp_path / "store", CompressionConfig(rank=40))
    ranks = {
        tuple(slot["ranks"])
        for slot in json.loads((tmp_path / "store" / "report" / "report.json").read_text())["slots"]
    }
    assert ranks == {(40, 40), (32, 40)} and manifest["totals"]["max"] <= 1e-5
    version = publish(tmp_path / "store", tmp_path / "serving")
    adapters = load_shared(version)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    engine = Engine(model, AutoTokenizer.from_pretrained(model_dir), adapters)
    users = ["user00", "user07"]
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(2))
    rows = torch.tensor([adapters.users[u] for u in users])
    with torch.no_grad(), batch_users(engine.layers, rows):
        batched = model(input_ids=ids).logits
    for i, user in enumerate(users):
        with torch.no_grad():
            own = peft_model(model_dir, paths[user])(input_ids=ids[i : i + 1]).logits
            published = peft_model(model_dir, version / "users" / user)(input_ids=ids[i : i + 1])
        assert torch.allclose(batched[i : i + 1], own, atol=1e-4), user
        assert torch.allclose(published.logits, own, atol=1e-4), user


def run_engine(engine: Engine, waves: list[list[tuple[list[int], str | None, int]]]):
    """Submit wave after wave, each once the previous one is decoding, so that rows join a
    running batch (its KV cache merged, left-padded) and leave it at different steps."""
    requests_, done = [], []
    for wave in waves:
        started = []
        for prompt, user, steps in wave:
            first, finished = threading.Event(), threading.Event()
            request = Request(
                prompt,
                user,
                Sampling(max_new_tokens=steps),
                lambda e, f=first, d=finished: f.set() if e is not None else d.set(),
            )
            requests_.append(request)
            done.append(finished)
            started.append(first)
            engine.submit(request)
        for event in started:
            assert event.wait(300)
    for event in done:
        assert event.wait(300)
    assert all(r.error is None for r in requests_), [r.error for r in requests_]
    return [r.tokens for r in requests_]


def test_greedy_generation_matches_peft_token_for_token(served):
    root, model_dir = served
    version = root / "serving" / "current"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = Engine(model, tokenizer, load_shared(version), max_wait=0.05).start()
    try:
        gen = torch.Generator().manual_seed(2)
        # Prompts of different lengths and lengths of output: rows join and leave the batch.
        waves = [
            [
                (torch.randint(3, 300, (n,), generator=gen).tolist(), user, steps)
                for n, user, steps in wave
            ]
            for wave in [
                [(5, "user00", 16), (3, None, 14)],  # short prompts first: the batch is
                [(9, "user01", 4), (7, "user02", 10)],  # narrower than the newcomers'
                [(11, "user03", 6), (4, "user00", 9)],
            ]
        ]
        jobs = [job for wave in waves for job in wave]
        outputs = run_engine(engine, waves)
        assert engine.merges >= 2  # rows really joined a running batch
    finally:
        engine.stop()
    for (prompt, user, steps), tokens in zip(jobs, outputs, strict=True):
        if user is None:
            reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        else:
            reference = peft_model(model_dir, version / "users" / user)
        with torch.no_grad():
            out = reference.generate(
                input_ids=torch.tensor([prompt]),
                max_new_tokens=steps,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                output_scores=True,
                return_dict_in_generate=True,
            )
        expected = out.sequences[0, len(prompt) :].tolist()
        assert [t.id for t in tokens] == expected[: len(tokens)], (user, steps)
        # Not only the same argmax: the same distribution at every step, to float precision.
        for step, token in enumerate(tokens):
            logprob = torch.log_softmax(out.scores[step][0].float(), -1)[token.id]
            assert token.logprob == pytest.approx(float(logprob), abs=1e-4), (user, step)
        if len(tokens) < steps:  # stopped early: only at the end-of-sequence token
            assert tokens[-1].id == engine.tokenizer.eos_token_id


@pytest.fixture(scope="module")
def server(served):
    """`soppu serve`'s app under uvicorn on loopback, started and stopped here."""
    root, model_dir = served
    serving = root / "serving-live"
    shutil.copytree(root / "serving", serving, symlinks=True)
    app, engine = build(serving, str(model_dir), max_wait=0.01, watch_interval=0.2)
    port = free_port()
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not instance.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield url, serving, engine
    instance.should_exit = True
    thread.join(timeout=120)
    assert not thread.is_alive()


def test_lorax_generate_and_details(server):
    url, serving, _ = server
    body = {
        "inputs": "To be, or not",
        "parameters": {"adapter_id": "user01", "max_new_tokens": 5, "details": True},
    }
    reply = requests.post(f"{url}/generate", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["details"]["finish_reason"] == "length"
    assert data["details"]["generated_tokens"] == 5 == len(data["details"]["tokens"])
    assert data["generated_text"] == "".join(t["text"] for t in data["details"]["tokens"])
    # The same request by the published adapter's path (adapter_source="local") is the same.
    path = serving / "current" / "users" / "user01"
    body["parameters"] |= {"adapter_id": str(path), "adapter_source": "local"}
    assert requests.post(f"{url}/generate", json=body, timeout=60).json() == data
    # Sampling: top_k=1 is greedy; a seed makes a sample repeatable.
    greedy = data["generated_text"]
    sample = {
        "inputs": "To be, or not",
        "parameters": {
            "adapter_id": "user01",
            "max_new_tokens": 5,
            "do_sample": True,
            "top_k": 1,
            "seed": 3,
        },
    }
    assert (
        requests.post(f"{url}/generate", json=sample, timeout=60).json()["generated_text"] == greedy
    )
    sample["parameters"] |= {"top_k": None, "temperature": 1.5, "seed": 5, "details": True}
    first, second = (
        requests.post(f"{url}/generate", json=sample, timeout=60).json() for _ in range(2)
    )
    assert first == second
    sampled = [t["id"] for t in first["details"]["tokens"]]
    assert sampled == seeded_reference(serving, "user01", "To be, or not", 5, 1.5, 5)
    other = {**sample, "parameters": {**sample["parameters"], "seed": 6}}
    again = requests.post(f"{url}/generate", json=other, timeout=60).json()
    assert [t["id"] for t in again["details"]["tokens"]] != sampled  # the seed decides
    # The base model, without an adapter, answers differently.
    del body["parameters"]["adapter_id"]
    assert requests.post(f"{url}/generate", json=body, timeout=60).json() != data


def seeded_reference(serving, user, prompt, steps, temperature, seed) -> list[int]:
    """Sampling by hand on the published adapter through PEFT: softmax(logits / T) drawn with
    torch.multinomial from a generator seeded `seed`, one token at a time."""
    version = serving / "current"
    model_dir = json.loads((version / "manifest.json").read_text())["base_model"]
    model = peft_model(Path(model_dir), version / "users" / user)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    generator, out = torch.Generator().manual_seed(seed), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids).logits[0, -1].double()
            probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def test_streams_match_the_whole_answer(server):
    url, _, _ = server
    body = {
        "inputs": "Whether tis nobler",
        "parameters": {"adapter_id": "user02", "max_new_tokens": 6},
    }
    whole = requests.post(f"{url}/generate", json=body, timeout=60).json()["generated_text"]
    events = []
    with requests.post(f"{url}/generate_stream", json=body, stream=True, timeout=60) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        for line in reply.iter_lines():
            if line.startswith(b"data:"):
                events.append(json.loads(line[5:]))
    assert len(events) == 6 and events[-1]["generated_text"] == whole
    assert "".join(e["token"]["text"] for e in events) == whole
    assert events[-1]["details"]["finish_reason"] == "length"

    chat = {
        "model": "user02",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 4,
        "temperature": 0,
    }
    answer = requests.post(f"{url}/v1/chat/completions", json=chat, timeout=60).json()
    assert answer["object"] == "chat.completion"
    assert answer["usage"]["completion_tokens"] == 4
    pieces = []
    with requests.post(
        f"{url}/v1/chat/completions", json={**chat, "stream": True}, stream=True, timeout=60
    ) as reply:
        for line in reply.iter_lines():
            if line.startswith(b"data:") and line != b"data: [DONE]":
                pieces.append(json.loads(line[5:])["choices"][0]["delta"]["content"])
    assert "".join(pieces) == answer["choices"][0]["message"]["content"]

    completion = requests.post(
        f"{url}/v1/completions",
        timeout=60,
        json={"model": "user02", "prompt": "Whether tis nobler", "max_tokens": 6, "temperature": 0},
    )
    assert completion.json()["choices"][0]["text"] == whole


def test_errors_are_clear_4xx(server):
    url, _, _ = server
    cases = [
        ({"inputs": "hi", "parameters": {"adapter_id": "mallory"}}, 404, "mallory"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": 0}}, 422, "max_new_tokens"),
        ({"inputs": "hi", "parameters": {"top_p": 1.5}}, 422, "top_p"),
        ({"inputs": "hi", "parameters": {"best_of": 2}}, 422, "best_of"),
        ({"inputs": "hi", "parameters": {"repetition_penalty": 1.3}}, 422, "repetition_penalty"),
        ({"inputs": "hi", "parameters": {"watermark": True}}, 422, "not supported"),
        ({"parameters": {}}, 422, "inputs"),
        ({"inputs": "word " * 400}, 422, "at most"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": 5000}}, 422, "exceed"),
    ]
    for body, status, words in cases:
        reply = requests.post(f"{url}/generate", json=body, timeout=60)
        assert reply.status_code == status, (body, reply.text)
        assert words in reply.json()["error"], reply.json()
    reply = requests.post(f"{url}/v1/completions", json={"model": "eve", "prompt": "x"}, timeout=60)
    assert reply.status_code == 404
    error = reply.json()["error"]  # OpenAI's shape on its routes, what its clients read
    assert "eve" in error["message"] and (error["type"], error["code"]) == ("not_found", 404)
    assert requests.get(f"{url}/health", timeout=60).status_code == 200
    info = requests.get(f"{url}/info", timeout=60).json()
    assert info["adapters"] == 4 and info["serving_version"] == "v0001"
    metrics = requests.get(f"{url}/metrics", timeout=60).text
    assert 'soppu_requests_total{route="/generate",status="404"}' in metrics
    assert "soppu_batch_size_bucket" in metrics


def test_lorax_client_from_pypi_works_unchanged(server, tmp_path):
    url, _, _ = server
    with lorax_client(tmp_path) as Client:
        client = Client(url, timeout=60)
        response = client.generate("To be, or not", adapter_id="user01", max_new_tokens=5)
        assert response.details.finish_reason == "length"
        direct = requests.post(
            f"{url}/generate",
            timeout=60,
            json={
                "inputs": "To be, or not",
                "parameters": {"adapter_id": "user01", "max_new_tokens": 5},
            },
        ).json()
        assert response.generated_text == direct["generated_text"]
        streamed = [
            r.token.text
            for r in client.generate_stream("To be, or not", adapter_id="user01", max_new_tokens=5)
        ]
        assert "".join(streamed) == direct["generated_text"]


def test_a_new_version_is_picked_up_under_load_without_losing_requests(server, served, monkeypatch):
    url, serving, engine = server
    root, _ = served
    # v0002 from a store holding only three of the users, compressed before the load starts,
    # and every step slowed a little: the swap lands while requests are decoding however
    # loaded the machine is (the requests take seconds; publishing and the watcher, a blink).
    keep = {u: root / "adapters" / u for u in USERS[1:]}
    compress_adapters(keep, root / "store-3", CompressionConfig(rank=12))
    forward = engine._forward

    def slowed(*args, **kwargs):
        time.sleep(0.01)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine, "_forward", slowed)
    body = {"inputs": "To be", "parameters": {"adapter_id": "user03", "max_new_tokens": 120}}

    def ask(_: int) -> int:
        return requests.post(f"{url}/generate", json=body, timeout=600).status_code

    with ThreadPoolExecutor(16) as pool:
        pending = [pool.submit(ask, i) for i in range(48)]
        deadline = time.monotonic() + 120
        while not engine.active:  # publish only once requests are being decoded
            assert time.monotonic() < deadline
            time.sleep(0.01)
        publish(root / "store-3", serving)
        statuses = [f.result() for f in pending]
    assert statuses == [200] * 48
    assert [v for v, _ in engine.swaps] == ["v0002"]
    assert engine.swaps[0][1] > 0, "the swap found no request in flight"
    gone = requests.post(
        f"{url}/generate", timeout=60, json={"inputs": "hi", "parameters": {"adapter_id": "user00"}}
    )
    assert gone.status_code == 404  # user00 is not in v0002


def peft_prompt_logprobs(serving: Path, user: str | None, prompt: str) -> torch.Tensor:
    """Each prompt token's logprob after those before it, by PEFT on the published dir (or the
    base model), by hand: log_softmax of the logits, gathered at the next token."""
    version = serving / "current"
    model_dir = Path(json.loads((version / "manifest.json").read_text())["base_model"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if user is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    else:
        model = peft_model(model_dir, version / "users" / user)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    return logprobs.gather(1, ids[0, 1:, None])[:, 0]


def test_prompt_logprobs_score_text_as_peft_does(server):
    """OpenAI's echo + logprobs + max_tokens 0 and LoRAX's decoder_input_details give each
    prompt token's logprob under the user's adapter: PEFT's, from a batch of other rows."""
    url, serving, _ = server
    prompt = "Whether tis nobler in the mind to suffer"
    expected = peft_prompt_logprobs(serving, "user02", prompt)
    body = {"model": "user02", "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0}
    with ThreadPoolExecutor(3) as pool:  # scored beside generations of other users
        others = [
            pool.submit(
                requests.post,
                f"{url}/v1/completions",
                json={"model": u, "prompt": "To be", "max_tokens": 8, "temperature": 0},
                timeout=60,
            )
            for u in ("user01", "")  # users of every version this module serves
        ]
        reply = requests.post(f"{url}/v1/completions", json=body, timeout=60)
        assert all(o.result().status_code == 200 for o in others)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["text"] == prompt and reply.json()["usage"]["completion_tokens"] == 0
    scores = choice["logprobs"]["token_logprobs"]
    assert scores[0] is None and len(scores) == len(expected) + 1
    assert torch.allclose(torch.tensor(scores[1:], dtype=torch.float64), expected, atol=1e-4)
    assert "".join(choice["logprobs"]["tokens"]) == prompt
    # Alternatives: the two likeliest tokens at each position, the scored token no likelier.
    top = requests.post(f"{url}/v1/completions", json={**body, "logprobs": 2}, timeout=60)
    alternatives = top.json()["choices"][0]["logprobs"]["top_logprobs"]
    assert alternatives[0] is None and all(len(a) == 2 for a in alternatives[1:])
    assert all(
        max(a.values()) >= s - 1e-9 for a, s in zip(alternatives[1:], scores[1:], strict=True)
    )
    # The base model scores the same text otherwise.
    base = requests.post(f"{url}/v1/completions", json={**body, "model": ""}, timeout=60)
    base_scores = base.json()["choices"][0]["logprobs"]["token_logprobs"][1:]
    expected_base = peft_prompt_logprobs(serving, None, prompt)
    assert torch.allclose(torch.tensor(base_scores, dtype=torch.float64), expected_base, atol=1e-4)
    assert not torch.allclose(expected_base, expected, atol=1e-3)
    # LoRAX: details.prefill, as TGI gives it.
    lorax = {
        "inputs": prompt,
        "parameters": {
            "adapter_id": "user02",
            "max_new_tokens": 1,
            "details": True,
            "decoder_input_details": True,
        },
    }
    prefill = requests.post(f"{url}/generate", json=lorax, timeout=60).json()["details"]["prefill"]
    assert prefill[0]["logprob"] is None
    assert [p["logprob"] for p in prefill[1:]] == scores[1:]
    # What cannot be answered is refused by name.
    for bad, words in [
        ({**body, "echo": False}, "max_tokens 0"),
        ({**body, "stream": True}, "stream"),
        ({**body, "logprobs": 6}, "logprobs"),
    ]:
        refused = requests.post(f"{url}/v1/completions", json=bad, timeout=60)
        assert refused.status_code == 422, refused.text
        assert words in refused.json()["error"]["message"], refused.text
    chat = {"model": "user02", "messages": [{"role": "user", "content": "hi"}], "logprobs": 1}
    refused = requests.post(f"{url}/v1/chat/completions", json=chat, timeout=60)
    assert refused.status_code == 422
    assert "/v1/completions" in refused.json()["error"]["message"]


def test_a_clients_repair_teacher_reads_the_full_models_answer_from_the_live_api(server):
    """What a node repairs its emulator towards, asked of `soppu serve` (echo, logprobs 5,
    vLLM's return_tokens_as_token_ids): the base model's ids, its 5 likeliest tokens and the
    text's logprobs, as the full model in the node's own process computes them."""
    from soppu.teachers.api import ApiTeacher
    from soppu.teachers.local import LocalTeacher

    url, serving, _ = server
    model_dir = json.loads((serving / "current" / "manifest.json").read_text())["base_model"]
    texts = ["Whether tis nobler in the mind to suffer", "The slings and arrows"]
    asked = ApiTeacher(url).answer(texts)  # the base model's id from /info
    local = LocalTeacher(model_dir).answer(texts)
    assert len(asked) == len(local) == 2
    for a, b in zip(asked, local, strict=True):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.top_ids, b.top_ids)
        assert torch.allclose(a.top_logprobs, b.top_logprobs, atol=1e-4)
        assert torch.allclose(a.token_logprobs, b.token_logprobs, atol=1e-4)
    body = {"prompt": texts[1], "max_tokens": 0, "echo": True, "logprobs": 2}
    plain = requests.post(f"{url}/v1/completions", json=body, timeout=60).json()
    assert "".join(plain["choices"][0]["logprobs"]["tokens"]) == texts[1]  # unchanged unasked


def test_soppu_score_compares_a_users_adapter_with_the_base_on_their_text(server, tmp_path):
    """`soppu score` on the live server: each block scored by the route above, the perplexity
    PEFT's on those blocks, the gain with its interval, and advice by the served-choice rule."""
    from typer.testing import CliRunner

    from soppu.cli import app
    from soppu.server.serving.scoring import blocks_of

    url, serving, _ = server
    text = " ".join(["Whether tis nobler in the mind to suffer the slings and arrows"] * 12)
    (tmp_path / "mine.txt").write_text(text)
    result = CliRunner().invoke(
        app,
        ["score", url, str(tmp_path / "mine.txt"), "--model", "user03", "--block-chars", "150"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    blocks = blocks_of(text, 150)
    assert len(blocks) >= 5 and "".join(blocks) == text
    for user in (None, "user03"):
        scores = torch.cat([peft_prompt_logprobs(serving, user, b) for b in blocks])
        perplexity = float(torch.exp(-scores.mean()))
        assert f"{perplexity:.2f}" in result.output, (user, perplexity, result.output)
    assert "use:" in result.output and "[95%]" in result.output
    missing = CliRunner().invoke(
        app,
        ["score", url, str(tmp_path / "mine.txt"), "--model", "mallory", "--block-chars", "150"],
    )
    assert missing.exit_code == 2 and "mallory" in missing.output and "404" in missing.output
