"""`flwr run .` for real: a local simulation, and a deployment on 127.0.0.1 (a SuperLink and two
SuperNodes, one user each).

Every process the tests start, or Flower starts for them, is stopped by pid at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from helpers import free_port, write_tiny_model, write_users_jsonl

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    handle = open(log, "wb")  # noqa: SIM115 - closed with the process below
    process = subprocess.Popen(
        args, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )
    process.log_handle = handle  # type: ignore[attr-defined]
    return process


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    process.log_handle.close()  # type: ignore[attr-defined]


def flower_env(home: Path, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "SOPPU_CACHE": str(tmp_path / "cache"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def tiny_overrides(tmp_path: Path, users: int) -> tuple[Path, str]:
    model = write_tiny_model(tmp_path / "model", layers=6)
    data = write_users_jsonl(tmp_path / "users.jsonl", {f"user{i}": 3000 for i in range(users)})
    run_dir = tmp_path / "run"
    return run_dir, (
        f'run-dir="{run_dir}" base-model="{model}" data="{data}" users={users} rounds=2 '
        "local-steps=3 seq-len=32 max-eval-tokens=256 align-steps=0 compress-rank=16 threads=1"
    )


def test_flwr_run_local_simulation_as_the_readme_says(tmp_path):
    """`flwr run . local` with the README's `[superlink.local]`; Flower starts a detached local
    SuperLink for it, which this test finds by its FLWR_HOME and stops by pid."""
    import psutil

    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\noptions.num-supernodes = 3\n'
        "options.backend.client-resources.num-cpus = 1\n"
    )
    run_dir, overrides = tiny_overrides(tmp_path, 3)
    try:
        submitted = subprocess.run(
            [str(BIN / "flwr"), "run", str(ROOT), "local", "--run-config", overrides, "--stream"],
            env=flower_env(home, tmp_path),
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
        deadline = time.monotonic() + 120
        while not (run_dir / "evaluation.json").is_file():
            assert time.monotonic() < deadline, submitted.stdout[-3000:]
            time.sleep(0.5)
    finally:
        for process in psutil.process_iter(["cmdline"]):
            if str(home) in " ".join(process.info["cmdline"] or []):
                process.kill()
    state = json.loads((run_dir / "state.json").read_text())
    assert state["round"] == 2 and state["serving"] == "v0001"
    assert sorted(p.name for p in (run_dir / "store").iterdir()) == ["user0", "user1", "user2"]


def test_superlink_and_two_supernodes_run_a_federation(tmp_path):
    link, ports = free_port(), [free_port(), free_port()]
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "deploy"\n\n'
        f'[superlink.deploy]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    env = flower_env(home, tmp_path)
    run_dir, overrides = tiny_overrides(tmp_path, 2)
    with ExitStack() as processes:
        superlink = start(
            [str(BIN / "flower-superlink"), "--insecure", "--port", str(link)],
            env,
            tmp_path / "superlink.log",
        )
        processes.callback(stop, superlink)
        for i, port in enumerate(ports):
            node = start(
                [
                    str(BIN / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link}",
                    "--port",
                    str(port),
                    "--node-config",
                    f'user-id="user{i}"',
                ],
                env,
                tmp_path / f"supernode{i}.log",
            )
            processes.callback(stop, node)
        submitted = subprocess.run(
            [str(BIN / "flwr"), "run", str(ROOT), "deploy", "--run-config", overrides, "--stream"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            start_new_session=True,
        )
        logs = "\n".join(p.read_text()[-3000:] for p in tmp_path.glob("*.log"))
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr + logs
        deadline = time.monotonic() + 120
        while not (run_dir / "evaluation.json").is_file():
            assert time.monotonic() < deadline, submitted.stdout[-3000:] + logs
            time.sleep(0.5)

    state = json.loads((run_dir / "state.json").read_text())
    assert state["round"] == 2 and state["serving"] == "v0001"
    assert sorted(p.name for p in (run_dir / "store").iterdir()) == ["user0", "user1"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["round"], r["user"], r["status"]) for r in rows) == [
        (r, u, "trained") for r in (1, 2) for u in ("user0", "user1")
    ]
    assert superlink.poll() is not None  # stopped by pid
