"""Soak test of `soppu serve`: many clients, faults mixed in, a new version published midway.

    python -m experiments.soak_serving                    # the benchmarks' run (minutes, 2 cores)
    python -m experiments.soak_serving --serving DIR      # a published serving dir (copied)

The app runs in this process (uvicorn in a thread, as the tests run it) on a tiny random
Llama with --users users built the way tests/helpers.py builds them, or on a copy of
--serving (its `current` version, --base-model or the version's own). Then --requests
requests from --clients concurrent clients on loopback (httpx), mixed: LoRAX /generate and
/generate_stream, OpenAI /v1/completions and /v1/chat/completions, plain and streaming,
greedy and sampled (some at temperature 1e-45). A --disconnect share of them leave early (a
stream closed after two events, a plain request given up after --give-up seconds), a
--degenerate share carry what must be refused (inf/NaN temperature, seed 2**64, top_p 0,
a path outside the serving dir, a body over the limit, n 2, 17 stop sequences, ...), an
--oversized share send a prompt just under the body limit or of exactly the most bytes the
server tokenises (both must be refused, neither may hold up anyone else), and a --hostile
share ask for legal extremes that must be answered whole (top_k 2**62, top_p 1e-9, the
largest seed, temperature 1e6, sixteen stop sequences of 1,000 characters, half the context
generated past end-of-sequence, a prompt scored with its top-5 alternatives at the input
limit). When half the requests are done
a new version is published (the same users and two more, at another rank; on --serving, the
version's own store published again) and the server swaps it in under load.

Measured (each request carries a unique seed, so the engine's record of it is found):
- errors among well-formed requests that stayed: anything but a whole 200 answer (target 0);
- admission: the worst of (arrival → joining the batch) − (the engine step in progress at
  arrival) − max_wait, i.e. whether every request joined at the next step (target ≤ 0);
  and, from the client's side, the worst latency − (own generation + that step), for reference;
- clients that left: all cancelled in the engine, tokens generated, steps from leaving to the
  row leaving;
- degenerate requests: all refused with a 4xx (target: all);
- oversized prompts: all refused with a 4xx, the slowest refusal (for reference);
- hostile but legal parameters: all answered whole (they count among the well-formed too);
- RSS of this process after a warm-up and at the end (target: back to start, within 5%);
- nothing left open in the engine (rows, queue, open requests).
Prints a table; writes experiments/results/soak_serving_hostile.json (--out; soak_serving.json
holds the run before oversized and hostile requests were mixed in).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import ctypes
import gc
import json
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

from soppu import atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
MIB = 2**20
SAMPLE = "To be or not to be that is the question whether tis nobler in the mind"
ROUTES = ["/generate", "/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions"]
DEGENERATE = [  # (route, raw JSON body, what makes it wrong)
    ("/generate", '{"inputs": "hi", "parameters": {"do_sample": true, "temperature": 1e309}}'),
    ("/generate", '{"inputs": "hi", "parameters": {"seed": 18446744073709551616}}'),
    ("/generate", '{"inputs": "hi", "parameters": {"do_sample": true, "temperature": NaN}}'),
    ("/generate_stream", '{"inputs": "hi", "parameters": {"top_p": 0}}'),
    ("/generate", '{"inputs": "hi", "parameters": {"top_k": 0}}'),
    (
        "/generate",
        '{"inputs": "hi", "parameters": {"adapter_id": "/etc/user00", "adapter_source": "local"}}',
    ),
    ("/v1/completions", '{"prompt": "hi", "temperature": -1}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "seed": -1}'),
    ("/generate", json.dumps({"inputs": "word " * 400_000})),  # 2 MB: over the body limit
    ("/generate_stream", '{"inputs": "hi", "parameters": {"max_new_tokens": 0}}'),
    ("/generate", '{"inputs": "hi", "parameters": {"max_new_tokens": 1000000000000}}'),
    ("/v1/completions", '{"prompt": "hi", "n": 2}'),
    ("/v1/completions", '{"prompt": "hi", "logprobs": 6, "echo": true, "max_tokens": 0}'),
    ("/generate", json.dumps({"inputs": "hi", "parameters": {"stop": ["x"] * 17}})),
    ("/generate", '{"inputs": "hi", "parameters": {"best_of": 2}}'),
]


def tiny_serving(root: Path, users: int) -> tuple[Path, Path, Path]:
    """A tiny random Llama, a serving dir with `users` users (v0001), and the store of the
    next version (the same users and two more, at another rank) ready to publish."""
    from soppu.compression.compress import CompressionConfig
    from soppu.server.compress_store import compress_adapters
    from soppu.server.compression_round import compress_and_publish
    from tests.helpers import tiny_population, write_tiny_model, write_users

    model = write_tiny_model(root / "model", layers=2)
    population = tiny_population(users + 2, k=4, layers=2)
    paths = write_users(root / "adapters", population, rank=4, alpha=8, base_model=str(model))
    first = {u: paths[u] for u in sorted(paths)[:users]}
    compress_and_publish(first, root / "store-1", root / "serving", CompressionConfig(rank=16))
    compress_adapters(paths, root / "store-2", CompressionConfig(rank=12))
    return model, root / "serving", root / "store-2"


def copied_serving(source: Path, root: Path) -> tuple[Path, Path | None]:
    """A copy of `source` (publishing into it must not touch the original) and the store its
    current version came from, if it is still there."""
    serving = root / "serving"
    shutil.copytree(source, serving, symlinks=True)
    manifest = json.loads(((serving / "current").resolve() / "manifest.json").read_text())
    store = Path(manifest.get("source", {}).get("store") or "/nonexistent")
    return serving, store if (store / "manifest.json").is_file() else None


def oversized(limits: dict) -> list[tuple[str, dict]]:
    """Legal JSON whose prompt the server must refuse: one just under the body limit (refused
    by its length before tokenising) and one of exactly the most bytes it tokenises (refused
    once tokenised: every word is a token, so far more tokens than the input limit)."""
    huge = "word " * ((limits["max_body_bytes"] - 4096) // 5)
    tokenised = ("word " * limits["max_prompt_bytes"])[: limits["max_prompt_bytes"]]
    return [
        ("/generate", {"inputs": huge, "parameters": {"max_new_tokens": 2}}),
        ("/v1/completions", {"prompt": huge, "max_tokens": 2}),
        ("/generate_stream", {"inputs": tokenised, "parameters": {"max_new_tokens": 2}}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": tokenised}]}),
    ]


def hostile(limits: dict, prompt: str, user: str | None, seed: int, rng: random.Random):
    """A legal request at the extremes of what the server accepts: it must be answered whole."""
    stops = ["".join(rng.choice("abcdefgh") for _ in range(1000)) for _ in range(16)]
    generate = {"adapter_id": user, "seed": seed, "max_new_tokens": 8}
    chosen = rng.randrange(5)
    if chosen == 0:
        parameters = {"do_sample": True, "top_k": 2**62, "top_p": 1e-9}
        return "/generate", {"inputs": prompt, "parameters": generate | parameters}
    if chosen == 1:
        parameters = {"stop": stops, "max_new_tokens": 24}
        return "/generate", {"inputs": prompt, "parameters": generate | parameters}
    if chosen == 2:
        long = limits["max_total_tokens"] // 2  # past any end-of-sequence: a long row
        parameters = {"max_new_tokens": long, "ignore_eos_token": True}
        return "/generate", {"inputs": prompt, "parameters": generate | parameters}
    if chosen == 3:
        body = {"model": user or "", "prompt": limits["longest_prompt"], "echo": True}
        body |= {"logprobs": 5}
        return "/v1/completions", body | {"max_tokens": 0, "seed": seed}
    # the largest legal seed: this request's engine record is not found by its seed, so it
    # counts for errors but not for admission
    body = {"model": user or "", "temperature": 1e6, "max_tokens": 8, "seed": 2**64 - 1}
    return "/v1/chat/completions", body | {"messages": [{"role": "user", "content": prompt}]}


def longest_prompt(tokenizer, max_tokens: int) -> str:
    """Words of SAMPLE, as many as fit in `max_tokens` tokens."""
    words = (SAMPLE.split() * max_tokens)[:max_tokens]
    while len(tokenizer(" ".join(words))["input_ids"]) > max_tokens - 2:  # room for BOS, EOS
        words.pop()
    return " ".join(words)


def start_server(serving: Path, base_model: str | None, max_batch: int, max_wait: float):
    import uvicorn

    from soppu.server.serving.runner import build
    from tests.helpers import free_port

    app, engine = build(serving, base_model, max_batch=max_batch, max_wait=max_wait)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    ctx = app.state.soppu
    limits = {
        "max_body_bytes": ctx.max_body_bytes,
        "max_prompt_bytes": ctx.max_prompt_bytes,
        "max_input_tokens": ctx.max_input_tokens,
        "max_total_tokens": ctx.max_total_tokens,
        "longest_prompt": longest_prompt(engine.tokenizer, ctx.max_input_tokens),
    }
    return f"http://127.0.0.1:{port}", engine, server, thread, limits


class Recorder:
    """What the engine did: each turn's start, and every request it ended (by seed)."""

    def __init__(self, engine) -> None:
        self.turns: list[float] = []
        self.ended: dict[int, dict] = {}
        admit, finish = engine._admit, engine.on_finish

        def timed_admit():
            self.turns.append(time.perf_counter())
            return admit()

        def record(request) -> None:
            if request.sampling.seed is not None:
                self.ended[request.sampling.seed] = {
                    "arrived": request.arrived,
                    "admitted": request.admitted_at,
                    "finished": request.finished_at,
                    "reason": request.finish_reason,
                    "tokens": len(request.tokens),
                    "max_new_tokens": request.sampling.max_new_tokens,
                }
            finish(request)

        engine._admit, engine.on_finish = timed_admit, record

    def step_at(self, moment: float) -> float:
        """The length of the engine turn in progress at `moment`."""
        i = bisect.bisect_right(self.turns, moment)
        if i == 0 or i >= len(self.turns):
            return 0.0
        return self.turns[i] - self.turns[i - 1]

    def turns_between(self, start: float, end: float) -> int:
        return bisect.bisect_right(self.turns, end) - bisect.bisect_right(self.turns, start)


def plan(count: int, users: list[str], args, limits: dict, rng: random.Random) -> list[dict]:
    """Every request: its kind (ok, leave, bad, oversized), route, body; its seed is its
    index; the hostile ones are ok requests marked `hostile`."""
    words = SAMPLE.split()
    shares = {"bad": args.degenerate, "oversized": args.oversized, "hostile": args.hostile}
    special: dict[int, str] = {}
    for kind, share in shares.items():
        free = [i for i in range(count) if i not in special]
        special |= dict.fromkeys(rng.sample(free, round(count * share)), kind)
    rest = [i for i in range(count) if i not in special]
    leaving = set(rng.sample(rest, round(count * args.disconnect)))
    jobs: list[dict] = []
    too_long = oversized(limits)
    for i in range(count):
        done = sum(j["kind"] == special.get(i) for j in jobs)
        if special.get(i) == "bad":  # each kind in turn
            route, raw = DEGENERATE[done % len(DEGENERATE)]
            jobs.append({"seed": i, "kind": "bad", "route": route, "raw": raw, "stream": False})
            continue
        if special.get(i) == "oversized":
            route, body = too_long[done % len(too_long)]
            stream = route == "/generate_stream"
            jobs.append({"seed": i, "kind": "oversized", "route": route, "body": body,
                         "stream": stream})  # fmt: skip
            continue
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 12)))
        user = rng.choice([*users, None])
        if special.get(i) == "hostile":
            route, body = hostile(limits, prompt, user, i, rng)
            jobs.append({"seed": i, "kind": "ok", "hostile": True, "route": route, "body": body,
                         "stream": False})  # fmt: skip
            continue
        if i in leaving:  # long, greedy, past any end-of-sequence: it would run long
            route = rng.choice(["/generate", "/generate_stream"])
            body = body_for(route, prompt, user, args.leave_tokens, i, None, False)
            body["parameters"]["ignore_eos_token"] = True
            stream = route == "/generate_stream"
            jobs.append(
                {"seed": i, "kind": "leave", "route": route, "stream": stream, "body": body}
            )
            continue
        route = rng.choice(ROUTES)
        stream = route == "/generate_stream" or (route.startswith("/v1") and rng.random() < 0.5)
        tokens = rng.randint(args.min_tokens, args.max_tokens)
        temperature = rng.choice([0.7, 1.0, 1e-45]) if rng.random() < 0.3 else None
        body = body_for(route, prompt, user, tokens, i, temperature, stream)
        jobs.append({"seed": i, "kind": "ok", "route": route, "stream": stream, "body": body})
    return jobs


def body_for(route, prompt, user, tokens, seed, temperature, stream) -> dict:
    if route.startswith("/generate"):
        parameters = {"adapter_id": user, "max_new_tokens": tokens, "seed": seed}
        if temperature is not None:
            parameters |= {"do_sample": True, "temperature": temperature, "top_p": 0.95}
        return {"inputs": prompt, "parameters": parameters}
    body = {"model": user or "", "max_tokens": tokens, "seed": seed, "stream": stream}
    body["temperature"] = 0 if temperature is None else temperature
    if route == "/v1/chat/completions":
        return body | {"messages": [{"role": "user", "content": prompt}]}
    return body | {"prompt": prompt}


async def run_one(client, url: str, job: dict, give_up: float) -> dict:
    began = time.perf_counter()
    out = {"seed": job["seed"], "kind": job["kind"], "status": 0, "error": None, "left": None}
    out["hostile"], out["route"] = job.get("hostile", False), job["route"]
    try:
        if job["kind"] == "bad":
            reply = await client.post(
                url + job["route"], content=job["raw"], headers={"content-type": "application/json"}
            )
            out["status"] = reply.status_code
        elif job["stream"]:
            await read_stream(client, url, job, out)
        elif job["kind"] == "leave":
            try:
                await asyncio.wait_for(client.post(url + job["route"], json=job["body"]), give_up)
                out["error"] = "finished before giving up"
            except TimeoutError:
                out["left"] = time.perf_counter()
        else:
            reply = await client.post(url + job["route"], json=job["body"])
            out["status"] = reply.status_code
            if reply.status_code != 200:
                out["error"] = reply.text[:200]
    except Exception as exc:  # a connection error is an error too
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["latency"] = time.perf_counter() - began
    return out


async def read_stream(client, url: str, job: dict, out: dict) -> None:
    events = 0
    async with client.stream("POST", url + job["route"], json=job["body"]) as reply:
        out["status"] = reply.status_code
        async for line in reply.aiter_lines():
            if not line.startswith("data:"):
                continue
            if line.strip() == "data: [DONE]":
                out["done"] = True
                continue
            event = json.loads(line[5:])
            if "error" in event:
                out["error"] = event["error"]
            events += 1
            if event.get("generated_text") is not None:
                out["done"] = True
            if job["kind"] == "leave" and events == 2:
                out["left"] = time.perf_counter()
                return  # leaving the block closes the connection
    if job["kind"] == "ok" and not out.get("done") and not out["error"]:
        out["error"] = f"the stream ended without its last event ({events} events)"


async def load(url: str, jobs: list[dict], clients: int, give_up: float, halfway=None):
    """`clients` independent clients (an httpx client each: one shared pool would queue
    requests for seconds in httpcore itself), each sending its next job when one ends."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    results: list[dict] = []
    pools = [httpx.AsyncClient(timeout=600) for _ in range(clients)]  # before the clock runs

    async def client(pool) -> None:
        async with pool:
            while not queue.empty():
                results.append(await run_one(pool, url, queue.get_nowait(), give_up))
                if halfway and len(results) == len(jobs) // 2:
                    await asyncio.to_thread(halfway)

    await asyncio.gather(*(client(pool) for pool in pools))
    return results


def rss() -> int:
    import psutil

    gc.collect()
    with contextlib.suppress(OSError):  # hand freed heap back to the system, as time would
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process().memory_info().rss


def summarise(results, recorder: Recorder, engine, args, rss_start, rss_end, wall) -> dict:
    ok = [r for r in results if r["kind"] == "ok"]
    errors = [r for r in ok if r["error"] or r["status"] != 200]
    excess, client_excess = [], []
    for r in ok:
        seen = recorder.ended.get(r["seed"])
        if not seen or seen["admitted"] is None:
            continue
        step = recorder.step_at(seen["arrived"])
        excess.append(seen["admitted"] - seen["arrived"] - step - args.max_wait)
        own = seen["finished"] - seen["admitted"]
        client_excess.append(r["latency"] - own - step)
    leavers = [r for r in results if r["kind"] == "leave"]
    left = [r for r in leavers if r["left"]]  # the others had their answer first
    cancelled = [recorder.ended.get(r["seed"], {}) for r in left]
    after = [
        recorder.turns_between(r["left"], seen["finished"])
        for r, seen in zip(left, cancelled, strict=True)
        if r["left"] and seen.get("finished")
    ]
    bad = [r for r in results if r["kind"] == "bad"]
    too_long = [r for r in results if r["kind"] == "oversized"]
    hostile = [r for r in ok if r["hostile"]]
    return {
        "requests": len(results),
        "clients": args.clients,
        "wall_s": wall,
        "well_formed": len(ok),
        "errors": len(errors),
        "error_examples": [e["error"] for e in errors[:5]],
        "admission_excess_worst_s": max(excess, default=0.0),
        "client_excess_worst_s": max(client_excess, default=0.0),
        "engine_turns": len(recorder.turns),
        "left_early": len(left),
        "answered_before_leaving": len(leavers) - len(left),
        # never reaching the engine (gone while the prompt was read or tokenised) counts too
        "left_cancelled": sum(c.get("reason", "cancelled") == "cancelled" for c in cancelled),
        "left_before_the_engine": sum(not c for c in cancelled),
        "left_otherwise": sorted(
            f"{r['route']}: {c['reason']} after {c['tokens']} tokens"
            for r, c in zip(left, cancelled, strict=True)
            if c.get("reason", "cancelled") != "cancelled"
        ),
        "left_tokens_worst": max((c.get("tokens", 0) for c in cancelled), default=0),
        "left_tokens_limit": args.leave_tokens,
        "left_turns_worst": max(after, default=0),
        "degenerate": len(bad),
        "degenerate_4xx": sum(400 <= r["status"] < 500 for r in bad),
        "degenerate_statuses": sorted({r["status"] for r in bad}),
        "oversized": len(too_long),
        "oversized_4xx": sum(400 <= r["status"] < 500 for r in too_long),
        "oversized_statuses": sorted({r["status"] for r in too_long}),
        "oversized_latency_worst_s": max((r["latency"] for r in too_long), default=0.0),
        "hostile": len(hostile),
        "hostile_answered": sum(r["status"] == 200 and not r["error"] for r in hostile),
        "rss_start_mib": rss_start / MIB,
        "rss_end_mib": rss_end / MIB,
        "swaps": engine.swaps,
        "open_at_end": len(engine.open) + len(engine.active) + engine.waiting.qsize(),
        "tokens_generated": sum(s["tokens"] for s in recorder.ended.values()),
    }


def table(s: dict) -> str:
    grew = s["rss_end_mib"] / s["rss_start_mib"] - 1
    swap = s["swaps"][0] if s["swaps"] else None
    rows = [
        ("requests (clients)", f"{s['requests']} ({s['clients']}) in {s['wall_s']:.0f} s", "", ""),
        ("errors among well-formed", f"{s['errors']} of {s['well_formed']}", "0",
         s["errors"] == 0),
        ("worst admission wait − step in progress − max_wait",
         f"{s['admission_excess_worst_s'] * 1000:+.1f} ms", "≤ 0",
         s["admission_excess_worst_s"] <= 0),
        ("worst client latency − (own generation + step)",
         f"{s['client_excess_worst_s'] * 1000:+.0f} ms", "(HTTP, tokenising)", ""),
        ("clients that left: cancelled in the engine",
         f"{s['left_cancelled']} of {s['left_early']}", "all",
         s["left_cancelled"] == s["left_early"]),
        ("  their most tokens / engine steps begun after leaving",
         f"{s['left_tokens_worst']} of {s['left_tokens_limit']} / {s['left_turns_worst']}",
         f"< {s['left_tokens_limit'] // 2}", s["left_tokens_worst"] < s["left_tokens_limit"] // 2),
        ("degenerate requests refused with a 4xx",
         f"{s['degenerate_4xx']} of {s['degenerate']} {s['degenerate_statuses']}", "all",
         s["degenerate_4xx"] == s["degenerate"]),
        ("oversized prompts refused with a 4xx (slowest refusal)",
         f"{s['oversized_4xx']} of {s['oversized']} {s['oversized_statuses']} "
         f"({s['oversized_latency_worst_s']:.2f} s)", "all",
         s["oversized_4xx"] == s["oversized"]),
        ("hostile but legal parameters answered whole",
         f"{s['hostile_answered']} of {s['hostile']}", "all",
         s["hostile_answered"] == s["hostile"]),
        ("version swapped in under load", f"{swap[0]}, {swap[1]} rows in flight" if swap else
         "no", "yes", bool(swap)),
        ("RSS after warm-up → end", f"{s['rss_start_mib']:.0f} → {s['rss_end_mib']:.0f} MiB "
         f"({grew:+.1%})", "≤ +5%", grew <= 0.05),
        ("left open in the engine at the end", str(s["open_at_end"]), "0", s["open_at_end"] == 0),
    ]  # fmt: skip
    lines = ["| measure | value | target | met |", "|---|---|---|---|"]
    for name, value, target, met in rows:
        mark = "" if met == "" else ("yes" if met else "**no**")
        lines.append(f"| {name} | {value} | {target} | {mark} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--disconnect", type=float, default=0.10)
    parser.add_argument("--degenerate", type=float, default=0.015)
    parser.add_argument("--oversized", type=float, default=0.02, help="share of huge prompts")
    parser.add_argument("--hostile", type=float, default=0.05, help="share of legal extremes")
    parser.add_argument("--users", type=int, default=8, help="tiny model's users")
    parser.add_argument("--min-tokens", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--leave-tokens", type=int, default=200, help="asked by those who leave")
    # well before 200 tokens are made, so a leaver leaves a row still running on a fast CPU
    parser.add_argument("--give-up", type=float, default=0.1, help="seconds a plain leaver waits")
    parser.add_argument("--max-batch", type=int, default=128)
    parser.add_argument("--max-wait", type=float, default=0.005)
    # enough for every kind of request to have set the allocator's high-water mark (at 100
    # the longest hostile rows came after it: RSS then rose by the arenas they needed, once)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--serving", type=Path, help="a published serving dir (copied first)")
    parser.add_argument("--base-model", help="with --serving: the base model (default: its own)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "soak_serving_hostile.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from soppu.server.publish import publish

    root = Path(tempfile.mkdtemp(prefix="soppu-soak-"))
    if args.serving:
        serving, store = copied_serving(args.serving, root)
        base = args.base_model
    else:
        model, serving, store = tiny_serving(root, args.users)
        base = str(model)
    url, engine, server, thread, limits = start_server(serving, base, args.max_batch, args.max_wait)
    users = sorted(engine.users)
    rng = random.Random(args.seed)
    warm = [j for j in plan(args.warmup, users, args, limits, rng) if j["kind"] == "ok"]
    for job in warm:
        job["seed"] += 10**9  # apart from the measured ones
        if "parameters" in job["body"]:
            job["body"]["parameters"]["seed"] = job["seed"]
        else:
            job["body"]["seed"] = job["seed"]
    asyncio.run(load(url, warm, args.clients, args.give_up))
    jobs = plan(args.requests, users, args, limits, rng)  # before RSS: the bodies are ours
    recorder = Recorder(engine)
    rss_start = rss()

    def new_version() -> None:
        if store is not None:
            publish(store, serving)

    began = time.perf_counter()
    results = asyncio.run(load(url, jobs, args.clients, args.give_up, new_version))
    wall = time.perf_counter() - began
    deadline = time.monotonic() + 60
    while (engine.active or engine.open) and time.monotonic() < deadline:
        time.sleep(0.05)  # the last cancelled rows leave at the engine's next step
    rss_end = rss()
    summary = summarise(results, recorder, engine, args, rss_start, rss_end, wall)
    server.should_exit = True
    thread.join(timeout=60)
    from experiments.lib import provenance

    summary |= provenance("soak_serving.py")
    summary["torch_threads"] = args.threads
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(args.out, json.dumps(summary, indent=2) + "\n")
    print(table(summary))
    print(f"written: {args.out}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
