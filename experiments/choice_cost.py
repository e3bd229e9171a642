"""What the served choice costs the server, with and without blends, side by side.

    python -m experiments.choice_cost --run RUN [--name NAME]

For every user of a finished run, the served choice's scoring (`select_served`'s candidates on
the user's validation text, the run's own strengths) is timed without blends and with the
blend weights of `--weights`, alternating per user so that the machine's drift falls on both alike;
nothing of the run is written. Writes experiments/results/choice_cost_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from experiments.lib import RESULTS, provenance, write_results
from soppu import basemodel, lm
from soppu.personalize import scored
from soppu.server.config import EvaluationSettings
from soppu.server.prepare_run import choose_users, stored_config
from soppu.server.selection import _candidate_scores
from soppu.server.store import RunFolder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--name", default="main")
    parser.add_argument("--weights", default="0.25,0.5,0.75", help="the blends timed")
    args = parser.parse_args()
    torch.set_num_threads(2)
    run = RunFolder(Path(args.run))
    config = stored_config(run)
    judge, base = config.judge(), basemodel.load(config.base_model or None)
    texts, shared = choose_users(config), run.global_adapter()
    blends = EvaluationSettings(serve_blends=args.weights).blends()
    settings = {"none": (), args.weights: blends}
    seconds, scorings = dict.fromkeys(settings, 0.0), dict.fromkeys(settings, 0)
    for i, user in enumerate(run.users()):
        blocks = lm.token_blocks(
            base.tokenizer, texts[user].validation, judge.seq_len, judge.max_eval_tokens
        )
        adapters = {"global": shared, "personal": run.latest(user)}
        order = list(settings) if i % 2 == 0 else list(reversed(settings))
        for label in order:
            start = time.perf_counter()
            found = _candidate_scores(
                lambda lora, blocks=blocks: scored(
                    base.model, lora, blocks, base.tokenizer.pad_token_id, judge.batch_size
                ),
                adapters,
                config.evaluation.scales(),
                settings[label],
            )
            seconds[label] += time.perf_counter() - start
            scorings[label] += len(found)
        print(f"  [{i + 1}/{len(run.users())}] {user}: {seconds}", flush=True)
    rows = {label: {"seconds": seconds[label], "scorings": scorings[label]} for label in settings}
    result = {**provenance("choice_cost"), "run": str(run.root), "users": len(run.users())}
    result["settings"] = rows
    lines = [
        f"`{result['command']}` at {result['commit']} on {result['date']}.",
        "",
        "| blends | validation scorings | seconds | seconds per scoring |",
        "|---|---|---|---|",
    ]
    for label, row in rows.items():
        per = row["seconds"] / max(1, row["scorings"])
        lines.append(f"| {label} | {row['scorings']} | {row['seconds']:.0f} | {per:.2f} |")
    write_results(RESULTS / f"choice_cost_{args.name}.json", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
