"""The Flower ServerApp: prepare the run, drive the rounds, compress and publish, evaluate.

`flwr run .` reads the config from `[tool.flwr.app.config]` (and `--run-config`); `soppu
simulate` builds the same app around a config of its own with `server_app(config, ...)`.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from soppu.basemodel import set_threads
from soppu.data import DataError
from soppu.server.config import FederationConfig
from soppu.server.evaluation import evaluate_run, summary_lines
from soppu.server.federation import Log, run_federation
from soppu.server.prepare_run import choose_users, load_base, prepare, resolve_config
from soppu.server.tracking import track


def federate(grid: Grid, config: FederationConfig, *, resume: bool, log: Log) -> dict[str, Any]:
    """The whole server side of a run; returns the final evaluation (or the state)."""
    set_threads(config.threads or None)
    config = resolve_config(config, resume=resume)
    base = load_base(config)
    fed = prepare(config, base, log)
    state = run_federation(grid, fed)
    if not config.evaluation.final_evaluation:
        return state
    try:
        users = choose_users(config)
    except DataError as exc:
        log(f"no evaluation after the run: the server cannot read the users' text ({exc})")
        return state
    log(f"evaluating {len(fed.run.users())} users on the full model")
    result = evaluate_run(
        fed.run,
        base.model,
        base.tokenizer,
        users,
        config.judge(),
        lambda user, done, total: log(f"  evaluate [{done + 1}/{total}] {user}"),
    )
    track(fed.run, config.sinks())
    for line in summary_lines(result["summary"]):
        log(line)
    log(f"per-user table: {fed.run.root / 'evaluation.md'}")
    return result


def server_app(config: FederationConfig, *, resume: bool = False, log: Log = print) -> ServerApp:
    """A ServerApp bound to `config` (for `soppu simulate` and tests)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        federate(grid, config, resume=resume, log=log)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    values = dict(context.run_config)
    resume = bool(values.pop("resume", False))
    config = FederationConfig.from_run_config(values)
    logger = logging.getLogger("flwr")
    federate(grid, config, resume=resume, log=lambda line: logger.info(line))
