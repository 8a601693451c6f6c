"""`llmops serve`: tritonserver and the gateway as background processes of the embedded stack.

    llmops serve             # start both (what is not running), load every exported model, wait
    llmops serve status
    llmops serve down

Each runs in its own process group with its pid in var/run/ (as `llmops stack` does); logs go to
var/log/. With `serve.memory.worker_in_gateway` false (a Redis queue), a third process embeds the
session memories: `llmops memory-worker`. The stack's supervisor restarts any of them that dies.
`deploy` exports a registered version and (re)loads it in the running server.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tasks.config import PROJECT_DIR, Settings
from tasks.procs import (
    Component,
    alive,
    ensure_supervisor,
    spawn,
    stop_groups,
    supervision,
    supervision_lock,
    unsupervised,
    watch,
)
from tasks.serve import triton
from tasks.serve.export import export
from tasks.serve.repository import served_versions

log = logging.getLogger(__name__)

COMPONENTS = ("tritonserver", "gateway", "memory-worker")


def urls(settings: Settings) -> dict[str, str]:
    h, t, g = settings.stack.host, settings.serve.triton, settings.serve.gateway
    return {"gateway": f"http://{h}:{g.port}/v1", "triton_http": f"{h}:{t.http_port}",
            "triton_grpc": f"{h}:{t.grpc_port}", "triton_metrics": f"http://{h}:{t.metrics_port}/metrics"}


def _tier_names(settings: Settings) -> list[str]:
    """The Triton models the gateway routes to: the main one, and the small tier's when routing is on."""
    names, r = [settings.serve.triton.model_name], settings.serve.routing
    return names + [r.small_model] if r.enabled and r.small_model not in names else names


def _models(settings: Settings) -> tuple[str, ...]:
    """Every tier's model that has an exported version."""
    repo = settings.paths.triton_repository
    return tuple(n for n in _tier_names(settings) if served_versions(repo, n))


def components(settings: Settings) -> dict[str, Component]:
    """How to start each serving process: what `up` starts and the supervisor restarts. tritonserver
    loads every tier's exported model at start."""
    from tasks.serve.gateway import auth_headers

    logs = settings.paths.var_dir / "log"
    env = {**os.environ, "LLMOPS_ROOT": str(settings.paths.root), "LLMOPS_PROFILE": settings.profile,
           "NO_PROXY": "127.0.0.1,localhost"}
    out = {"tritonserver": triton.component(settings, models=_models(settings),
                                            log=logs / "tritonserver.log"),
           "gateway": Component("gateway", [sys.executable, "-m", "tasks.serve.gateway", "--profile",
                                            settings.profile], env, logs / "gateway.log", PROJECT_DIR,
                                (f"{urls(settings)['gateway']}/models",), headers=auth_headers(settings))}
    if _separate_worker(settings):
        out["memory-worker"] = Component("memory-worker", [sys.executable, "-m", "tasks", "memory-worker",
                                                           "--profile", settings.profile],
                                         env, logs / "memory-worker.log", PROJECT_DIR)
    return out


def up(settings: Settings, timeout: float | None = None) -> dict[str, Any]:
    """Start what is not running (a tritonserver that does not answer is started afresh), load the tiers
    exported since, wait until the gateway answers, and leave the supervisor watching. A server that
    cannot be reached is a TritonError, never a traceback."""
    try:
        return _up(settings, timeout or settings.serve.triton.startup_timeout_s)
    except httpx.HTTPError as e:
        raise triton.TritonError(f"a serving process did not answer ({type(e).__name__}: {e}); see "
                                 f"{settings.paths.var_dir / 'log'}, then `llmops serve up` again") from None


def _up(settings: Settings, timeout: float) -> dict[str, Any]:
    (settings.paths.var_dir / "run").mkdir(parents=True, exist_ok=True)
    started = []
    u = urls(settings)
    with supervision_lock(settings):  # the supervisor restarts nothing meanwhile
        if alive(settings, "tritonserver") and not _answers(f"http://{u['triton_http']}/v2/health/live"):
            # its group outlived it (a kill -9 leaves the backend stubs behind) or it hangs: start afresh
            log.warning("tritonserver's process group is there but the server does not answer: restarting it")
            stop_groups(settings, ["tritonserver"], grace=5.0)
            started.append("tritonserver (restarted)")
        comps = components(settings)
        for name, c in comps.items():
            watch(settings, name)
            if not alive(settings, name):
                spawn(settings, c)
                started.append(name)
    ensure_supervisor(settings)
    if "tritonserver" not in started:  # a tier exported since the server started (e.g. the small model)
        for m in _models(settings):
            if httpx.get(f"http://{u['triton_http']}/v2/models/{m}/ready", timeout=5.0).status_code != 200:
                triton.load(u["triton_http"], m, headers=triton.admin_headers(settings))
    triton.wait_ready(u["triton_http"], timeout, _models(settings), comps["tritonserver"].log)
    wait_gateway(u["gateway"], timeout, comps["gateway"].log, comps["gateway"].headers)
    return {"started": started, **u, "models": list(_models(settings))}


def _separate_worker(settings: Settings) -> bool:
    m = settings.serve.memory
    return bool(m.enabled and m.queue and not m.worker_in_gateway)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=3.0).status_code == 200
    except httpx.HTTPError:
        return False


def wait_gateway(base: str, timeout: float, log: Path, headers: dict[str, str] | None = None) -> None:
    """Wait until the gateway at `base` (…/v1) answers /models; raise with the end of its log if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/models", timeout=3.0, headers=headers).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise triton.TritonError(f"the gateway did not answer {base}/models within {timeout:.0f}s; "
                             f"log {log}:\n{tail}")


def down(settings: Settings) -> dict[str, Any]:
    """Stop the serving processes; the supervisor first, so that it does not start them again."""
    with unsupervised(settings, list(COMPONENTS)):
        return {"stopped": stop_groups(settings, list(COMPONENTS), grace=15.0)}


def status(settings: Settings) -> dict[str, Any]:
    repo = settings.paths.triton_repository
    names = [n for n in COMPONENTS if n != "memory-worker" or _separate_worker(settings)]
    return {"running": {n: bool(alive(settings, n)) for n in names}, **urls(settings),
            "supervisor": supervision(settings, names),
            "versions": served_versions(repo, settings.serve.triton.model_name),
            "tiers": {n: served_versions(repo, n) for n in _tier_names(settings)}}


def reload(settings: Settings, models: tuple[str, ...]) -> None:
    """(Re)load models in the running tritonserver through its repository API and wait until ready."""
    http, admin = urls(settings)["triton_http"], triton.admin_headers(settings)
    for m in models:
        triton.load(http, m, headers=admin)
    triton.wait_ready(http, settings.serve.triton.startup_timeout_s, models)


def deploy(settings: Settings, alias: str = "challenger") -> dict[str, Any]:
    """Export the version `alias` names and, if the server is up, (re)load it with its streaming twin."""
    out = export(settings, alias=alias)
    if alive(settings, "tritonserver"):
        reload(settings, tuple(out["models"]))
        out["loaded"] = True
    else:
        out["loaded"] = False
    return out


def smoke(settings: Settings, model: str, version: int) -> dict[str, Any]:
    """One greedy chat completion through the gateway, pinned to `model:version`: the exported version
    answers through the whole serving path. Raises on any non-2xx answer."""
    from tasks.serve.gateway import auth_headers

    body = {"model": f"{model}:{version}", "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "Hello, can you help me?"}]}
    t0 = time.perf_counter()
    r = httpx.post(f"{urls(settings)['gateway']}/chat/completions", json=body, timeout=120,
                   headers=auth_headers(settings))
    r.raise_for_status()
    out = r.json()
    result = {"reply": out["choices"][0]["message"]["content"], "usage": out["usage"],
              "latency_ms": round((time.perf_counter() - t0) * 1e3, 1),
              "version": r.headers["x-model-version"]}
    log.info("smoke test: %s", result)
    return result
