"""Each user's served gain on several populations, emulator mode against full mode, side by side.

    python -m experiments.populations_gains                       # every population, both modes
    python -m experiments.populations_gains --populations fortunes --publics pool --name quick
    python -m experiments.populations_gains --publics default --name defaults   # what users get
    python -m experiments.populations_gains --publics default --name drop25 \
        --emulator-flags "--drop 0.25"                  # one lever against the defaults

For every population of experiments/populations.py (Shakespeare roles, fortune files, sympy
subpackages, Django's translators, networkx's code) it runs the same federation through `soppu
simulate` (each its own Ray): once in full mode (the ceiling) and once in emulator mode per
public-text source the emulator is aligned and corrected on (`--public pool`: the embedded
Shakespeare pool; `generated`: the full model's own samples; `domain`: the text of the
population's users the federation leaves out, text of the users' kind that none of them
wrote). Nothing else differs from the defaults. Then, per run:

- what users are served (chosen on their validation text) and how they fare on held-out text:
  helped / harmed / unchanged by the paired 95% interval, the median served gain over the base
  model, beside the personal and global adapters' and full mode's;
- the targets: nobody harmed; emulator mode's served gain ≥ 60% of full mode's, and ≥ 10%
  where full mode reaches ≥ 20%;
- each emulator's KL to the full model on every population's held-out text, with its
  alignment's steps and seconds: does alignment on one source carry to the others?

Writes experiments/results/populations_gains_<name>.json and .md; a finished run folder is
read back, not run again, and a results file made with other settings is never replaced.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

from experiments.lib import RESULTS, RUNS, launch_unless_finished, pct, provenance, write_results
from experiments.populations import NAMES, bystanders, held_out_blocks, prepare
from soppu.public import default_public
from soppu.server.store import RunFolder, parse_served


def run_name(args: argparse.Namespace, population: str, mode: str, public: str) -> Path:
    suffix = "" if mode == "full" else f"-{public}"
    return RUNS / f"pop-{args.name}-{population}-{mode}{suffix}"


def resolved(population: str, public: str) -> str:
    """`default` is what a run given no `--public` uses for this population's data; `domain`
    the text of the population's users left out of the federation (the pool for the roles)."""
    if public == "domain" and population == "shakespeare":
        return "pool"
    if public != "default":
        return public
    return default_public(None if population == "shakespeare" else "own data")


def public_flag(args, population: str, public: str) -> list[str]:
    if public == "default":
        return []
    if public == "domain" and population != "shakespeare":
        return ["--public", str(bystanders(population, args.users))]
    return ["--public", resolved(population, public)]


def run_one(args, population: str, mode: str, public: str) -> dict:
    run = run_name(args, population, mode, resolved(population, public))
    extra = ["--client-mode", mode, "--local-steps", str(args.local_steps)]
    if population != "shakespeare":
        extra += ["--data", str(prepare(population))]
    if mode == "emulator":
        extra += public_flag(args, population, public)
    if mode == "emulator":
        extra += args.emulator_flags.split()
    public = resolved(population, public)
    seconds = launch_unless_finished(args, run, extra)
    folder = RunFolder(run)
    evaluation = json.loads(folder.evaluation.read_text())
    info = json.loads((folder.emulator / "soppu_emulator.json").read_text())
    return {
        "run": str(run),
        "population": population,
        "mode": mode,
        "public": public if mode == "emulator" else None,
        "command_seconds": seconds,
        "summary": evaluation["summary"],
        "users": evaluation["users"],
        "alignment": info.get("alignment"),
    }


def emulator_kl(runs: list[dict], populations: list[str], blocks: int) -> list[dict]:
    """Each emulator-mode run's emulator against the full model, on each population's held-out
    text (the first `blocks` blocks of every user's test split, pooled)."""
    from soppu import basemodel
    from soppu.alignment import measure
    from soppu.emulator import load

    base = basemodel.load()
    texts = {p: held_out_blocks(base.tokenizer, p, blocks) for p in populations}
    rows, measured = [], {}
    for run in runs:
        if run["mode"] != "emulator":
            continue
        emulator, info = load(RunFolder(Path(run["run"])).emulator)
        for population, held_out in texts.items():
            if (info.version, population) not in measured:  # runs share cached emulators
                pad = base.tokenizer.pad_token_id
                measured[info.version, population] = measure(
                    base.model, emulator, info, held_out, pad, 4
                )
            terms = measured[info.version, population]
            rows.append(
                {
                    "aligned_on": run["public"],
                    "trained_for": run["population"],
                    "text_of": population,
                    "kl": terms.kl,
                    "l2": terms.l2,
                }
            )
    return rows


def verdicts(runs: list[dict]) -> list[dict]:
    """Per population, emulator-mode source and split run: the targets against full mode's
    gain."""
    full = {r["population"]: r["summary"] for r in runs if r["mode"] == "full"}
    out = []
    for r in runs:
        if r["mode"] == "full":
            continue
        s, ceiling = r["summary"], full.get(r["population"])
        served = s["compressed_gain_median"]
        share = served / ceiling["compressed_gain_median"] if ceiling else None
        needs_ten = ceiling is not None and ceiling["compressed_gain_median"] >= 0.20
        out.append(
            {
                "population": r["population"],
                "public": r["public"],
                "harmed": s["harmed"],
                "served_gain": served,
                "share_of_full": share,
                "met": None  # no full-mode run to compare with
                if ceiling is None
                else s["harmed"] == 0 and share >= 0.6 and (served >= 0.10 or not needs_ten),
            }
        )
    return out


def _met(met: bool | None) -> str:
    return "no full-mode run" if met is None else "yes" if met else "**no**"


def markdown(result: dict) -> str:
    lines = [
        f"`{result['command']}` at {result['commit']} on {result['date']}",
        "",
        "| population | mode | public text | users | served: helped / harmed / unchanged "
        "| served (personal / blend / global / none) | median gain over base: served | personal "
        "| global | personal beats global (significantly) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        s = r["summary"]
        counts = Counter()  # by kind: "personal×0.75" is a personal adapter
        for label, n in s["served_counts"].items():
            counts[parse_served(label)[0]] += n
        lines.append(
            f"| {r['population']} | {r['mode']} | {r['public'] or '–'} | {s['users']} "
            f"| {s['helped']} / {s['harmed']} / {s['unchanged']} "
            f"| {counts['personal']} / {counts['blend']} / {counts['global']} / {counts['base']} "
            f"| **{pct(s['compressed_gain_median'])}** | {pct(s['gain_median'])} "
            f"| {pct(s['global_gain_median'])} | {s['beats_global_significantly']}/"
            f"{s['with_global']} |"
        )
    lines += [
        "",
        "| population | public text | harmed | served gain | share of full mode's | target met |",
        "|---|---|---|---|---|---|",
    ]
    for v in result["verdicts"]:
        lines.append(
            f"| {v['population']} | {v['public']} | {v['harmed']} | {pct(v['served_gain'])} "
            f"| {pct(v['share_of_full'])} | {_met(v['met'])} |"
        )
    if result["not_run"]:
        lines += ["", f"Not run (this session's time): {', '.join(result['not_run'])}."]
    lines += [
        "",
        "Alignment: the emulator's KL to the full model on each population's held-out text.",
        "",
        "| aligned on | its run's users | steps | seconds | KL on: "
        + " | ".join(result["populations"])
        + " |",
        "|---|---|---|---|" + "---|" * len(result["populations"]),
    ]
    for r in result["runs"]:
        if r["mode"] != "emulator":
            continue
        kls = {
            k["text_of"]: k["kl"]
            for k in result["kl"]
            if k["aligned_on"] == r["public"] and k["trained_for"] == r["population"]
        }
        align = r["alignment"] or {}
        steps = align.get("config", {}).get("steps", "–")
        seconds = align.get("seconds")
        lines.append(
            f"| {r['public']} | {r['population']} | {steps} | "
            f"{'–' if seconds is None else f'{seconds:.0f}'} | "
            + " | ".join(f"{kls.get(p, float('nan')):.3f}" for p in result["populations"])
            + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="main")
    parser.add_argument("--populations", default=",".join(NAMES))
    parser.add_argument(
        "--publics",
        default="pool,generated",
        help="comma-separated: pool, generated, FILE, default (what a run without --public "
        "uses), domain (the text of the population's users left out of the federation)",
    )
    parser.add_argument("--modes", default="emulator,full")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=15)
    parser.add_argument("--client-cpus", type=float, default=1.0)
    parser.add_argument(
        "--emulator-flags",
        default="",
        help="more `soppu simulate` flags for the emulator-mode runs, e.g. '--drop 0.25'",
    )
    parser.add_argument("--kl-blocks", type=int, default=4, help="held-out blocks per user")
    parser.add_argument(
        "--runs-only", action="store_true", help="run what is missing, write no results"
    )
    parser.add_argument(
        "--finished-only", action="store_true", help="read the finished runs, launch none"
    )
    args = parser.parse_args()
    args.cold = False
    settings = {k: v for k, v in vars(args).items() if k not in ("cold", "runs_only")}
    target = RESULTS / f"populations_gains_{args.name}.json"
    if target.is_file() and json.loads(target.read_text())["settings"] != settings:
        sys.exit(f"{target} holds a run of other settings; choose another --name")
    populations = args.populations.split(",")
    runs, missing = [], []
    for population in populations:
        for mode in args.modes.split(","):
            for public in args.publics.split(",") if mode == "emulator" else ["–"]:
                run = run_name(args, population, mode, resolved(population, public))
                if args.finished_only and not RunFolder(run).evaluation.is_file():
                    missing.append(run.name)
                    continue
                runs.append(run_one(args, population, mode, public))
    if args.runs_only:
        return
    result = {
        **provenance("populations_gains.py"),
        "settings": settings,
        "populations": populations,
        "runs": runs,
        "not_run": missing,
        "verdicts": verdicts(runs),
        "kl": emulator_kl(runs, populations, args.kl_blocks),
    }
    write_results(target, result, markdown(result))
    medians = [r["summary"]["compressed_gain_median"] for r in runs if r["mode"] != "full"]
    if medians:
        print(
            f"median of the emulator and split runs' served gains: {statistics.median(medians):.1%}"
        )


if __name__ == "__main__":
    main()
