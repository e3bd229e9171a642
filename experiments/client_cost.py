"""What runs cost their clients, and what the client's emulator says of the user's next text.

    python -m experiments.client_cost --runs RUN[,RUN...] --name NAME

Read from each run's `metrics.jsonl` (what every node reported with its adapter), per run:
the median over users of the emulator's held-out loss on the user's text before and after
round 1's training (before: the emulator the node trains on with the fresh adapter, so a
repaired emulator shows here), the repair's seconds where the node repaired, how many repairs
were kept, the steps each took and the share of the emulator's loss gap to the full model on
the user's validation text each closed (a checked repair: `soppu.repair`), each round's
median handler seconds (all a node's work for its reply: finding data and emulator, repair,
training and its own checks), and the largest peak resident memory a client process reported
(in simulation one process serves several nodes, so this is the heaviest process's).

Writes experiments/results/client_cost_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from experiments.lib import RESULTS, provenance, write_results
from soppu.repair import gap_closed
from soppu.server.store import RunFolder


def closed(reply: dict) -> float:
    """The share of the emulator's loss gap to the full model a repair closed on the
    validation text (`soppu.repair.RepairCheck.closed`; the runs made at 5549aa0 lack it)."""
    if "repair-check-closed" in reply:
        return reply["repair-check-closed"]
    return gap_closed(*(reply[f"repair-check-{k}"] for k in ("before", "after", "full")))


def cost(path: Path) -> dict:
    run = RunFolder(path)
    rows = [r for r in run.read_jsonl(run.metrics) if r.get("status") == "trained"]
    first = [r for r in rows if r["round"] == 1]
    rounds = sorted({r["round"] for r in rows})
    repairs = [r["repair-seconds"] for r in rows if "repair-seconds" in r]
    return {
        "run": path.name,
        "users": len(first),
        "emulator_loss_before": statistics.median(r["eval-loss-before"] for r in first),
        "emulator_loss_after": statistics.median(r["eval-loss-after"] for r in first),
        "repair_seconds": statistics.median(repairs) if repairs else None,
        "repaired": len(repairs),
        # a checked repair (since 846ca90): kept where it lowers the validation loss
        "kept": sum(r.get("repair-kept", 1) == 1 for r in rows if "repair-seconds" in r),
        "repair_steps_taken": sorted(
            int(r["repair-steps-taken"]) for r in rows if "repair-steps-taken" in r
        ),
        "repair_closed": sorted(closed(r) for r in rows if "repair-check-full" in r),
        "handler_seconds": {
            str(n): statistics.median(r["handler-seconds"] for r in rows if r["round"] == n)
            for n in rounds
        },
        "peak_rss_mib": max((r.get("peak-rss-mib", 0.0) for r in rows), default=0.0),
    }


def markdown(result: dict) -> str:
    rounds = sorted({n for r in result["runs"] for n in r["handler_seconds"]}, key=int)
    lines = [
        f"`{result['command']}` at {result['commit']} on {result['date']}.",
        "",
        "| run | users | emulator's held-out loss, round 1: before → after training | "
        "repair s (users) | kept | steps taken | gap closed on validation text | "
        + " | ".join(f"handler s, round {n}" for n in rounds)
        + " | peak client RSS |",
        "|---|---|---|---|---|---|---|" + "---|" * len(rounds) + "---|",
    ]
    for r in result["runs"]:
        repair = "–" if r["repair_seconds"] is None else f"{r['repair_seconds']:.0f}"
        handlers = " | ".join(
            f"{r['handler_seconds'][n]:.0f}" if n in r["handler_seconds"] else "–" for n in rounds
        )
        steps = ", ".join(str(n) for n in r.get("repair_steps_taken", [])) or "–"
        gains = ", ".join(f"{g:.0%}" for g in r.get("repair_closed", [])) or "–"
        lines.append(
            f"| {r['run']} | {r['users']} | {r['emulator_loss_before']:.3f} → "
            f"{r['emulator_loss_after']:.3f} | {repair} ({r['repaired']}) | "
            f"{r.get('kept', r['repaired'])} | {steps} | {gains} | {handlers} | "
            f"{r['peak_rss_mib'] / 1024:.1f} GiB |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="finished runs, comma-separated")
    parser.add_argument("--name", required=True, help="results file suffix")
    args = parser.parse_args()
    result = {
        **provenance("client_cost"),
        "runs": [cost(Path(p)) for p in args.runs.split(",")],
    }
    write_results(RESULTS / f"client_cost_{args.name}.json", result, markdown(result))


if __name__ == "__main__":
    main()
