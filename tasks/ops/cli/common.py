"""What every command shares: the --profile, --set and --day options, the settings, and running a stage."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

import typer

from tasks.config import Settings, load_settings
from tasks.errors import ConfigError, LlmopsError

ProfileOpt = Annotated[str | None, typer.Option("--profile", "-p", help="configs/profiles/<name>.yaml "
                                                "(default tiny)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="override a config key: "
                                                  "--set ingest.max_reject_rate=0.3")]
DayOpt = Annotated[str, typer.Option("--day", "-d", help="partition date, YYYY-MM-DD")]


def settings_for(profile: str | None, overrides: list[str] | None) -> Settings:
    """The resolved settings; a bad profile, file or override exits 2 naming the key, before any work."""
    try:
        return load_settings(profile, overrides or [])
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None


def run_stage(fn: Callable[[], Any]) -> None:
    """Run a stage and print its result as JSON. A stage error (tasks/errors.py) prints its message on stderr
    and exits with its exit_code; anything else is a bug and keeps its traceback."""
    try:
        result = fn()
    except LlmopsError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    typer.echo(json.dumps(result, indent=2, default=str))
