"""Scale benchmark: compression end to end from PEFT files, time and peak memory.

    python -m experiments.bench_scale            # the benchmarks' numbers (≈ 10 minutes)
    python -m experiments.bench_scale --quick    # 100 users, a smoke check

Cases (seeded synthetic adapters, see soppu/synthetic.py):
  big-slot     1,000 users × one 4096×4096 slot, k=16, r=64
  whole-model  1,000 users × 30 layers × q/v of SmolLM2-135M (576→576, 576→192), k=8, r=32

Each run is a fresh child process (`soppu compress`'s own code path: read and validate the
files, fit every slot, write the store and the report), so its peak RSS is its own.

Adding users (`soppu add`'s code path, timed in a fresh child): on the big slot, the first
999 users are compressed and the 1,000th added onto their bases; its error is compared with
the error it gets when all 1,000 are compressed together, and a user drawn unlike the others
(independent random factors) is added too, to show the drift flag. Writes
experiments/results/scale_bench.json and .md (scale_bench_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.lib import RESULTS, provenance
from soppu import atomic

CASES = {
    "big-slot": {"shapes": {"q_proj": [4096, 4096]}, "layers": 1, "rank_k": 16, "r": 64},
    "whole-model": {
        "shapes": {"q_proj": [576, 576], "v_proj": [192, 576]},
        "layers": 30,
        "rank_k": 8,
        "r": 32,
    },
}

CHILD = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
from soppu.compression import CompressionConfig
from soppu.server.compress_store import compress_adapters
from soppu.adapter_sets import discover
start = time.perf_counter()
paths = discover([sys.argv[1]])
manifest = compress_adapters(paths, sys.argv[2], CompressionConfig(
    rank=int(sys.argv[3]), personal_error=sys.argv[5] == "1"), replace=True)
print(json.dumps({"seconds": time.perf_counter() - start, "totals": manifest["totals"]}))
"""


ADD_CHILD = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
from soppu.server.add_users import add_adapters
from soppu.adapter_sets import discover
import soppu.compression.plots  # the report's figures: matplotlib's import (~0.6 s) counts too
paths = discover([sys.argv[2]])
start = time.perf_counter()
manifest = add_adapters(sys.argv[1], paths, sys.argv[3], replace=True)
seconds = time.perf_counter() - start
report = json.load(open(sys.argv[3] + "/report/report.json"))
new = {i["user"]: i["error"] for i in report["items"] if i["user"] in paths}
print(json.dumps({"seconds": seconds, "errors": new, "drift": manifest["added"]["drift_max"]}))
"""


def add_case(work: Path, users: int, threads: int) -> list[dict]:
    """999 users compressed, then the 1,000th (and a stranger) added onto their bases."""
    import shutil

    from soppu.synthetic import PopulationSpec, write_population

    case = CASES["big-slot"]
    everyone = work / "big-slot" / "adapters"
    first, last = work / "add" / "first", work / "add" / "last"
    first.mkdir(parents=True)
    last.mkdir(parents=True)
    names = sorted(p.name for p in everyone.iterdir())
    for name in names[:-1]:
        (first / name).symlink_to(everyone / name)
    (last / names[-1]).symlink_to(everyone / names[-1])
    base = run_child(first, work / "add" / "store", case["r"], threads, False)
    joint = json.loads((work / "big-slot" / "store" / "report" / "report.json").read_text())
    joint_error = next(i["error"] for i in joint["items"] if i["user"] == names[-1])
    rows = []
    added = run_add(work / "add" / "store", last, work / "add" / "grown", threads)
    rows.append(
        {
            "case": "add one user",
            "users": users,
            "seconds": added["seconds"],
            "error": added["errors"][names[-1]],
            "joint_error": joint_error,
            "drift": added["drift"],
            "compress_999_seconds": base["seconds"],
        }
    )
    stranger = PopulationSpec(
        users=1,
        layers=1,
        shapes={k: tuple(v) for k, v in case["shapes"].items()},
        rank=case["rank_k"],
        structure="random",
        seed=7,
    )
    write_population(stranger, work / "add" / "stranger")
    shutil.move(work / "add" / "stranger" / "user0000", work / "add" / "stranger" / "stranger")
    odd = run_add(work / "add" / "store", work / "add" / "stranger", work / "add" / "odd", threads)
    rows.append(
        {
            "case": "add a user unlike the others",
            "users": users,
            "seconds": odd["seconds"],
            "error": odd["errors"]["stranger"],
            "joint_error": None,
            "drift": odd["drift"],
            "compress_999_seconds": base["seconds"],
        }
    )
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def run_add(store: Path, new: Path, out: Path, threads: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", ADD_CHILD, str(store), str(new), str(out), str(threads)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def generate(case: dict, users: int, out: Path) -> float:
    from soppu.synthetic import PopulationSpec, write_population

    spec = PopulationSpec(
        users=users,
        layers=case["layers"],
        shapes={k: tuple(v) for k, v in case["shapes"].items()},
        rank=case["rank_k"],
        shared_dim=48,
        seed=1,
    )
    start = time.perf_counter()
    write_population(spec, out)
    return time.perf_counter() - start


def run_child(adapters: Path, store: Path, rank: int, threads: int, personal: bool) -> dict:
    """Run one compression in a fresh process; wait4 gives that process's own peak RSS."""
    argv = [
        sys.executable,
        "-c",
        CHILD,
        str(adapters),
        str(store),
        str(rank),
        str(threads),
        "1" if personal else "0",
    ]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, cwd=Path(__file__).parent.parent)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(err.read()[-2000:])
        result = json.loads(out.read().strip().splitlines()[-1])
    result["peak_rss_gib"] = usage.ru_maxrss / 2**20  # KiB on Linux
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="100 users")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    args = parser.parse_args()
    users = 100 if args.quick else args.users
    rows = []
    with tempfile.TemporaryDirectory(prefix="soppu-scale-") as work:
        for name in args.cases:
            case = CASES[name]
            adapters = Path(work) / name / "adapters"
            gen_seconds = generate(case, users, adapters)
            size = sum(p.stat().st_size for p in adapters.rglob("*.safetensors"))
            for personal in (False, True):
                res = run_child(
                    adapters, Path(work) / name / "store", case["r"], args.threads, personal
                )
                t = res["totals"]
                rows.append(
                    {
                        "case": name,
                        "users": users,
                        "slots": t["slots"],
                        "k": case["rank_k"],
                        "r": case["r"],
                        "personal_error": personal,
                        "seconds": res["seconds"],
                        "peak_rss_gib": res["peak_rss_gib"],
                        "input_mib": size / 2**20,
                        "ratio": t["ratio"],
                        "mean_error": t["mean"],
                        "max_error": t["max"],
                        "generate_seconds": gen_seconds,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
        adds = add_case(Path(work), users, args.threads) if "big-slot" in args.cases else []
    write(rows, adds, args)


def write(rows: list[dict], adds: list[dict], args: argparse.Namespace) -> None:
    RESULTS.mkdir(exist_ok=True)
    meta = {
        **provenance("bench_scale"),
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    summary = json.dumps({"meta": meta, "rows": rows, "add": adds}, indent=2)
    name = "scale_bench_quick" if args.quick else "scale_bench"  # never the full run's file
    atomic.write_text(RESULTS / f"{name}.json", summary)
    lines = [
        f"Command: `{meta['command']}` ({meta['threads']} torch threads, {meta['cpus']} CPUs).",
        "End to end from PEFT files (read, validate, fit, write store and report).",
        "",
        "| case | users | slots | k | r | personal error | seconds | peak RSS GiB | input MiB "
        "| ratio | mean err | max err |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['users']} | {r['slots']} | {r['k']} | {r['r']} "
            f"| {'on' if r['personal_error'] else 'off'} | {r['seconds']:.1f} "
            f"| {r['peak_rss_gib']:.2f} | {r['input_mib']:.0f} | {r['ratio']:.1f}× "
            f"| {r['mean_error']:.4f} | {r['max_error']:.4f} |"
        )
    if adds:
        lines += [
            "",
            "Adding users onto a 999-user store of the big slot (`soppu add`, no refit):",
            "",
            "| case | seconds | its error | its error compressed with everyone | drift |",
            "|---|---:|---:|---:|---:|",
        ]
        for a in adds:
            joint = "–" if a["joint_error"] is None else f"{a['joint_error']:.4f}"
            lines.append(
                f"| {a['case']} | {a['seconds']:.2f} | {a['error']:.4f} | {joint} "
                f"| {a['drift']:.4f} |"
            )
    atomic.write_text(RESULTS / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
