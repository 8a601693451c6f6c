"""The operating commands: the `stack` group, trigger, airflow, backfill, status, reports, lifecycle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from tasks.errors import InputError, LlmopsError
from tasks.ops.cli.common import ProfileOpt, SetOpt, run_stage, settings_for

stack_app = typer.Typer(help="Start, stop and inspect the embedded stack (Airflow + MLflow on 127.0.0.1).",
                        no_args_is_help=True)


@stack_app.command("up")
def stack_up(profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Start Airflow and MLflow (what is not already running) and wait until both answer."""
    from tasks.ops import stack

    s = settings_for(profile, set_)
    run_stage(lambda: stack.up(s))


@stack_app.command("down")
def stack_down(profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Stop everything `stack up` started."""
    from tasks.ops import stack

    s = settings_for(profile, set_)
    run_stage(lambda: stack.down(s))


@stack_app.command("status")
def stack_status(profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Which stack processes are running, and their URLs."""
    from tasks.ops import stack

    s = settings_for(profile, set_)
    run_stage(lambda: stack.status(s))


@stack_app.command("supervise")
def stack_supervise(
    settings_file: Annotated[Path | None, typer.Option(help="the settings `up` wrote (var/run/supervisor."
                                                      "settings.json); else --profile and --set")] = None,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Restart any server of the stack that dies, with backoff, until stopped (`stack up` and `serve up`
    start it in the background; `stack status` shows its restarts)."""
    from tasks.config import Settings
    from tasks.ops.supervisor import supervise

    s = (Settings.model_validate_json(settings_file.read_text()) if settings_file
         else settings_for(profile, set_))
    supervise(s)


def trigger(
    dag_id: Annotated[str, typer.Argument(help="chat_ingest, chat_train, ...")],
    conf: Annotated[str, typer.Option(help="run conf as JSON (the Trigger form's params)")] = "{}",
    wait: Annotated[bool, typer.Option(help="wait for the run to finish")] = True,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Trigger a DAG run through the running Airflow's REST API (as the UI's Trigger button does)."""
    from tasks.ops.airflow_client import AirflowClient
    from tasks.ops.stack import StackError

    s = settings_for(profile, set_)
    try:
        params = json.loads(conf)
    except json.JSONDecodeError as e:
        typer.echo(f"error: --conf is not JSON: {e}", err=True)
        raise typer.Exit(2) from None

    def go() -> dict[str, Any]:
        client = AirflowClient(s)
        client.wait_for_dag(dag_id)
        client.unpause(dag_id)
        run_id = client.trigger(dag_id, params)
        state = client.waitrun_stage(dag_id, run_id) if wait else "queued"
        out = {"dag_id": dag_id, "run_id": run_id, "state": state,
               "tasks": client.task_states(dag_id, run_id)}
        if state == "failed":
            raise StackError(f"{dag_id} run {run_id} failed: {out['tasks']}; see the task logs in the "
                             "Airflow UI")
        return out

    run_stage(go)


# `airflow` passes every argument after it on to the airflow CLI
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def airflow(ctx: typer.Context, profile: ProfileOpt = None) -> None:
    """Run the `airflow` CLI against this project's stack: llmops airflow backfill create --dag-id
    chat_ingest ..."""
    import subprocess

    from tasks.ops.stack import airflow_env
    from tasks.procs import venv_bin

    s = settings_for(profile, [])
    raise typer.Exit(subprocess.run([venv_bin("airflow"), *ctx.args], env=airflow_env(s)).returncode)


def backfill(
    start: Annotated[str, typer.Option("--from", help="first logical date, YYYY-MM-DD")],
    end: Annotated[str, typer.Option("--to", help="last logical date, YYYY-MM-DD (inclusive)")],
    dag_id: Annotated[str, typer.Option("--dag", help="DAG to backfill")] = "chat_ingest",
    reprocess: Annotated[str, typer.Option(help="re-run days that already ran: none, failed "
                                           "or completed")] = "completed",
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Backfill a DAG over past days through Airflow's backfill API and wait for it."""
    from tasks.data.partition import check_day
    from tasks.ops.airflow_client import AirflowClient
    from tasks.ops.stack import StackError

    s = settings_for(profile, set_)
    if reprocess not in ("none", "failed", "completed"):
        typer.echo("error: --reprocess must be none, failed or completed", err=True)
        raise typer.Exit(2)

    def go() -> dict[str, Any]:
        client = AirflowClient(s)
        client.wait_for_dag(dag_id)
        client.unpause(dag_id)
        bf = client.backfill(dag_id, check_day(start), check_day(end), reprocess)
        runs = client.wait_backfill(dag_id, bf)
        if any(v != "success" for v in runs.values()):
            raise StackError(f"backfill {bf} of {dag_id}: {runs}")
        return {"dag_id": dag_id, "backfill_id": bf, "runs": runs}

    run_stage(go)


def status(
    as_json: Annotated[bool, typer.Option("--json", help="print it as JSON")] = False,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """One screen: what is up and where, the last runs of each DAG, champion and challenger with their
    metrics and lineage, the last drift decision, and where the reports are."""
    from tasks.ops import status as mod

    s = settings_for(profile, set_)
    info = mod.collect(s)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
    else:
        mod.render(info)


def reports(profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Write reports/index.html, linking every report of the latest runs; print the newest of each kind."""
    from tasks.ops import reports as mod

    s = settings_for(profile, set_)
    run_stage(lambda: mod.summary(s))


def lifecycle(
    start: Annotated[str, typer.Option("--from", help="first sample day, YYYY-MM-DD")] = "2026-11-01",
    end: Annotated[str, typer.Option("--to", help="last sample day: ingested as the new day after the "
                                     "first training")] = "2026-11-03",
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """What `make run` runs: start the stack and drive ingest -> train -> deploy -> new day -> retrain ->
    canary -> monitor through Airflow's REST API, with a live view; unchanged stages are skipped."""
    from tasks.data.partition import check_day
    from tasks.ops import status as status_mod
    from tasks.ops.lifecycle import lifecycle as make

    s = settings_for(profile, set_)
    try:
        if check_day(start) >= check_day(end):
            raise InputError(f"--from {start} must be before --to {end}")
        lc = make(s, start, end)
        result = lc.run()
    except LlmopsError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted; the stack and any started DAG runs go on. `make run` again picks up from "
                   "there, `make stop` ends it all", err=True)
        raise typer.Exit(130) from None
    lc.console.print(f"\nlifecycle done in {result['seconds'] / 60:.1f} min "
                     f"(history: {lc.history_path}; `make run` again skips what is unchanged)\n")
    status_mod.render(status_mod.collect(s), lc.console)
