"""A finished run's served choice made again at today's settings, then a compression round.

    python -m experiments.rechoose RUN && soppu compress --run RUN
    python -m experiments.rechoose RUN --serve-scales 0.5,0.75,1,1.25,1.5,2

A run made before a change to the served choice (the strengths of `--serve-scales`, say)
serves what the old rule chose. To compare it user by user with a run made after the change
(`experiments/compare_runs.py`) without conflating the two, this scores its users' candidates
on their validation text by today's rule (soppu/server/selection.py, the run's own settings,
today's defaults for any it lacks; `--serve-scales` instead of the run's strengths) and
rewrites RUN/selection.json; `soppu compress --run RUN` then compresses and publishes what it
names.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from soppu import basemodel
from soppu.server.prepare_run import choose_users, served_choice, stored_config
from soppu.server.store import RunFolder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--serve-scales", default="", help="instead of the run's own")
    args = parser.parse_args()
    run = RunFolder(args.run)
    config = stored_config(run)
    if args.serve_scales:
        scales = replace(config.evaluation, serve_scales=args.serve_scales)
        config = replace(config, evaluation=scales)
    base = basemodel.load(config.base_model or None)
    users = choose_users(config)
    select = served_choice(run, config, base, users, print)
    if select is None:
        raise SystemExit(f"{run.root}: the served choice needs the users' validation text")
    chosen = select()
    print({user: entry["served"] for user, entry in chosen.items()})


if __name__ == "__main__":
    main()
