"""The data commands: config, synth, ingest, validate, snapshot, shard and days (the whole range)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Annotated, Any

import typer

from tasks.ops.cli.common import DayOpt, ProfileOpt, SetOpt, run_stage, settings_for


def config(profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved configuration and its hash."""
    s = settings_for(profile, set_)
    typer.echo(json.dumps({"hash": s.hash(), "config": s.resolved()}, indent=2, default=str))


def synth(
    days: Annotated[int, typer.Option(min=1, max=366, help="number of days to write")] = 3,
    start: Annotated[str, typer.Option(help="first day, YYYY-MM-DD")] = "2026-11-01",
    records: Annotated[int, typer.Option(min=2, help="clean conversations per day")] = 200,
    faults: Annotated[bool, typer.Option(help="add one line of every reject kind per day")] = False,
    chatterbot: Annotated[bool, typer.Option(help="also copy the packaged chatterbot-corpus to the "
                                             "first day")] = False,
    traffic: Annotated[int, typer.Option(min=0, help="instead: N gateway request-log lines of the "
                                         "last --hours")] = 0,
    drifted: Annotated[bool, typer.Option(help="with --traffic: a shifted prompt mix the monitor "
                                          "must notice")] = False,
    hours: Annotated[float, typer.Option(min=0.01, help="with --traffic: the span the lines are "
                                         "spread over")] = 1.0,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Write synthetic raw chat logs (and the packaged chatterbot corpus) under data/raw/, or with
    --traffic synthetic gateway request logs under data/requests/ (--drifted: shifted prompts)."""
    from tasks.data.synth import synth as write_days
    from tasks.loop.traffic import traffic as write_requests

    s = settings_for(profile, set_)
    if traffic:
        run_stage(lambda: write_requests(s, traffic, drifted=drifted, hours=hours))
    else:
        run_stage(lambda: write_days(s, days, start, records, faults, chatterbot))


def ingest(day: DayOpt, profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Raw logs of one day -> data/clean/dt=DAY (parquet) + data/quarantine/dt=DAY/rejects.jsonl."""
    from tasks.data.ingest import ingest as run

    s = settings_for(profile, set_)
    run_stage(lambda: run(day, s))


def validate(day: DayOpt, profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Run the Great Expectations suite on a clean partition; fails when an expectation fails."""
    from tasks.data.validate import validate as run

    s = settings_for(profile, set_)
    run_stage(lambda: run(day, s))


def snapshot(profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Version data/clean with DVC and push it to the DVC remote."""
    from tasks.data.snapshot import snapshot as run

    s = settings_for(profile, set_)
    run_stage(lambda: run(s))


def shard(
    snapshot_hash: Annotated[str | None, typer.Option("--snapshot", help="snapshot hash "
                                                      "(default: latest)")] = None,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Train or reuse the BPE tokenizer and write train/val token shards with a manifest."""
    from tasks.data.shard import shard as run

    s = settings_for(profile, set_)
    run_stage(lambda: run(s, snapshot_hash))


def days(
    start: Annotated[str, typer.Option("--from", help="first day, YYYY-MM-DD")],
    end: Annotated[str, typer.Option("--to", help="last day, YYYY-MM-DD (inclusive)")],
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Run ingest -> validate for each day in a range, then snapshot and shard (no Airflow needed)."""
    from tasks.data.ingest import ingest as run_ingest
    from tasks.data.partition import check_day
    from tasks.data.shard import shard as run_shard
    from tasks.data.snapshot import snapshot as run_snapshot
    from tasks.data.validate import validate as run_validate

    s = settings_for(profile, set_)

    def go() -> dict[str, Any]:
        first, last = dt.date.fromisoformat(check_day(start)), dt.date.fromisoformat(check_day(end))
        out: dict[str, Any] = {"days": []}
        for i in range((last - first).days + 1):
            d = (first + dt.timedelta(days=i)).isoformat()
            out["days"].append({"ingest": run_ingest(d, s), "validate": run_validate(d, s)["success"]})
        out["snapshot"] = run_snapshot(s)
        out["shard"] = run_shard(s)
        return out

    run_stage(go)
