"""`llmops`: one command per stage. Every command takes --profile and repeated --set KEY=VALUE.

    llmops synth --days 3 --faults --chatterbot
    llmops ingest --day 2026-11-01 --set ingest.max_reject_rate=0.3
    llmops validate --day 2026-11-01
    llmops snapshot
    llmops shard
    llmops config            # the resolved config and its hash

Each stage prints its result as JSON on stdout. A user error (bad config, bad input, failed
gate) prints one clear message on stderr and exits with status 2 (config) or 1 (data).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from tasks.config import Settings, load_settings
from tasks.errors import ConfigError, InputError, LlmopsError

app = typer.Typer(help="Run the stages of the chat-model lifecycle.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)

ProfileOpt = Annotated[str | None, typer.Option("--profile", "-p", help="configs/profiles/<name>.yaml "
                                                "(default tiny)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="override a config key: "
                                                  "--set ingest.max_reject_rate=0.3")]
DayOpt = Annotated[str, typer.Option("--day", "-d", help="partition date, YYYY-MM-DD")]


def _settings(profile: str | None, overrides: list[str] | None) -> Settings:
    """The resolved settings; a bad profile, file or override exits 2 naming the key, before any work."""
    try:
        return load_settings(profile, overrides or [])
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None


def _run(fn: Callable[[], Any]) -> None:
    """Run a stage and print its result as JSON. A stage error (tasks/errors.py) prints its message on stderr
    and exits with its exit_code; anything else is a bug and keeps its traceback."""
    try:
        result = fn()
    except LlmopsError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    typer.echo(json.dumps(result, indent=2, default=str))


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def config(profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved configuration and its hash."""
    s = _settings(profile, set_)
    typer.echo(json.dumps({"hash": s.hash(), "config": s.resolved()}, indent=2, default=str))


@app.command()
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

    s = _settings(profile, set_)
    if traffic:
        _run(lambda: write_requests(s, traffic, drifted=drifted, hours=hours))
    else:
        _run(lambda: write_days(s, days, start, records, faults, chatterbot))


@app.command()
def ingest(day: DayOpt, profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Raw logs of one day -> data/clean/dt=DAY (parquet) + data/quarantine/dt=DAY/rejects.jsonl."""
    from tasks.data.ingest import ingest as run

    s = _settings(profile, set_)
    _run(lambda: run(day, s))


@app.command()
def validate(day: DayOpt, profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Run the Great Expectations suite on a clean partition; fails when an expectation fails."""
    from tasks.data.validate import validate as run

    s = _settings(profile, set_)
    _run(lambda: run(day, s))


@app.command()
def snapshot(profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Version data/clean with DVC and push it to the DVC remote."""
    from tasks.data.snapshot import snapshot as run

    s = _settings(profile, set_)
    _run(lambda: run(s))


@app.command()
def shard(
    snapshot_hash: Annotated[str | None, typer.Option("--snapshot", help="snapshot hash "
                                                      "(default: latest)")] = None,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Train or reuse the BPE tokenizer and write train/val token shards with a manifest."""
    from tasks.data.shard import shard as run

    s = _settings(profile, set_)
    _run(lambda: run(s, snapshot_hash))


@app.command()
def train(
    manifest: Annotated[str | None, typer.Option(help="shards manifest.json (default: the "
                                                 "latest snapshot's)")] = None,
    resume: Annotated[bool, typer.Option(help="resume from the newest complete checkpoint of the "
                                         "same run")] = True,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Train the GPT with DeepSpeed ZeRO as real ranks; MLflow run + safetensors weights."""
    from tasks.train.launch import train as run

    s = _settings(profile, set_)
    _run(lambda: run(s, manifest, resume))


@app.command("train-pod")
def train_pod(
    manifest: Annotated[str | None, typer.Option(help="shards manifest.json the pod trains on (default: the "
                                                 "latest snapshot's)")] = None,
    run_id: Annotated[str, typer.Option(help="names the pod")] = "manual",
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Print the Kubernetes pod (YAML) chat_train starts when train.backend is kubernetes."""
    import yaml

    from tasks.data.shard import latest_manifest
    from tasks.train.k8s import as_dict
    from tasks.train.k8s import train_pod as render

    s = _settings(profile, set_)
    try:
        manifest = manifest or str(latest_manifest(s))
    except LlmopsError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    typer.echo(yaml.safe_dump(as_dict(render(s, manifest, run_id)), sort_keys=False))


@app.command()
def evaluate(
    weights: Annotated[str | None, typer.Option(help="a trained model directory (default: the latest "
                                                "run's final/)")] = None,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Run the evaluation suites on trained weights; writes metrics.json and an HTML report."""
    from tasks.judge.evaluate import evaluate as run
    from tasks.judge.registry import latest_weights

    s = _settings(profile, set_)
    _run(lambda: {k: v for k, v in run(s, weights or latest_weights(s)).items()
                  if k in ("run_id", "metrics", "slices", "report")})


@app.command()
def register(
    weights: Annotated[str | None, typer.Option(help="a trained model directory (default: the latest "
                                                "run's final/)")] = None,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Evaluate, gate against the champion, register as `challenger`; then the int8 and int4 variants
    (`challenger-int8`, `-int4`)."""
    from tasks.judge.registry import latest_weights
    from tasks.judge.release import evaluate_and_register

    s = _settings(profile, set_)
    _run(lambda: evaluate_and_register(s, weights or latest_weights(s)))


@app.command()
def distill(
    teacher: Annotated[str | None, typer.Option(help="teacher weights directory (default: a "
                                                "registered version)")] = None,
    teacher_version: Annotated[int | None, typer.Option(help="teacher: this version "
                                                        "of tracking.registered_model")] = None,
    teacher_alias: Annotated[str | None, typer.Option(help="teacher: this alias "
                                                      "(default distill.teacher_alias)")] = None,
    manifest: Annotated[str | None, typer.Option(help="shards manifest.json (default: the "
                                                 "teacher's shards)")] = None,
    register: Annotated[bool, typer.Option(help="evaluate, gate and register the student "
                                           "as distill.registered_model")] = True,
    resume: Annotated[bool, typer.Option(help="resume from the newest complete checkpoint of the "
                                         "same run")] = True,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Distill a smaller student from a teacher's logits with DeepSpeed; register it as chat-gpt-small."""
    from tasks.judge.release import distill_and_register
    from tasks.train.distill import distill as run
    from tasks.train.distill import resolve_teacher

    s = _settings(profile, set_)

    def go() -> dict:
        t = resolve_teacher(s, teacher, teacher_version, teacher_alias)
        return distill_and_register(s, t, manifest, resume) if register else run(s, t, manifest, resume)

    _run(go)


@app.command()
def reproduce(
    ref: Annotated[str, typer.Argument(help="MODEL@VERSION or MODEL@ALIAS, e.g. chat-gpt@3 "
                                       "or chat-gpt@champion")],
    workdir: Annotated[str | None, typer.Option(help="an empty directory to rebuild in (default "
                                                "var/reproduce/<model>-v<N>-<time>)")] = None,
    force: Annotated[bool, typer.Option(help="retrain even when the checked-out data is not the "
                                        "recorded snapshot")] = False,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Rebuild a registered version from its lineage (DVC snapshot, config, seed) and compare the weights."""
    from tasks.judge.reproduce import reproduce as run

    s = _settings(profile, set_)
    report: dict[str, Any] = {}

    def go() -> dict:
        report.update(run(s, ref, workdir, force))
        return report

    _run(go)
    if not report.get("identical"):
        typer.echo("not identical: differs in "
                   f"{', '.join(report.get('differs') or []) or 'no recorded input'}", err=True)
        raise typer.Exit(1)


@app.command()
def promote(
    version: Annotated[int, typer.Option(help="registered model version to make champion")],
    reason: Annotated[str, typer.Option(help="why (recorded on the version)")],
    who: Annotated[str | None, typer.Option(help="who promotes (default: the OS user)")] = None,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Point the `champion` alias at a version, recording who, why and what it replaced."""
    from tasks.judge.registry import promote as run

    s = _settings(profile, set_)
    _run(lambda: run(s, version, reason, who))


@app.command()
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

    s = _settings(profile, set_)

    def go() -> dict[str, Any]:
        first, last = dt.date.fromisoformat(check_day(start)), dt.date.fromisoformat(check_day(end))
        out: dict[str, Any] = {"days": []}
        for i in range((last - first).days + 1):
            d = (first + dt.timedelta(days=i)).isoformat()
            out["days"].append({"ingest": run_ingest(d, s), "validate": run_validate(d, s)["success"]})
        out["snapshot"] = run_snapshot(s)
        out["shard"] = run_shard(s)
        return out

    _run(go)


stack_app = typer.Typer(help="Start, stop and inspect the embedded stack (Airflow + MLflow on 127.0.0.1).",
                        no_args_is_help=True)
app.add_typer(stack_app, name="stack")


@stack_app.command("up")
def stack_up(profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Start Airflow and MLflow (what is not already running) and wait until both answer."""
    from tasks.ops import stack

    s = _settings(profile, set_)
    _run(lambda: stack.up(s))


@stack_app.command("down")
def stack_down(profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Stop everything `stack up` started."""
    from tasks.ops import stack

    s = _settings(profile, set_)
    _run(lambda: stack.down(s))


@stack_app.command("status")
def stack_status(profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Which stack processes are running, and their URLs."""
    from tasks.ops import stack

    s = _settings(profile, set_)
    _run(lambda: stack.status(s))


@app.command()
def export(
    alias: Annotated[str | None, typer.Option(help="registered alias to export, e.g. challenger")] = None,
    version: Annotated[int | None, typer.Option(help="registered version number to export")] = None,
    load: Annotated[bool, typer.Option(help="(re)load it in the running tritonserver")] = True,
    model: Annotated[str | None, typer.Option(help="registered and Triton model name, e.g. chat-gpt-small "
                                              "(the small tier)")] = None,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Write a registered version into the Triton model repository (models/triton/), and load it."""
    from tasks.serve import server
    from tasks.serve.export import export as run_export

    named = [f"tracking.registered_model={model}", f"serve.triton.model_name={model}"] if model else []
    s = _settings(profile, [*(set_ or []), *named])
    if alias is None and version is None:
        alias = "challenger"

    def go() -> dict[str, Any]:
        if load and alias is not None and version is None:
            return server.deploy(s, alias)
        return run_export(s, alias=alias, version=version)

    _run(go)


serve_app = typer.Typer(help="The model server (tritonserver) and the OpenAI-compatible gateway on "
                        "127.0.0.1.")
app.add_typer(serve_app, name="serve")


@serve_app.callback(invoke_without_command=True)
def serve(ctx: typer.Context, profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """`llmops serve` starts tritonserver (every exported model loaded) and the gateway, and waits."""
    if ctx.invoked_subcommand is None:
        from tasks.serve import server

        s = _settings(profile, set_)
        _run(lambda: server.up(s))


@serve_app.command("up")
def serve_up(profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Start tritonserver and the gateway (what is not already running) and wait until both answer."""
    from tasks.serve import server

    s = _settings(profile, set_)
    _run(lambda: server.up(s))


@serve_app.command("down")
def serve_down(profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Stop tritonserver and the gateway."""
    from tasks.serve import server

    s = _settings(profile, set_)
    _run(lambda: server.down(s))


@serve_app.command("status")
def serve_status(profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Which serving processes run, their URLs, and the versions in the repository."""
    from tasks.serve import server

    s = _settings(profile, set_)
    _run(lambda: server.status(s))


@app.command("memory-worker")
def memory_worker(profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Embed the exchanges queued for long-term session memory and store them, until stopped
    (production: serve.memory.queue a redis:// stream, serve.memory.index a postgresql:// table,
    worker_in_gateway false)."""
    import asyncio
    import logging

    from tasks.serve.memory import SessionMemory

    s = _settings(profile, set_)
    if not s.serve.memory.queue:
        typer.echo("error: serve.memory.queue is empty: the in-process queue lives in the gateway, which "
                   "embeds itself; set serve.memory.queue=redis://... for worker processes", err=True)
        raise typer.Exit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def work() -> None:
        memory = SessionMemory(s.serve.memory, s.ingest.pii_kinds, run_worker=False)
        try:
            await memory.run()
        finally:
            await memory.close()

    try:
        asyncio.run(work())
    except KeyboardInterrupt:
        pass


@app.command()
def drift(
    hours: Annotated[float | None, typer.Option(help="window of request logs "
                                                "(default monitor.window_hours)")] = None,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Drift and SLO report of the served model: request logs vs the training corpus (Evidently)."""
    from tasks.loop.drift import check

    s = _settings(profile, set_)
    _run(lambda: check(s, hours))


@app.command()
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

    s = _settings(profile, set_)
    if replay:
        _run(lambda: scaler.replay(s, replay, capacity, cold_start_s=cold_start))
    else:
        _run(lambda: scaler.autoscale(s, interval))


@app.command()
def cost(
    since_hours: Annotated[float, typer.Option(min=0.01, help="window of request logs for the "
                                               "serving cost")] = 168.0,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """$ per 1M tokens, training and serving, per registered version: reports/cost/<time>/cost.json +
    cost.html."""
    from tasks.loop.cost import cost_report

    s = _settings(profile, set_)
    _run(lambda: cost_report(s, since_hours))


@app.command("tune-serving")
def tune_serving(
    model: Annotated[str | None, typer.Option(help="Triton model to tune "
                                              "(default serve.triton.model_name)")] = None,
    version: Annotated[int | None, typer.Option(help="version the load goes to (default: the champion, else "
                                                "the newest)")] = None,
    slo_p99_ms: Annotated[float | None, typer.Option(help="p99 SLO in ms (default serve.tune.slo_p99_ms, "
                                                     "else monitor.slo_p99_ms)")] = None,
    requests: Annotated[int | None, typer.Option(min=1, help="measured requests per setting "
                                                 "(default serve.tune.requests)")] = None,
    duration: Annotated[float | None, typer.Option(min=0.1, help="instead: seconds of load "
                                                   "per setting")] = None,
    concurrency: Annotated[int | None, typer.Option(min=1, help="concurrent clients "
                                                    "(default serve.gateway.max_inflight)")] = None,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="tokens per request (default "
                                                   "serve.gateway.default_max_tokens)")] = None,
    own_server: Annotated[bool, typer.Option(help="start a private tritonserver (free loopback ports, only "
                                             "this model) instead of using the one "
                                             "`llmops serve` runs")] = False,
    apply: Annotated[bool, typer.Option(help="write the chosen values into the repository's config.pbtxt "
                                        "(and the -stream twin's) and reload them; the printed overrides "
                                        "keep them past `llmops export`")] = False,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Measure Triton batch settings (serve.tune's grid) under load; choose the highest throughput within
    the p99 SLO.

    Needs the tritonserver `llmops serve` runs, with the model loaded, or --own-server.

    Each setting is loaded with a config override; the original configuration is loaded back at the end.

    Writes reports/tune/<time>/ (tune.json, tune.png, chosen.pbtxt); exits 1 when no setting meets the SLO."""
    from tasks.serve import tune as mod

    given = {"slo_p99_ms": slo_p99_ms, "concurrency": concurrency, "max_tokens": max_tokens,
             "requests": requests}
    extra = [f"serve.tune.{k}={v}" for k, v in given.items() if v is not None]
    if duration is not None:
        extra += [f"serve.tune.duration_s={duration}", "serve.tune.requests=0"]
    s = _settings(profile, [*(set_ or []), *extra])
    report: dict[str, Any] = {}

    def go() -> dict[str, Any]:
        try:
            report.update(mod.tune_serving(s, model, version, own_server, apply))
        except KeyboardInterrupt:
            raise mod.TuneError("interrupted; the model's configuration from before was loaded "
                                "back") from None
        return mod.summary(report)

    _run(go)
    if not report["choice"]["slo_met"]:
        typer.echo(f"error: {report['choice']['reason']} (report {report['files']['json']})", err=True)
        raise typer.Exit(1)
    typer.echo("to keep it: " + " ".join(f"--set {o}" for o in report["overrides"])
               + " (or put them in configs/serve.yaml)", err=True)


rollout_app = typer.Typer(help="Canary analysis, promotion and roll-back of the served challenger.",
                          no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")


@rollout_app.command("analyze")
def rollout_analyze(
    since: Annotated[int, typer.Option(help="window: the last N minutes of request logs")] = 10,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Judge champion vs challenger on the request logs of a window (no traffic is moved)."""
    from tasks.loop import rollout

    s = _settings(profile, set_)
    def go() -> dict[str, Any]:
        out = rollout.analyze(s, dt.datetime.now(dt.UTC) - dt.timedelta(minutes=since))
        out.pop("_champion")
        return out

    _run(go)


@rollout_app.command("shadow")
def rollout_shadow(
    since: Annotated[int, typer.Option(help="window: the last N minutes of mirrored pairs")] = 10,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Score the mirrored champion/challenger pairs of a window: the shadow report (HTML + JSON)."""
    from tasks.loop import rollout

    s = _settings(profile, set_)
    _run(lambda: rollout.shadow_report(s, dt.datetime.now(dt.UTC) - dt.timedelta(minutes=since)))


@rollout_app.command("canary")
def rollout_canary(profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Walk the traffic steps of configs/rollout.yaml, judge each window, then promote or roll back."""
    from tasks.loop import rollout

    s = _settings(profile, set_)
    _run(lambda: rollout.canary(s))


@rollout_app.command("rollback")
def rollout_rollback(reason: Annotated[str, typer.Option(help="why, for the record")],
                     profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Send all traffic to the champion now and mark the challenger rejected."""
    from tasks.loop import rollout

    s = _settings(profile, set_)
    _run(lambda: rollout.rollback(s, reason, {"by": "llmops rollout rollback"}))


@rollout_app.command("drill")
def rollout_drill(version: Annotated[int, typer.Option(help="served version to slow down")],
                  delay_ms: Annotated[float, typer.Option(help="added per generated token; 0 ends "
                                                          "the drill")] = 50.0,
                  profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Make a served version slower on purpose, to rehearse an automatic roll-back."""
    from tasks.loop import rollout

    s = _settings(profile, set_)
    _run(lambda: rollout.drill(s, version, delay_ms))


@app.command()
def chat(
    model: Annotated[str, typer.Option(help="model id: chat-gpt, "
                                       "chat-gpt:champion, chat-gpt:<version>")] = "chat-gpt",
    session: Annotated[str | None, typer.Option(help="session id; the gateway keeps the turns (default: a "
                                                "new one)")] = None,
    max_tokens: Annotated[int, typer.Option(min=1)] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, max=2.0)] = 0.7,
    base_url: Annotated[str | None, typer.Option(help="gateway URL (default "
                                                 "from configs/serve.yaml)")] = None,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Chat with the served model in the terminal, tokens streamed as they come (Ctrl-D to end)."""
    import uuid

    from openai import APIConnectionError, APIStatusError, OpenAI

    from tasks.serve.server import urls

    s = _settings(profile, set_)
    url = base_url or urls(s)["gateway"]
    session = session or f"cli-{uuid.uuid4().hex[:12]}"
    from tasks.serve.gateway import auth_headers

    key = auth_headers(s).get("Authorization", "Bearer unused").removeprefix("Bearer ")
    client = OpenAI(base_url=url, api_key=key, max_retries=0)
    typer.echo(f"chatting with {model} at {url} (session {session}); Ctrl-D ends", err=True)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            typer.echo("", err=True)
            return
        if not line.strip():
            continue
        try:
            stream = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": line}], stream=True, max_tokens=max_tokens,
                temperature=temperature, extra_headers={"X-Session-Id": session})
            sys.stdout.write("bot> ")
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    sys.stdout.write(chunk.choices[0].delta.content)
                    sys.stdout.flush()
            sys.stdout.write("\n")
        except APIStatusError as e:
            typer.echo(f"error {e.status_code}: {e.message}", err=True)
        except APIConnectionError as e:
            typer.echo(f"error: cannot reach the gateway at {url} ({e}); is `llmops serve` running?",
                       err=True)
            raise typer.Exit(1) from None


@app.command()
def trigger(
    dag_id: Annotated[str, typer.Argument(help="chat_ingest, chat_train, ...")],
    conf: Annotated[str, typer.Option(help="run conf as JSON (the Trigger form's params)")] = "{}",
    wait: Annotated[bool, typer.Option(help="wait for the run to finish")] = True,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Trigger a DAG run through the running Airflow's REST API (as the UI's Trigger button does)."""
    from tasks.ops.airflow_client import AirflowClient
    from tasks.ops.stack import StackError

    s = _settings(profile, set_)
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
        state = client.wait_run(dag_id, run_id) if wait else "queued"
        out = {"dag_id": dag_id, "run_id": run_id, "state": state,
               "tasks": client.task_states(dag_id, run_id)}
        if state == "failed":
            raise StackError(f"{dag_id} run {run_id} failed: {out['tasks']}; see the task logs in the "
                             "Airflow UI")
        return out

    _run(go)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def airflow(ctx: typer.Context, profile: ProfileOpt = None) -> None:
    """Run the `airflow` CLI against this project's stack: llmops airflow backfill create --dag-id
    chat_ingest ..."""
    import subprocess

    from tasks.ops.stack import airflow_env
    from tasks.procs import venv_bin

    s = _settings(profile, [])
    raise typer.Exit(subprocess.run([venv_bin("airflow"), *ctx.args], env=airflow_env(s)).returncode)


@app.command()
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

    s = _settings(profile, set_)
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

    _run(go)


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="print it as JSON")] = False,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """One screen: what is up and where, the last runs of each DAG, champion and challenger with their
    metrics and lineage, the last drift decision, and where the reports are."""
    from tasks.ops import status as mod

    s = _settings(profile, set_)
    info = mod.collect(s)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
    else:
        mod.render(info)


@app.command()
def reports(profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Write reports/index.html, linking every report of the latest runs; print the newest of each kind."""
    from tasks.ops import reports as mod

    s = _settings(profile, set_)
    _run(lambda: mod.summary(s))


@app.command()
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

    s = _settings(profile, set_)
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


def reference() -> str:
    """The CLI reference in the README, generated from the commands' own --help (a test keeps them equal)."""
    root = typer.main.get_command(app)
    lines: list[str] = []

    def walk(cmd: Any, path: list[str]) -> None:
        if hasattr(cmd, "commands"):  # a group (typer's own click)
            if path and cmd.invoke_without_command:
                emit(cmd, path)
            for name in sorted(cmd.commands):
                sub = cmd.commands[name]
                if not sub.hidden:
                    walk(sub, [*path, name])
            return
        emit(cmd, path)

    def emit(cmd: Any, path: list[str]) -> None:
        args = [p.name.upper() for p in cmd.params if p.param_type_name == "argument"]
        opts = [p.opts[0] for p in cmd.params if p.param_type_name == "option" and p.opts[0] not in
                ("--profile", "--set", "--help")]
        first = (cmd.help or "").strip().split("\n\n")[0].replace("\n", " ")
        lines.append(f"llmops {' '.join(path)}" + "".join(f" {a}" for a in args)
                     + (f" [{' '.join(opts)}]" if opts else ""))
        lines.append(f"    {first}")

    walk(root, [])
    return "\n".join(lines) + "\n"


@app.command("cli-reference", hidden=True)
def cli_reference() -> None:
    """Print the CLI reference (the README's)."""
    typer.echo(reference(), nl=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
