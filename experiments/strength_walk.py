"""Does the served choice's strength walk choose what scoring every strength chose? And does a
wider strength grid change what anyone is served?

    python -m experiments.strength_walk
    python -m experiments.strength_walk --wide main-walk,pop-scale-sympy-emulator-generated

Recorded: every `selection.json` under runs/experiments made with three or more strengths,
before the walk, holds each candidate's validation perplexity at every strength. For each
user this replays `soppu.server.selection.strength_walk` on those numbers, applies the
choice's own rule (`choose`, significance as recorded) to what the walk visits, and compares
with the recorded choice; it also counts the loss curves on which the walk ends at the
grid's lowest.

Wide (`--wide RUNS`): each finished run copied to a scratch folder, its choice made again at
`--scales` (the walk scores a strength past the default grid only where the loss still falls)
and compared user by user with what the run serves.

Writes experiments/results/strength_walk[_<name>].json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from experiments.lib import RESULTS, RUNS, provenance, write_results
from soppu.server.config import FIELDS
from soppu.server.selection import choose, strength_walk
from soppu.server.store import served_label


def replay(entry: dict, grid: list[float]) -> tuple[str, str, list[bool]] | None:
    """(recorded choice, the walk's, per adapter kind: did the walk end at the grid's lowest);
    None where not every strength of `grid` was scored (a choice the walk itself made)."""
    perplexity = entry.get("validation", {})
    losses = {label: math.log(p) for label, p in perplexity.items()}
    kinds = [k for k in ("global", "personal") if served_label(k, 1.0) in losses]
    if len(grid) < 3 or not kinds:
        return None
    if any(served_label(k, s) not in losses for k in kinds for s in grid):
        return None
    better = {
        label
        for label, gain in entry.get("validation_gains", {}).items()
        if gain["verdict"] == "better"
    }
    visited, lowest = {"base": losses["base"]}, []
    for kind in kinds:
        curve = {s: losses[served_label(kind, s)] for s in grid}

        def score(s: float, curve: dict = curve) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.tensor([curve[s]], dtype=torch.float64), torch.tensor([1])

        walked = strength_walk(grid, score)
        visited |= {served_label(kind, s): curve[s] for s in walked}
        lowest.append(min(curve[s] for s in walked) == min(curve.values()))
    # the rule these runs chose by (before 2026-12-06): the lowest loss among the significant,
    # which `choose` applies where the personal adapter has no claim of its own
    return entry["served"], choose(visited, better & set(visited), True), lowest


def run_grid(run: Path) -> list[float]:
    """The strengths the run's choice tried (its `serve_scales`, today's default for a run made
    before the setting, as `rechoose` reads it; 1 among them)."""
    config = json.loads((run / "run.json").read_text())["config"]
    scales = config.get("serve_scales", FIELDS["serve_scales"].default)
    return sorted({float(x) for x in scales.split(",") if x.strip()} | {1.0})


def recorded() -> dict:
    rows = []
    for path in sorted(RUNS.glob("*/selection.json")):
        for user, entry in json.loads(path.read_text())["users"].items():
            found = replay(entry, run_grid(path.parent))
            if found:
                rows.append(
                    {
                        "run": path.parent.name,
                        "user": user,
                        "recorded": found[0],
                        "walk": found[1],
                        "curves_at_lowest": found[2],
                    }
                )
    return {
        "runs": len({r["run"] for r in rows}),
        "choices": len(rows),
        "same_choice": sum(r["recorded"] == r["walk"] for r in rows),
        "curves": sum(len(r["curves_at_lowest"]) for r in rows),
        "curves_at_lowest": sum(sum(r["curves_at_lowest"]) for r in rows),
        "rows": rows,
    }


def wide(names: list[str], scales: str) -> list[dict]:
    from soppu import basemodel
    from soppu.server.prepare_run import choose_users, stored_config
    from soppu.server.selection import select_served
    from soppu.server.store import RunFolder

    rows = []
    for name in names:
        with tempfile.TemporaryDirectory() as scratch:
            copy = Path(scratch) / name
            shutil.copytree(RUNS / name, copy, symlinks=True)
            run = RunFolder(copy)
            stored = stored_config(run)
            wider = replace(stored.evaluation, serve_scales=scales)
            config = replace(stored, evaluation=wider)
            before = run.selection_choices()
            base = basemodel.load(config.base_model or None)
            chosen = select_served(
                run,
                base.model,
                base.tokenizer,
                choose_users(config),
                config.judge(),
                scales=config.evaluation.scales(),
            )
            for user, entry in chosen.items():
                rows.append(
                    {
                        "run": name,
                        "user": user,
                        "default_grid": before.get(user),
                        "wide_grid": entry["served"],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(result: dict) -> str:
    r = result["recorded"]
    lines = [
        f"`{result['command']}` at {result['commit']} on {result['date']}",
        "",
        f"Recorded choices replayed: the walk chose as scoring every strength did for "
        f"**{r['same_choice']} of {r['choices']}** users ({r['runs']} runs); it ended at the "
        f"grid's lowest on {r['curves_at_lowest']} of {r['curves']} loss curves.",
    ]
    differ = [x for x in r["rows"] if x["recorded"] != x["walk"]]
    lines += [f"- differs: {x['run']} {x['user']}: {x['recorded']} → {x['walk']}" for x in differ]
    if result["wide"]:
        same = sum(x["default_grid"] == x["wide_grid"] for x in result["wide"])
        lines += [
            "",
            f"Strengths {result['scales']}: the same choice for **{same} of "
            f"{len(result['wide'])}** users.",
            "",
            "| run | user | default grid | wide grid |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {x['run']} | {x['user']} | {x['default_grid']} | {x['wide_grid']} |"
            for x in result["wide"]
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wide", default="", help="finished runs under runs/experiments")
    parser.add_argument("--scales", default="0.5,0.75,1,1.25,1.5,2")
    parser.add_argument("--name", default="")
    args = parser.parse_args()
    torch.set_num_threads(2)
    target = RESULTS / ("strength_walk" + (f"_{args.name}" if args.name else "") + ".json")
    if target.is_file() and json.loads(target.read_text())["wide_runs"] != args.wide:
        sys.exit(f"{target} holds other runs; choose another --name")
    result = {**provenance("strength_walk.py"), "wide_runs": args.wide, "scales": args.scales}
    result["recorded"] = recorded()
    result["wide"] = wide(args.wide.split(","), args.scales) if args.wide else []
    write_results(target, result, markdown(result))


if __name__ == "__main__":
    main()
