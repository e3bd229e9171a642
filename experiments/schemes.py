"""Every scheme side by side on several populations: is the personal part personal?

    python -m experiments.schemes                                   # every population, emulator
    python -m experiments.schemes --populations fortunes --modes emulator,full
    python -m experiments.schemes --schemes fedavg-ft,local --users 4 --name quick

For each population of experiments/populations.py and each client mode it runs the same
federation through `soppu simulate` once per scheme (`fedavg-ft`, `ditto`, `fedsa`, `local`,
`local-prox`, `pass`: fedavg-ft with a final personal pass of `--pass-steps`, and `ditto@P` or
`local-prox@P`: at prox P), each with the defaults
users get otherwise and the same client budget (users, rounds, local steps). Then, on the full
model and each user's held-out text (the blocks the runs' own evaluation scores):

- per scheme, every user's personal adapter against that scheme's own global adapter, and
  against one common reference, fedavg-ft's global adapter (paired 95% bootstrap intervals);
  the median with a bootstrap interval over users; how many users it beats significantly;
- what users are served, helped / harmed by the served-over-base interval;
- the users whose purely local adapter beats fedavg-ft's global adapter significantly, and
  whether each scheme's personal adapter beats it too and keeps ≥ 80% of local's margin
  (each share with its paired interval, `soppu.intervals.paired_share`: a share is below
  80% only where its personal adapter's gain is below 0.8 times local's significantly);
- the client's cost from the runs' own replies: seconds per local step (its checks included,
  both tracks of a two-track scheme) and the client process's peak memory.

Writes experiments/results/schemes_<name>.json and .md; finished run folders are read back,
not run again, and a results file made with other settings is never replaced.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from pathlib import Path

from experiments.lib import RESULTS, RUNS, launch_unless_finished, pct, provenance, write_results
from experiments.populations import NAMES, prepare
from soppu.server.store import RunFolder

SCHEMES = ("fedavg-ft", "ditto", "fedsa", "local", "local-prox", "pass")
REFERENCE = "fedavg-ft"  # whose global adapter every scheme is also compared with
KEEP_OF_LOCAL = 0.8


def run_path(args: argparse.Namespace, population: str, mode: str, scheme: str) -> Path:
    return RUNS / f"schemes-{args.name}-{population}-{mode}-{scheme.replace('@', '-prox')}"


def scheme_flags(scheme: str, pass_steps: int) -> list[str]:
    """`pass`: fedavg-ft and a final personal pass; `ditto@P`, `local-prox@P`: at prox P."""
    if scheme == "pass":
        return ["--scheme", "fedavg-ft", "--personal-pass", str(pass_steps)]
    name, _, prox = scheme.partition("@")
    return ["--scheme", name, *(["--prox", prox] if prox else [])]


def launch(args: argparse.Namespace, population: str, mode: str, scheme: str) -> Path:
    run = run_path(args, population, mode, scheme)
    extra = ["--client-mode", mode, "--local-steps", str(args.local_steps)]
    if population != "shakespeare":
        extra += ["--data", str(prepare(population))]
    launch_unless_finished(args, run, extra + scheme_flags(scheme, args.pass_steps))
    return run


def client_cost(run: Path) -> dict:
    """Mean seconds per local step and the largest peak memory the clients reported."""
    rows = [
        r for r in RunFolder(run).read_jsonl(RunFolder(run).metrics) if r.get("status") == "trained"
    ]
    steps = [r["step-seconds"] for r in rows if "step-seconds" in r]
    peaks = [r["peak-rss-mib"] for r in rows if "peak-rss-mib" in r]
    return {
        "step_s": statistics.mean(steps) if steps else None,
        "peak_rss_mib": max(peaks) if peaks else None,
    }


def median_interval(points: list[float], seed: int = 0, resamples: int = 2000) -> dict:
    """The median of per-user gains with a percentile bootstrap interval over users."""
    rng = random.Random(seed)
    medians = sorted(
        statistics.median(rng.choices(points, k=len(points))) for _ in range(resamples)
    )
    return {
        "median": statistics.median(points),
        "low": medians[int(0.025 * resamples)],
        "high": medians[int(0.975 * resamples) - 1],
    }


def score_population(runs: dict[str, Path]) -> tuple[dict, dict]:
    """Per scheme and user: the personal adapter's gain over fedavg-ft's global adapter, paired
    on the blocks the runs' evaluation scored; and, for every user whose local adapter beats
    that global one significantly, the share of local's margin each scheme keeps."""
    from soppu import basemodel, lm
    from soppu.intervals import paired_gain, paired_share
    from soppu.personalize import scored
    from soppu.server.prepare_run import choose_users, stored_config

    reference = RunFolder(runs[REFERENCE])
    config = stored_config(reference)
    judge = config.judge()
    base = basemodel.load(config.base_model or None)
    texts = choose_users(config)
    reference_global = reference.global_adapter()
    gains: dict[str, dict[str, dict]] = {scheme: {} for scheme in runs}
    shares: dict[str, dict[str, dict]] = {scheme: {} for scheme in runs}
    for seed, user in enumerate(sorted(reference.users())):
        blocks = lm.token_blocks(
            base.tokenizer, texts[user].test, judge.seq_len, judge.max_eval_tokens
        )

        def score(lora, blocks=blocks):
            return scored(base.model, lora, blocks, base.tokenizer.pad_token_id, judge.batch_size)

        nll_global, counts = score(reference_global)
        nll = {}
        for scheme, run in runs.items():
            personal = RunFolder(run).latest(user)
            if personal is not None:
                nll[scheme] = score(personal)[0]
                gains[scheme][user] = paired_gain(
                    nll_global, nll[scheme], counts, seed=seed
                ).as_dict()
        if gains.get("local", {}).get(user, {}).get("verdict") == "better":
            for scheme, mine in nll.items():
                share = paired_share(nll_global, mine, nll["local"], counts, seed=seed)
                shares[scheme][user] = share.as_dict()
        print(f"  scored {user}", flush=True)
    return gains, shares


def summarise(
    scheme: str, run: Path, over_reference: dict[str, dict], local: dict, kept: dict
) -> dict:
    """One scheme's row; `kept`: the share of local's margin it keeps, per local winner."""
    evaluation = json.loads(RunFolder(run).evaluation.read_text())
    users, s = evaluation["users"], evaluation["summary"]
    own = [
        u["gains"]["personal_over_global"] for u in users if "personal_over_global" in u["gains"]
    ]
    ref = list(over_reference.values())
    winners = [u for u, g in local.items() if g["verdict"] == "better"]
    return {
        "scheme": scheme,
        "run": str(run),
        "users": s["users"],
        "helped": s["helped"],
        "harmed": s["harmed"],
        "served_counts": s["served_counts"],
        "served_gain_median": s["compressed_gain_median"],
        "personal_gain_median": s["gain_median"],
        "global_gain_median": s["global_gain_median"],
        "over_own_global": median_interval([g["point"] for g in own]) if own else None,
        "over_own_global_better": sum(g["verdict"] == "better" for g in own),
        "over_own_global_worse": sum(g["verdict"] == "worse" for g in own),
        "over_reference": median_interval([g["point"] for g in ref]) if ref else None,
        "over_reference_better": sum(g["verdict"] == "better" for g in ref),
        "over_reference_worse": sum(g["verdict"] == "worse" for g in ref),
        "local_winners": len(winners),
        "local_winners_beaten": sum(over_reference[u]["verdict"] == "better" for u in kept),
        "local_winners_kept": sum(k["point"] >= KEEP_OF_LOCAL for k in kept.values()),
        "local_winners_kept_significantly_below": sum(
            k["high"] < KEEP_OF_LOCAL for k in kept.values()
        ),
        "kept_of_local": kept,
        "per_user_over_reference": over_reference,
        **client_cost(run),
    }


def interval(m: dict | None) -> str:
    return "–" if m is None else f"{m['median']:.1%} [{m['low']:.1%}, {m['high']:.1%}]"


def kept_table(rows: list[dict]) -> list[str]:
    """Each local winner's share of local's margin per scheme, with its paired interval."""
    winners = sorted({u for r in rows for u in r["kept_of_local"]})
    if not winners:
        return []
    schemes = [r for r in rows if r["scheme"] != "local"]
    lines = [
        "Share of the local adapter's margin over fedavg-ft's global adapter that each scheme's "
        "personal adapter keeps, per user whose local adapter beats it significantly "
        "[paired 95% bootstrap interval, by test inversion]:",
        "",
        "| user | " + " | ".join(r["scheme"] for r in schemes) + " |",
        "|---|" + "---|" * len(schemes),
    ]
    for user in winners:
        cells = []
        for r in schemes:
            k = r["kept_of_local"].get(user)
            cells.append(
                "–" if k is None else f"{k['point']:.0%} [{_share(k['low'])}, {_share(k['high'])}]"
            )
        lines.append(f"| {user} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _share(bound: float) -> str:
    return "−∞" if bound == -math.inf else "∞" if bound == math.inf else f"{bound:.0%}"


def markdown(result: dict) -> str:
    lines = [f"`{result['command']}` at {result['commit']} on {result['date']}", ""]
    for block in result["populations"]:
        lines += [
            f"**{block['population']}, {block['mode']} mode** ({block['rows'][0]['users']} users; "
            f"personal over global: median of the users' paired gains [95% bootstrap over users]; "
            f"b/w: users significantly better / worse)",
            "",
            "| scheme | served over base | helped / harmed | personal over its global | b / w "
            f"| personal over {REFERENCE}'s global | b / w | local winners beaten / kept ≥ 80% "
            "| s per step | peak MiB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in block["rows"]:
            step = "–" if r["step_s"] is None else f"{r['step_s']:.2f}"
            peak = "–" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}"
            lines.append(
                f"| {r['scheme']} | {pct(r['served_gain_median'])} | {r['helped']} / {r['harmed']} "
                f"| {interval(r['over_own_global'])} "
                f"| {r['over_own_global_better']} / {r['over_own_global_worse']} "
                f"| {interval(r['over_reference'])} "
                f"| {r['over_reference_better']} / {r['over_reference_worse']} "
                f"| {r['local_winners_beaten']} / {r['local_winners_kept']} "
                f"of {r['local_winners']} "
                f"| {step} | {peak} |"
            )
        lines += ["", *kept_table(block["rows"])]
    if result["not_run"]:
        lines.append(f"Not run: {', '.join(result['not_run'])}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="main")
    parser.add_argument("--populations", default=",".join(NAMES))
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--modes", default="emulator")
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=15)
    parser.add_argument("--pass-steps", type=int, default=30, help="the `pass` scheme's cap")
    parser.add_argument("--client-cpus", type=float, default=1.0)
    parser.add_argument("--finished-only", action="store_true", help="launch nothing")
    args = parser.parse_args()
    args.cold = False
    schemes = args.schemes.split(",")
    if REFERENCE not in schemes:
        sys.exit(f"--schemes must include {REFERENCE}: every scheme is compared with its global")
    settings = {k: v for k, v in vars(args).items() if k not in ("cold", "finished_only")}
    target = RESULTS / f"schemes_{args.name}.json"
    if target.is_file() and json.loads(target.read_text())["settings"] != settings:
        sys.exit(f"{target} holds a run of other settings; choose another --name")
    blocks, missing = [], []
    for population in args.populations.split(","):
        for mode in args.modes.split(","):
            runs = {}
            for scheme in schemes:
                run = run_path(args, population, mode, scheme)
                if args.finished_only and not RunFolder(run).evaluation.is_file():
                    missing.append(run.name)
                    continue
                runs[scheme] = launch(args, population, mode, scheme)
            if REFERENCE not in runs:
                continue
            print(f"scoring {population}, {mode} mode", flush=True)
            gains, shares = score_population(runs)
            local = gains.get("local", {})
            rows = [summarise(s, run, gains[s], local, shares[s]) for s, run in runs.items()]
            blocks.append({"population": population, "mode": mode, "rows": rows})
    result = {
        **provenance("schemes.py"),
        "settings": settings,
        "populations": blocks,
        "not_run": missing,
    }
    write_results(target, result, markdown(result))


if __name__ == "__main__":
    main()
