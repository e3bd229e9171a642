"""What the experiments share: where results and runs go, the provenance every results file
starts with, launching `soppu simulate` and reading the run it made, and judging adapters on
the full model."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from soppu import atomic

RESULTS = Path(__file__).parent / "results"
RUNS = Path("runs/experiments")


def provenance(script: str) -> dict[str, str]:
    """What every results file starts with: the command that made it, the commit, the date."""
    import subprocess
    from datetime import UTC, datetime

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "command": " ".join([f"python -m experiments.{Path(script).stem}", *sys.argv[1:]]),
        "commit": commit,
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }


def pct(value: float | None) -> str:
    """A share as a percentage for a results table; – where there is none."""
    return "–" if value is None else f"{value:.1%}"


def interval(gain: dict) -> str:
    """A paired gain with its 95% interval for a results table (`PairedGain.as_dict()`)."""
    return f"{pct(gain['point'])} ({pct(gain['low'])} to {pct(gain['high'])})"


def refuse_other_settings(target: Path, settings: dict) -> None:
    """Exit, naming `target`, if it holds results made with other `settings` (or with none
    recorded): a results file is never replaced by a run of another configuration."""
    if target.is_file() and json.loads(target.read_text()).get("settings") != settings:
        sys.exit(f"{target} holds results of other settings; choose another --name")


def write_results(target: Path, result: dict, text: str) -> None:
    """A results file and its Markdown beside it, each written whole; the table printed."""
    RESULTS.mkdir(exist_ok=True)
    atomic.write_text(target, json.dumps(result, indent=2) + "\n")
    atomic.write_text(target.with_suffix(".md"), text)
    print(text)


def cold_cache(into: Path) -> dict[str, str]:
    """A fresh SOPPU cache holding only links to the prepared model and data."""
    from soppu.cache import cache_dir

    into.mkdir(parents=True)
    for part in ("models", "data"):
        (into / part).symlink_to(cache_dir() / part)
    return {"SOPPU_CACHE": str(into)}


def launch(args: argparse.Namespace, run: Path, extra: list[str]) -> float:
    import tempfile

    env = {**os.environ, "CI": "true"}
    if args.cold:
        env |= cold_cache(Path(tempfile.mkdtemp(prefix="soppu-cold-")) / "cache")
    soppu = str(Path(sys.executable).with_name("soppu"))
    command = [
        soppu,
        "simulate",
        "--out",
        str(run),
        "--users",
        str(args.users),
        "--rounds",
        str(args.rounds),
        "--client-cpus",
        str(args.client_cpus),
        *extra,
    ]
    print("$", " ".join(command), flush=True)
    began = time.perf_counter()
    child = subprocess.Popen(command, env=env)
    peak = peak_tree_memory(child)
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, command)
    print(f"peak memory of the run's processes together: {peak / 2**30:.2f} GiB", flush=True)
    return time.perf_counter() - began


def peak_tree_memory(child: subprocess.Popen, every: float = 1.0) -> int:
    """Wait for `child`; the largest sum of resident memory over it and every process under
    it (Ray's workers included), sampled every `every` seconds."""
    import psutil

    root, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        total = 0
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # gone between listing and reading
                total += process.memory_info().rss
        peak = max(peak, total)
        time.sleep(every)
    return peak


def launch_unless_finished(args: argparse.Namespace, run: Path, extra: list[str]) -> float | None:
    """`launch` into `run` unless an earlier launch finished it (then None: no new timing), so
    a long comparison resumes where it stopped; an unfinished run is never reused."""
    from soppu.server.store import RunFolder

    if RunFolder(run).evaluation.is_file():
        return None
    if run.exists():
        sys.exit(f"{run} exists but is unfinished: remove it")
    return launch(args, run, extra)


def analyse(run: Path, workers: int) -> dict:
    from soppu.server.store import RunFolder
    from soppu.server.versions import Versions

    folder = RunFolder(run)
    evaluation = json.loads(folder.evaluation.read_text())
    current = Versions(folder.serving).require_current()
    report = json.loads((current / "report" / "report.json").read_text())
    rounds = folder.read_jsonl(folder.rounds)
    overhead, passes = [], []
    for r in rounds:
        if r.get("personal_pass"):  # no clients' timings in its summary: its wall only
            passes.append({"round": r["round"], "wall_s": r["seconds"], "trained": r["trained"]})
            continue
        useful = r["client_seconds"] / workers
        handler = r.get("handler_seconds", r["client_seconds"]) / workers
        server = r.get("correction_seconds", 0.0)  # the server's own work in the round
        overhead.append(
            {
                "round": r["round"],
                "wall_s": r["seconds"],
                "install_s": r["install_seconds"],
                "correction_s": r.get("correction_seconds", 0.0),
                "client_s_per_worker": useful,
                "handler_s_per_worker": handler,
                "flower_overhead": 1 - (handler + server) / r["seconds"],
                "outside_training": 1 - useful / r["seconds"],
                "trained": r["trained"],
                "failed": r["failed"],
            }
        )
    totals = report["totals"]
    return {
        "run": str(run),
        "users": evaluation["users"],
        "summary": evaluation["summary"],
        "personal_pass": passes,
        "compression": {
            "ratio": totals["ratio"],
            "params_before": totals["params_before"],
            "params_after": totals["params_after"],
            "error_mean": totals["mean"],
            "ranks": sorted({m["rank"] for m in report["modules"]}, key=str),
            "config": json.loads(folder.run_json.read_text())["config"],
        },
        "rounds": overhead,
        "workers": workers,
    }


def sweep(run: Path, ranks: list[int], bits: tuple[int, ...] = (32,)) -> list[dict]:
    """Storage ratio and share of gain kept at other shared ranks (and storage bits), on the
    same adapters."""
    from soppu.compression.compress import CompressionConfig

    configs = [CompressionConfig(rank=r, bits=b) for b in bits for r in ranks]
    return sweep_configs(run, configs)


class Judge:
    """A finished run's users' held-out text and the full model, for scoring other adapters
    for the same users against the run's own evaluation (base, global, personal)."""

    def __init__(self, run: Path):
        from soppu import basemodel
        from soppu.server.prepare_run import choose_users, stored_config
        from soppu.server.store import RunFolder

        folder = RunFolder(run)
        self.config = stored_config(folder)
        self.base = basemodel.load(self.config.base_model or None)
        self.texts = choose_users(self.config)
        rows = json.loads(folder.evaluation.read_text())["users"]
        self.evaluation = {row["user"]: row for row in rows}
        # the evaluation's own cap: a share mixing perplexities of other blocks means nothing
        self.max_eval_tokens = self.config.judge().max_eval_tokens
        self.run = run
        self._references: dict = {}  # user → the global and personal adapters' block NLLs

    def perplexity(self, user: str, lora) -> float:
        """`user`'s held-out perplexity on the full model with `lora`, on the blocks the
        run's evaluation used."""
        sums, counts = self.block_nll(user, lora)
        if int(counts.sum()) != self.evaluation[user]["tokens"]:
            raise ValueError(
                f"{self.run}: {user} scored on {int(counts.sum())} tokens, the run's evaluation "
                f"on {self.evaluation[user]['tokens']}; shares would mix other text"
            )
        return math.exp(float(sums.sum()) / int(counts.sum()))

    def block_nll(self, user: str, lora):
        """Per held-out block: the summed NLL and its tokens (`lm.block_nll`)."""
        from soppu import lm
        from soppu.personalize import attached

        tokenizer = self.base.tokenizer
        text = self.texts[user].test
        blocks = lm.token_blocks(
            tokenizer, text, self.config.training.seq_len, self.max_eval_tokens
        )
        with attached(self.base.model, lora) as model:
            return lm.block_nll(model, blocks, tokenizer.pad_token_id)

    def median_kept_interval(self, lora_of) -> dict | None:
        """The median share of the significant personal gains over the global adapter that
        `lora_of(user)` keeps, with its paired bootstrap interval (`intervals.median_share`:
        every such user's blocks resampled, global, personal and `lora_of` scored on them
        alike); None where no user's personal gain is significant."""
        from soppu.adapters import read_lora
        from soppu.intervals import median_share
        from soppu.server.store import RunFolder

        folder = RunFolder(self.run)
        global_lora = folder.global_adapter()
        if global_lora is None:  # a scheme without one: no gain over it to keep
            return None
        scored = []
        for user in self.significant_users():
            if user not in self._references:  # the run's own adapters, scored once
                global_nll = self.block_nll(user, global_lora)[0]
                personal_nll, counts = self.block_nll(user, read_lora(folder.store / user))
                self._references[user] = (global_nll, personal_nll, counts)
            global_nll, personal_nll, counts = self._references[user]
            part = self.block_nll(user, lora_of(user))[0]
            scored.append((global_nll, part, personal_nll, counts))
        return median_share(scored).as_dict() if scored else None

    def significant_users(self) -> list[str]:
        """Users whose personal adapter beats the global one significantly in the run's
        evaluation."""
        return [
            user
            for user, row in self.evaluation.items()
            if row.get("gains", {}).get("personal_over_global", {}).get("verdict") == "better"
        ]

    def shares(self, lora_of) -> dict[str, list[float]]:
        """Per user with such a gain, the share kept by `lora_of(user)` (a LoraState) of the
        personal adapter's gain over the base (`kept`), over the global adapter
        (`kept_over_global`), and over the global adapter among users whose personal gain over
        it is significant in the run's evaluation (`kept_over_global_significant`: issue 23's
        measure, where a share of a gain inside the noise means nothing)."""
        from soppu.server.evaluation import gain_kept

        shares: dict[str, list[float]] = {
            "kept": [],
            "kept_over_global": [],
            "kept_over_global_significant": [],
        }
        winners = set(self.significant_users())
        for user, row in self.evaluation.items():
            ppl = self.perplexity(user, lora_of(user))
            over_global = gain_kept(row["global"], row["personal"], ppl)
            significant = user in winners
            for key, share in (
                ("kept", gain_kept(row["base"], row["personal"], ppl)),
                ("kept_over_global", over_global),
                ("kept_over_global_significant", over_global if significant else None),
            ):
                if share is not None:
                    shares[key].append(share)
        return shares


def sweep_configs(run: Path, configs: list, intervals: bool = False) -> list[dict]:
    """The run's stored adapters re-compressed and published with each CompressionConfig;
    per config the storage ratio and the shares of both gains the published adapters keep
    (with `intervals`, the median significant share's interval too: each such user's
    published, global and personal adapters scored block by block)."""
    import shutil

    from soppu.adapters import read_lora
    from soppu.server.compression_round import compress_and_publish
    from soppu.server.store import RunFolder, snapshot

    judge = Judge(run)
    scratch = run / "sweep"
    shutil.rmtree(scratch, ignore_errors=True)
    paths = snapshot(RunFolder(run), scratch / "adapters")
    rows = []
    for i, compression in enumerate(configs):
        store = scratch / f"c{i}"
        version = compress_and_publish(paths, store, scratch / f"serving-c{i}", compression)

        def published(user: str, version: Path = version):
            return read_lora(version / "users" / user)

        shares = judge.shares(published)
        totals = json.loads((store / "manifest.json").read_text())["totals"]
        rows.append(
            {
                "rank": compression.rank,
                "energy": None if compression.rank else compression.energy,
                "bits": compression.bits,
                "ratio": totals["ratio"],
                "error_mean": totals["mean"],
                **share_summaries(shares),
                "kept_over_global_significant_interval": (
                    judge.median_kept_interval(published) if intervals else None
                ),
            }
        )
        what = f"rank {compression.rank}" if compression.rank else f"energy {compression.energy}"
        print(
            f"{what}, {compression.bits} bits: {totals['ratio']:.1f}×, "
            f"kept median {rows[-1]['kept_median']:.1%}, "
            f"over global {rows[-1]['kept_over_global_median']:.1%}",
            flush=True,
        )
    shutil.rmtree(scratch, ignore_errors=True)
    return rows


def share_summaries(shares: dict[str, list[float]]) -> dict:
    """`share_summary` of each list in `shares`, side by side."""
    return {k: v for key, values in shares.items() for k, v in share_summary(key, values).items()}


def share_summary(key: str, values: list[float]) -> dict:
    import statistics as st

    values = sorted(values)
    if not values:
        return {
            f"{key}_median": float("nan"),
            f"{key}_p25": float("nan"),
            f"{key}_min": float("nan"),
            f"{key}_users": 0,
        }
    return {
        f"{key}_median": st.median(values),
        f"{key}_p25": values[len(values) // 4],
        f"{key}_min": values[0],
        f"{key}_users": len(values),
    }
