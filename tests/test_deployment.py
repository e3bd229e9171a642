"""`flwr run .` for real: a local simulation, and deployments on 127.0.0.1 (a SuperLink and two
SuperNodes, one user each): insecure, and with TLS and SuperNode authentication.

Every process the tests start, or Flower starts for them, is stopped by pid at the end.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
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


def supernode_args(link: int, port: int, user: int, *tls_and_auth: str) -> list[str]:
    return [
        str(BIN / "flower-supernode"),
        *tls_and_auth,
        "--superlink",
        f"127.0.0.1:{link}",
        "--port",
        str(port),
        "--node-config",
        f'user-id="user{user}"',
    ]


def run_federation(name: str, overrides: str, env: dict, run_dir: Path, tmp_path: Path) -> None:
    """`flwr run . <name>`, then wait for the ServerApp's last evaluation."""
    submitted = subprocess.run(
        [str(BIN / "flwr"), "run", str(ROOT), name, "--run-config", overrides, "--stream"],
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


def assert_two_users_trained_two_rounds(run_dir: Path) -> None:
    state = json.loads((run_dir / "state.json").read_text())
    assert state["round"] == 2 and state["serving"] == "v0001"
    assert sorted(p.name for p in (run_dir / "store").iterdir()) == ["user0", "user1"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["round"], r["user"], r["status"]) for r in rows) == [
        (r, u, "trained") for r in (1, 2) for u in ("user0", "user1")
    ]


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
        # `flwr run` before the SuperLink listens fails on a busy machine (Flower 1.41 and 1.42)
        wait_until_listening(link, superlink, tmp_path / "superlink.log")
        for i, port in enumerate(ports):
            node = start(
                supernode_args(link, port, i, "--insecure"), env, tmp_path / f"supernode{i}.log"
            )
            processes.callback(stop, node)
        run_federation("deploy", overrides, env, run_dir, tmp_path)

    assert_two_users_trained_two_rounds(run_dir)
    assert superlink.poll() is not None  # stopped by pid


def _certificate(subject, issuer, public_key, signing_key, extensions) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate clock skew
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())


def _write_pem(path: Path, item) -> Path:
    if isinstance(item, x509.Certificate):
        path.write_bytes(item.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            item.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return path


def write_tls_files(certs: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA, and a server certificate for 127.0.0.1/localhost signed by it: every
    client (SuperNodes, `flwr`, the SuperLink's own SuperExec) verifies the link by IP."""
    certs.mkdir()
    ca_key, server_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = _certificate(
        "soppu test CA",
        "soppu test CA",
        ca_key.public_key(),
        ca_key,
        [
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (x509.KeyUsage(False, False, False, False, False, True, True, False, False), True),
            (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False),
        ],
    )
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _certificate(
        "127.0.0.1",
        "soppu test CA",
        server_key.public_key(),
        ca_key,
        [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.SubjectAlternativeName(names), False),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
            (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
        ],
    )
    return (
        _write_pem(certs / "ca.crt", ca),
        _write_pem(certs / "server.pem", server),
        _write_pem(certs / "server.key", server_key),
    )


def write_node_key(path: Path) -> Path:
    """An ECDSA P-384 key pair as `ssh-keygen -t ecdsa -b 384 -N ""` writes it: Flower reads
    the private key with load_ssh_private_key and the registered one with load_ssh_public_key."""
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    path.with_suffix(".pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return path


def wait_until_listening(port: int, process: subprocess.Popen, log: Path) -> None:
    """Uvicorn binds only after the SuperLink's lifespan has started, so an open port means
    the Control API can take registrations."""
    deadline = time.monotonic() + 120
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def register_node(public_key: Path, name: str, env: dict, tmp_path: Path) -> int:
    """`flwr supernode register <key.pub> <connection>`: with --enable-supernode-auth this, over
    the Control API, is the only way a node's key gets onto the SuperLink."""
    registered = subprocess.run(
        [str(BIN / "flwr"), "supernode", "register", str(public_key), name, "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert registered.returncode == 0, registered.stdout + registered.stderr
    # Typer's "✅ registered" line comes before the JSON object on stdout.
    return json.loads(registered.stdout[registered.stdout.index("{") :])["node-id"]


def wait_for_exit(process: subprocess.Popen, log: Path) -> int:
    deadline = time.monotonic() + 120
    while process.poll() is None:
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    return process.returncode


def test_tls_superlink_runs_registered_supernodes_and_refuses_an_unregistered_one(tmp_path):
    """The README's real deployment on 127.0.0.1: a TLS SuperLink with
    --enable-supernode-auth, two SuperNodes whose public keys `flwr supernode register` put on
    it, and a third, never registered, which the SuperLink refuses to activate."""
    link, ports = free_port(), [free_port(), free_port(), free_port()]
    ca, server_cert, server_key = write_tls_files(tmp_path / "certs")
    keys = [write_node_key(tmp_path / f"node{i}") for i in range(3)]
    home = tmp_path / "flwr-home"
    home.mkdir()
    # `flwr` talks TLS to the Control API on the same port; root-certificates must be absolute.
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "secure"\n\n'
        f'[superlink.secure]\naddress = "127.0.0.1:{link}"\nroot-certificates = "{ca}"\n'
    )
    env = flower_env(home, tmp_path)
    run_dir, overrides = tiny_overrides(tmp_path, 2)
    with ExitStack() as processes:
        superlink_log = tmp_path / "superlink.log"
        superlink = start(
            [
                *(str(BIN / "flower-superlink"), "--port", str(link)),
                *("--ssl-ca-certfile", str(ca), "--ssl-certfile", str(server_cert)),
                *("--ssl-keyfile", str(server_key), "--enable-supernode-auth"),
            ],
            env,
            superlink_log,
        )
        processes.callback(stop, superlink)
        wait_until_listening(link, superlink, superlink_log)
        node_ids = [
            register_node(key.with_suffix(".pub"), "secure", env, tmp_path) for key in keys[:2]
        ]
        assert len(set(node_ids)) == 2

        nodes = []
        for i, (key, port) in enumerate(zip(keys, ports, strict=True)):
            tls_and_auth = (
                "--root-certificates",
                str(ca),
                "--auth-supernode-private-key",
                str(key),
            )
            nodes.append(
                start(
                    supernode_args(link, port, i, *tls_and_auth),
                    env,
                    tmp_path / f"supernode{i}.log",
                )
            )
            processes.callback(stop, nodes[-1])

        # The unknown key fails ActivateNode (HTTP 412, not retried) and the node exits.
        refused_log = tmp_path / "supernode2.log"
        assert wait_for_exit(nodes[2], refused_log) != 0
        refused = refused_log.read_text()
        assert "Failed to activate SuperNode" in refused, refused[-3000:]

        run_federation("secure", overrides, env, run_dir, tmp_path)
        assert all(node.poll() is None for node in nodes[:2])  # authenticated nodes stayed up
        # The nodes that trained are the two registered ones, by the ids registration gave.
        activations = superlink_log.read_text()
        assert all(f"Activated node_id={node_id}" in activations for node_id in node_ids)

    assert_two_users_trained_two_rounds(run_dir)
    assert superlink.poll() is not None  # stopped by pid
