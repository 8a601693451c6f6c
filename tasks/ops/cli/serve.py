"""The serving commands: export, the `serve` group, memory-worker, tune-serving and chat."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from tasks.ops.cli.common import ProfileOpt, SetOpt, run_stage, settings_for


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
    s = settings_for(profile, [*(set_ or []), *named])
    if alias is None and version is None:
        alias = "challenger"

    def go() -> dict[str, Any]:
        if load and alias is not None and version is None:
            return server.deploy(s, alias)
        return run_export(s, alias=alias, version=version)

    run_stage(go)


serve_app = typer.Typer(help="The model server (tritonserver) and the OpenAI-compatible gateway on "
                        "127.0.0.1.")


@serve_app.callback(invoke_without_command=True)
def serve(ctx: typer.Context, profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """`llmops serve` starts tritonserver (every exported model loaded) and the gateway, and waits."""
    if ctx.invoked_subcommand is None:
        from tasks.serve import server

        s = settings_for(profile, set_)
        run_stage(lambda: server.up(s))


@serve_app.command("up")
def serve_up(profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Start tritonserver and the gateway (what is not already running) and wait until both answer."""
    from tasks.serve import server

    s = settings_for(profile, set_)
    run_stage(lambda: server.up(s))


@serve_app.command("down")
def serve_down(profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Stop tritonserver and the gateway."""
    from tasks.serve import server

    s = settings_for(profile, set_)
    run_stage(lambda: server.down(s))


@serve_app.command("status")
def serve_status(profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Which serving processes run, their URLs, and the versions in the repository."""
    from tasks.serve import server

    s = settings_for(profile, set_)
    run_stage(lambda: server.status(s))


def memory_worker(profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Embed the exchanges queued for long-term session memory and store them, until stopped
    (production: serve.memory.queue a redis:// stream, serve.memory.index a postgresql:// table,
    worker_in_gateway false)."""
    import asyncio
    import logging

    from tasks.serve.memory import SessionMemory

    s = settings_for(profile, set_)
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
    apply: Annotated[bool, typer.Option(help="write the chosen values into the model's config.pbtxt in the "
                                        "repository and reload it; the printed overrides keep them past "
                                        "`llmops export`")] = False,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Measure the serving engine's batch settings (serve.tune's grid) under load; choose the highest
    throughput within the p99 SLO.

    Needs the tritonserver `llmops serve` runs, with the model loaded, or --own-server.

    The grid is max_seqs x max_batch_tokens x instances (serve.engine, serve.triton). Each setting is loaded
    with a config override; the original configuration is loaded back at the end.

    Writes reports/tune/<time>/ (tune.json, tune.png, chosen.pbtxt); exits 1 when no setting meets the SLO."""
    from tasks.serve import tune as mod

    given = {"slo_p99_ms": slo_p99_ms, "concurrency": concurrency, "max_tokens": max_tokens,
             "requests": requests}
    extra = [f"serve.tune.{k}={v}" for k, v in given.items() if v is not None]
    if duration is not None:
        extra += [f"serve.tune.duration_s={duration}", "serve.tune.requests=0"]
    s = settings_for(profile, [*(set_ or []), *extra])
    report: dict[str, Any] = {}

    def go() -> dict[str, Any]:
        try:
            report.update(mod.tune_serving(s, model, version, own_server, apply))
        except KeyboardInterrupt:
            raise mod.TuneError("interrupted; the model's configuration from before was loaded "
                                "back") from None
        return mod.summary(report)

    run_stage(go)
    if not report["choice"]["slo_met"]:
        typer.echo(f"error: {report['choice']['reason']} (report {report['files']['json']})", err=True)
        raise typer.Exit(1)
    typer.echo("to keep it: " + " ".join(f"--set {o}" for o in report["overrides"])
               + " (or put them in configs/serve.yaml)", err=True)


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

    s = settings_for(profile, set_)
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
