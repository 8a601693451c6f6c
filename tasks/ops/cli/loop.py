"""The closed-loop commands: the `rollout` group, drift, autoscale and cost."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

import typer

from tasks.ops.cli.common import ProfileOpt, SetOpt, run_stage, settings_for

rollout_app = typer.Typer(help="Canary analysis, promotion and roll-back of the served challenger.",
                          no_args_is_help=True)


@rollout_app.command("analyze")
def rollout_analyze(
    since: Annotated[int, typer.Option(help="window: the last N minutes of request logs")] = 10,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Judge champion vs challenger on the request logs of a window (no traffic is moved)."""
    from tasks.loop import rollout

    s = settings_for(profile, set_)
    def go() -> dict[str, Any]:
        out = rollout.analyze(s, dt.datetime.now(dt.UTC) - dt.timedelta(minutes=since))
        out.pop("_champion")
        return out

    run_stage(go)


@rollout_app.command("shadow")
def rollout_shadow(
    since: Annotated[int, typer.Option(help="window: the last N minutes of mirrored pairs")] = 10,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Score the mirrored champion/challenger pairs of a window: the shadow report (HTML + JSON)."""
    from tasks.loop import rollout

    s = settings_for(profile, set_)
    run_stage(lambda: rollout.shadow_report(s, dt.datetime.now(dt.UTC) - dt.timedelta(minutes=since)))


@rollout_app.command("canary")
def rollout_canary(profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Walk the traffic steps of configs/rollout.yaml, judge each window, then promote or roll back."""
    from tasks.loop import rollout

    s = settings_for(profile, set_)
    run_stage(lambda: rollout.canary(s))


@rollout_app.command("rollback")
def rollout_rollback(reason: Annotated[str, typer.Option(help="why, for the record")],
                     profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Send all traffic to the champion now and mark the challenger rejected."""
    from tasks.loop import rollout

    s = settings_for(profile, set_)
    run_stage(lambda: rollout.rollback(s, reason, {"by": "llmops rollout rollback"}))


@rollout_app.command("drill")
def rollout_drill(version: Annotated[int, typer.Option(help="served version to slow down")],
                  delay_ms: Annotated[float, typer.Option(help="added per generated token; 0 ends "
                                                          "the drill")] = 50.0,
                  profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Make a served version slower on purpose, to rehearse an automatic roll-back."""
    from tasks.loop import rollout

    s = settings_for(profile, set_)
    run_stage(lambda: rollout.drill(s, version, delay_ms))


def drift(
    hours: Annotated[float | None, typer.Option(help="window of request logs "
                                                "(default monitor.window_hours)")] = None,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Drift and SLO report of the served model: request logs vs the training corpus (Evidently)."""
    from tasks.loop.drift import check

    s = settings_for(profile, set_)
    run_stage(lambda: check(s, hours))


def autoscale(
    interval: Annotated[float, typer.Option(min=0.1, help="seconds between the two scrapes that rates are "
                                            "taken over")] = 5.0,
    replay: Annotated[str | None, typer.Option(help="instead: replay a load curve CSV (t_s,arrival_rps) "
                                               "through the policy")] = None,
    capacity: Annotated[float, typer.Option(help="with --replay: requests/s one instance serves")] = 4.0,
    cold_start: Annotated[float, typer.Option(help="with --replay: seconds a cold instance takes "
                                              "to load")] = 60.0,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Serving signals (Triton + gateway metrics) and the scale-out/in recommendation; logged to
    reports/autoscale/."""
    from tasks.loop import autoscale as scaler

    s = settings_for(profile, set_)
    if replay:
        run_stage(lambda: scaler.replay(s, replay, capacity, cold_start_s=cold_start))
    else:
        run_stage(lambda: scaler.autoscale(s, interval))


def latency(
    since_hours: Annotated[float, typer.Option(min=0.01, help="window of request logs")] = 24.0,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Latency by phase (gateway, network, queue, prefill, decode) at p50/p90/p99 of the served requests:
    reports/latency/<time>/latency.json + latency.png."""
    from tasks.loop import latency as lat

    s = settings_for(profile, set_)
    run_stage(lambda: lat.summary(lat.latency_report(s, since_hours)))


def cost(
    since_hours: Annotated[float, typer.Option(min=0.01, help="window of request logs for the "
                                               "serving cost")] = 168.0,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """$ per 1M tokens, training and serving, per registered version: reports/cost/<time>/cost.json +
    cost.html."""
    from tasks.loop.cost import cost_report

    s = settings_for(profile, set_)
    run_stage(lambda: cost_report(s, since_hours))
