"""Kill -9 at random points of compress, publish and a federation round; then run again.

    python -m experiments.kill_points                      # 20 points each (the README's)
    python -m experiments.kill_points --points 3 --skip-federation

Each trial starts the real `soppu` command in its own process group, sends SIGKILL to the
whole group after a random delay between the process's start-up (importing torch and the
project, measured) and the time a clean run takes, and then runs the same command to
completion (the "next run"). After every trial it checks:

- versions lost: every version that was complete before the trial is still there, byte for
  byte (sha256 of every file), and the store/`current` that existed is readable and complete;
- temp left: no `.…building`, `.…scratch`, `.…owner`, `.…lock`, `.…tmp` or staging folder
  anywhere under the outputs after the next run;
- `current` complete: it points at a version whose manifest checks out (every slot's sha256).

compress: `soppu compress ADAPTERS --out STORE --overwrite` (24 users, 6 layers; a store is
always there from the first clean run). publish: `soppu publish STORE --to SERVING` (a new
version each time). federation: `soppu simulate --resume` on the tests' tiny random model (2
users, a compression round after each round), one run that each trial asks for one round more,
killed somewhere in that round (training, committing, compressing, publishing) and resumed;
also checked: every (round, user) recorded exactly once.
Writes experiments/results/kill_points.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.lib import RESULTS, provenance
from soppu import atomic

ROOT = Path(__file__).parents[1]
SOPPU = [sys.executable, "-m", "soppu"]
LEFTOVER_SUFFIXES = (".building", ".scratch", ".owner", ".lock", ".tmp", ".old", ".new")


def files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def leftovers(root: Path) -> list[str]:
    found = [p for p in root.rglob(".*") if p.name.endswith(LEFTOVER_SUFFIXES)]
    found += [p for p in root.rglob("staging") if p.is_dir()]
    return sorted(str(p.relative_to(root)) for p in found)


def run(args: list[str], env: dict[str, str], cwd: Path) -> float:
    began = time.perf_counter()
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - began


def killed(args: list[str], env: dict[str, str], cwd: Path, after: float) -> bool:
    """Start `args`, SIGKILL its process group after `after` s; True if it was still running."""
    process = subprocess.Popen(
        args,
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        process.wait(timeout=after)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return True


def versions_of(folder: Path) -> dict[str, dict[str, str]]:
    if not folder.is_dir():
        return {}
    return {p.name: files(p) for p in sorted(folder.glob("v[0-9]*")) if p.is_dir()}


def store_complete(store: Path) -> bool:
    from soppu.server.compressed_store import CompressedStore, StoreError

    try:
        CompressedStore(store).verified()
        return True
    except StoreError:
        return False


def current_complete(serving: Path) -> bool:
    current = serving / "current"
    if not current.is_symlink():
        return not current.exists()  # none yet is fine; anything else is not
    return (current / "manifest.json").is_file() and store_complete(current / "shared")


def startup_seconds(env: dict[str, str], cwd: Path) -> float:
    """What a `soppu` process spends importing torch and the project before any work: kill
    points are drawn after it, so they land in the work (reading, writing, renaming)."""
    imports = "import torch, soppu.cli, server.compress_store, server.publish"
    return run([sys.executable, "-c", imports], env, cwd)


def trial(name, args, env, cwd, outputs, window, rng) -> dict:
    before = {o.name: versions_of(o) for o in outputs}
    after_s = rng.uniform(*window)
    was_running = killed(args, env, cwd, after_s)
    states_ok = all(_readable(o) for o in outputs)
    run(args, env, cwd)  # the next run
    lost = 0
    for o in outputs:
        now = versions_of(o)
        lost += sum(1 for v, content in before[o.name].items() if now.get(v) != content)
    left = [x for o in outputs for x in leftovers(o)]
    return {
        "command": name,
        "kill_after_s": round(after_s, 2),
        "killed_while_running": was_running,
        "readable_after_kill": states_ok,
        "versions_lost": lost,
        "temp_left": left,
        "current_complete": all(current_complete(o) for o in outputs if o.name == "serving"),
    }


def _readable(output: Path) -> bool:
    if output.name == "serving":
        return current_complete(output)
    if (output / "manifest.json").is_file():
        return store_complete(output)
    if (output / "state.json").is_file():
        json.loads((output / "state.json").read_text())
    return True


def compress_and_publish(root: Path, env: dict, points: int, rng) -> list[dict]:
    run([*SOPPU, "synth", str(root / "adapters"), "--users", "24", "--layers", "6"], env, root)
    compress = [*SOPPU, "compress", str(root / "adapters"), "--out", str(root / "store")]
    compress += ["--rank", "16", "--overwrite", "--threads", "1"]
    start = startup_seconds(env, root)
    clean_compress = (start, run(compress, env, root))
    publish = [*SOPPU, "publish", str(root / "store"), "--to", str(root / "serving")]
    clean_publish = (start, run(publish, env, root))
    rows = []
    for i in range(points):
        rows.append(trial("compress", compress, env, root, [root / "store"], clean_compress, rng))
        rows.append(trial("publish", publish, env, root, [root / "serving"], clean_publish, rng))
        print(f"  compress/publish {i + 1}/{points}: {rows[-2]} {rows[-1]}", flush=True)
    return rows


def federation(root: Path, env: dict, points: int, rng) -> list[dict]:
    """One run that grows by a round per trial: trial i asks for round i + 2 (a compression
    round follows each), is killed somewhere in it, and is resumed."""
    from tests.helpers import write_tiny_model, write_users_jsonl

    model = write_tiny_model(root / "model", layers=6)
    data = write_users_jsonl(root / "users.jsonl", {"user0": 3000, "user1": 3000})
    public = write_users_jsonl(root / "public.jsonl", {"nobody": 6000}, seed=1)
    out = root / "run"
    base = [*SOPPU, "simulate", "--out", str(out), "--base-model", str(model)]
    base += ["--data", str(data), "--public", str(public), "--users", "2", "--local-steps", "3"]
    base += ["--seq-len", "32", "--max-eval-tokens", "256", "--align-steps", "0"]
    base += ["--rank", "16", "--threads", "1", "--no-final-evaluation"]
    run([*base, "--rounds", "1"], env, root)
    base.append("--resume")
    clean_s = (startup_seconds(env, root), run([*base, "--rounds", "2"], env, root))
    outputs = [out, out / "compressed", out / "serving"]
    rows = []
    for i in range(points):
        row = trial("federation", [*base, "--rounds", str(i + 3)], env, root, outputs, clean_s, rng)
        state = json.loads((out / "state.json").read_text())
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        row["rounds_done"] = state["round"]
        row["each_user_once_per_round"] = sorted((r["round"], r["user"]) for r in lines) == [
            (r, u) for r in range(1, i + 4) for u in ("user0", "user1")
        ]
        rows.append(row)
        print(f"  federation {i + 1}/{points}: {row}", flush=True)
        ray = Path(sys.executable).parent / "ray"
        subprocess.run([str(ray), "stop", "--force"], capture_output=True)  # a killed driver's
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    table = []
    for name in ("compress", "publish", "federation"):
        mine = [r for r in rows if r["command"] == name]
        if not mine:
            continue
        table.append(
            {
                "command": name,
                "trials": len(mine),
                "killed mid-run": sum(r["killed_while_running"] for r in mine),
                "readable after kill": sum(r["readable_after_kill"] for r in mine),
                "versions lost": sum(r["versions_lost"] for r in mine),
                "temp folders left": sum(len(r["temp_left"]) for r in mine),
                "current complete": sum(r["current_complete"] for r in mine),
                "rounds exactly once": sum(r.get("each_user_once_per_round", True) for r in mine),
            }
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--federation-points", type=int, default=None)
    parser.add_argument("--skip-federation", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="soppu-kill-"))
    env = {**os.environ, "SOPPU_CACHE": str(root / "cache"), "PYTHONPATH": str(ROOT)}
    env.update(RAY_DEDUP_LOGS="0", FLWR_TELEMETRY_ENABLED="0")
    try:
        rows = compress_and_publish(root, env, args.points, rng)
        if not args.skip_federation:
            rows += federation(root, env, args.federation_points or args.points, rng)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table = summarise(rows)
    RESULTS.mkdir(exist_ok=True)
    summary = json.dumps({**provenance("kill_points"), "summary": table, "trials": rows}, indent=2)
    atomic.write_text(RESULTS / "kill_points.json", summary)
    header = list(table[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[h]) for h in header) + " |" for row in table]
    atomic.write_text(RESULTS / "kill_points.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
