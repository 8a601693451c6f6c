"""`llmops`: one command per stage. Every command takes --profile and repeated --set KEY=VALUE.

    llmops synth --days 3 --faults --chatterbot
    llmops ingest --day 2026-11-01 --set ingest.max_reject_rate=0.3
    llmops validate --day 2026-11-01
    llmops snapshot
    llmops shard
    llmops config            # the resolved config and its hash

Each stage prints its result as JSON on stdout. A user error (bad config, bad input, failed
gate) prints one clear message on stderr and exits with status 2 (config) or 1 (data).

The commands live by topic: common.py (the shared options, settings and stage runner), data.py, model.py,
serve.py, loop.py, stack.py and docs.py (the README's CLI reference). They are registered on `app` here, in
one place, in the order `llmops --help` lists them.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from tasks.ops.cli import data, docs, loop, model, serve, stack

app = typer.Typer(help="Run the stages of the chat-model lifecycle.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# `llmops --help` lists the commands in this order, then the groups (stack, serve, rollout).
for command in (data.config, data.synth, data.ingest, data.validate, data.snapshot, data.shard,
                model.train, model.train_pod, model.evaluate, model.register, model.distill, model.reproduce,
                model.promote, model.safety_calibrate,
                data.days, serve.export, serve.memory_worker, loop.drift, loop.autoscale,
                loop.cost, loop.latency, serve.tune_serving, serve.chat, stack.trigger):
    app.command()(command)  # named after the function: train_pod -> train-pod
app.command(context_settings=stack.PASS_THROUGH)(stack.airflow)
for command in (stack.backfill, stack.status, stack.reports, stack.lifecycle):
    app.command()(command)
app.command("cli-reference", hidden=True)(docs.cli_reference)

app.add_typer(stack.stack_app, name="stack")
app.add_typer(serve.serve_app, name="serve")
app.add_typer(loop.rollout_app, name="rollout")


def reference() -> str:
    """The CLI reference in the README, generated from the commands' own --help (a test keeps them equal)."""
    return docs.reference_of(typer.main.get_command(app))


def main() -> None:
    app()


__all__ = ["app", "main", "reference"]
