"""Serving many users: the shared-basis engine against the base model and against PEFT.

    python -m experiments.bench_serving                  # the benchmarks' numbers
    python -m experiments.bench_serving --quick          # 8 users, 4 tokens

On the embedded default (SmolLM2-135M-Instruct): 64 users' synthetic rank-8 adapters on q/v
of all 30 layers (`soppu synth`'s realistic population), compressed at shared rank 32 and
published. With one request per user in flight (prompts of 16–48 tokens, --tokens new tokens
each, greedy, end-of-sequence ignored on every side so that each row really generates --tokens
tokens), measures generated tokens per second, from the tokens each side really generated, for:

- soppu: the continuous-batching engine, every row its own user (U, V once, Σ_i per row);
- base: the bare base model (no adapter layers) in the same engine and batching: the ceiling;
- PEFT, switching: one request at a time, `set_adapter(user)` then `generate`;
- PEFT, mixed batch: one `generate(..., adapter_names=[...])` over all requests (PEFT's
  mixed-adapter batch inference; left-padded).

Also the memory of 1,000 users' cores beside 1,000 PEFT adapters (same slots, float32), and
a load test: --clients concurrent HTTP clients against `soppu serve`'s app on 127.0.0.1 for
--requests requests, errors, latency percentiles and tokens per second (from each answer's
`details.generated_tokens`). Writes serving_bench.{json,md} to --out (default
experiments/results; `--quick` writes serving_bench_quick.*).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from experiments.lib import RESULTS, provenance
from soppu import atomic


def build_serving(root: Path, users: int, rank: int) -> Path:
    from soppu.adapter_sets import discover
    from soppu.compression.compress import CompressionConfig
    from soppu.server.compression_round import compress_and_publish
    from soppu.synthetic import PopulationSpec, write_population

    write_population(PopulationSpec(users, 30), root / "adapters")
    paths = discover([root / "adapters"])
    compress_and_publish(paths, root / "store", root / "serving", CompressionConfig(rank=rank))
    return root / "serving" / "current"


def prompts(tokenizer, count: int, seed: int = 0) -> list[list[int]]:
    from soppu.data import public_text

    words = " ".join(public_text()[:400]).split()
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        start = rng.randrange(len(words) - 60)
        ids = tokenizer(" ".join(words[start : start + 60]), add_special_tokens=False)["input_ids"]
        out.append(ids[: rng.randint(16, 48)])
    return out


Timed = tuple[float, int]  # (seconds, tokens really generated)


def run_engine(engine, jobs, tokens: int) -> Timed:
    """Every job at once; EOS ignored, as PEFT's min_new_tokens does on the other side."""
    from soppu.server.serving.engine import Request, Sampling

    done = [threading.Event() for _ in jobs]
    requests = [
        Request(
            prompt,
            user,
            Sampling(max_new_tokens=tokens, ignore_eos=True),
            lambda e, ev=event: ev.set() if e is None else None,
        )
        for (prompt, user), event in zip(jobs, done, strict=True)
    ]
    began = time.perf_counter()
    for request in requests:
        engine.submit(request)
    for event in done:
        event.wait()
    seconds = time.perf_counter() - began
    failed = [r.error for r in requests if r.error]
    assert not failed, failed
    return seconds, sum(len(r.tokens) for r in requests)


def peft_switching(model, jobs, tokens: int, pad: int) -> Timed:
    generated = 0
    began = time.perf_counter()
    for prompt, user in jobs:
        model.set_adapter(user)
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        generated += out.shape[1] - len(prompt)
    return time.perf_counter() - began, generated


def peft_mixed(model, jobs, tokens: int, pad: int) -> Timed:
    from soppu.server.serving.engine import left_padded

    ids, mask = left_padded([p for p, _ in jobs], pad)
    began = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=tokens,
        min_new_tokens=tokens,  # no row stops early: each generates exactly `tokens`
        do_sample=False,
        pad_token_id=pad,
        adapter_names=[u for _, u in jobs],
    )
    return time.perf_counter() - began, len(jobs) * (out.shape[1] - ids.shape[1])


def memory(version: Path, users: int, lora_rank: int = 8) -> dict:
    manifest = json.loads((version / "shared" / "manifest.json").read_text())
    cores = adapters = 0
    for slot in manifest["slots"]:
        m, n = slot["shape"]
        r = slot["rank"]
        cores += (m + n) * r + users * r * r
        adapters += users * lora_rank * (m + n)
    return {
        "users": users,
        "soppu_bytes": 4 * cores,
        "peft_bytes": 4 * adapters,
        "ratio": adapters / cores,
    }


def load_test(version_root: Path, clients: int, count: int, tokens: int, users: list[str]):
    import requests
    import uvicorn

    from soppu.server.serving.runner import build

    app, _ = build(version_root, max_wait=0.01)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/generate"

    def one(i: int) -> tuple[int, float, int]:
        parameters = {
            "adapter_id": users[i % len(users)],
            "max_new_tokens": tokens,
            "ignore_eos_token": True,
            "details": True,
        }
        body = {"inputs": "Now is the winter of our discontent", "parameters": parameters}
        began = time.perf_counter()
        try:
            reply = requests.post(url, json=body, timeout=600)
            status = reply.status_code
            generated = reply.json()["details"]["generated_tokens"] if reply.ok else 0
        except requests.RequestException:
            status, generated = 0, 0
        return status, time.perf_counter() - began, generated

    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(count)))
    wall = time.perf_counter() - began
    server.should_exit = True
    thread.join(timeout=60)
    latencies = sorted(t for _, t, _ in results)
    generated = sum(g for _, _, g in results)
    return {
        "clients": clients,
        "requests": count,
        "errors": sum(s != 200 for s, _, _ in results),
        "p50_s": latencies[len(latencies) // 2],
        "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "wall_s": wall,
        "generated_tokens": generated,
        "tokens_per_s": generated / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the results go")
    args = parser.parse_args()
    name = "serving_bench"
    if args.quick:
        args.users, args.tokens, args.clients, args.requests = 8, 4, 10, 20
        name = "serving_bench_quick"  # never over the benchmarks' numbers
    torch.set_num_threads(args.threads)

    from peft import PeftModel

    from soppu import basemodel
    from soppu.server.serving.engine import Engine
    from soppu.server.serving.shared_weights import SharedAdapters, load_shared

    root = Path(tempfile.mkdtemp(prefix="soppu-serving-bench-"))
    version = build_serving(root, args.users, args.rank)
    adapters = load_shared(version)
    users = sorted(adapters.users)
    base = basemodel.load()
    jobs_prompts = prompts(base.tokenizer, args.users)
    pad = base.tokenizer.pad_token_id
    rows = {}

    engine = Engine(base.model, base.tokenizer, adapters, max_batch=args.users).start()
    run_engine(engine, [(jobs_prompts[0], users[0])], 2)  # warm-up
    user_jobs = list(zip(jobs_prompts, users, strict=True))
    rows["soppu"] = run_engine(engine, user_jobs, args.tokens)
    engine.stop()
    # The ceiling: the bare base model (no adapter layers at all) in the same engine.
    bare = Engine(
        basemodel.load().model, base.tokenizer, SharedAdapters("base", {}, {}), max_batch=args.users
    ).start()
    run_engine(bare, [(jobs_prompts[0], None)], 2)
    rows["base"] = run_engine(bare, [(p, None) for p in jobs_prompts], args.tokens)
    bare.stop()
    print({k: f"{v[0]:.1f} s" for k, v in rows.items()}, flush=True)

    plain = basemodel.load().model
    peft = PeftModel.from_pretrained(
        plain, str(version / "users" / users[0]), adapter_name=users[0]
    )
    for user in users[1:]:
        peft.load_adapter(str(version / "users" / user), adapter_name=user)
    peft.eval()
    with torch.no_grad():
        rows["peft_switching"] = peft_switching(peft, user_jobs, args.tokens, pad)
        rows["peft_mixed_batch"] = peft_mixed(peft, user_jobs, args.tokens, pad)
    print({k: f"{v[0]:.1f} s" for k, v in rows.items()}, flush=True)

    throughput = {k: generated / seconds for k, (seconds, generated) in rows.items()}
    result = {
        **provenance("bench_serving"),
        "users": args.users,
        "tokens_each": args.tokens,
        "shared_rank": args.rank,
        "threads": args.threads,
        "seconds": {k: seconds for k, (seconds, _) in rows.items()},
        "generated_tokens": {k: generated for k, (_, generated) in rows.items()},
        "tokens_per_s": throughput,
        "vs_base": throughput["soppu"] / throughput["base"],
        "vs_peft_switching": throughput["soppu"] / throughput["peft_switching"],
        "vs_peft_mixed_batch": throughput["soppu"] / throughput["peft_mixed_batch"],
        "memory_1000_users": memory(version, 1000),
        "load_test": load_test(version.parent, args.clients, args.requests, args.tokens, users),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(args.out / f"{name}.json", json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    atomic.write_text(args.out / f"{name}.md", text)
    print(text)


def markdown(r: dict) -> str:
    t = r["tokens_per_s"]
    mem = r["memory_1000_users"]
    load = r["load_test"]
    names = {
        "soppu": "soppu (shared bases, continuous batching)",
        "base": "base model alone, same batching",
        "peft_switching": "PEFT, set_adapter per request",
        "peft_mixed_batch": "PEFT, mixed-adapter batch (adapter_names)",
    }
    lines = [
        f"{r['users']} users in flight, {r['tokens_each']} new tokens each (end-of-sequence "
        f"ignored on every side), greedy, {r['threads']} threads, shared rank "
        f"{r['shared_rank']}; tokens/s from the tokens each side really generated:",
        "",
        "| server | seconds | tokens | tokens/s | soppu is |",
        "|---|---|---|---|---|",
    ]
    for key, label in names.items():
        lines.append(
            f"| {label} | {r['seconds'][key]:.1f} | {r['generated_tokens'][key]} | "
            f"{t[key]:.1f} | {t['soppu'] / t[key]:.2f}× |"
        )
    lines += [
        "",
        f"Memory for {mem['users']:,} users (float32): soppu bases + cores "
        f"{mem['soppu_bytes'] / 2**20:.1f} MiB, PEFT adapters {mem['peft_bytes'] / 2**20:.1f} MiB "
        f"({mem['ratio']:.1f}× less).",
        "",
        f"Load test: {load['clients']} concurrent clients, {load['requests']} requests of "
        f"{r['tokens_each']} tokens ({load['generated_tokens']} generated): {load['errors']} "
        f"errors, p50 {load['p50_s']:.2f} s, p99 {load['p99_s']:.2f} s, "
        f"{load['tokens_per_s']:.1f} tokens/s.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
