"""$ per 1M tokens, training and serving, per registered model version, as a report.

    llmops cost                       # reports/cost/<UTC time>/cost.json + cost.html; tags on each MLflow
                                      # version
    llmops cost --since-hours 24      # serving window: the last 24 h of request logs

Training, per version of `tracking.registered_model`, from the MLflow run that trained it:
  wall_h        = run end - run start: the time the training machine was held (launch, steps,
                  evaluation, checkpoints, and a retry's wait too, since a retry continues the run)
  device_hours  = wall_h x train.world_size: GPU-hours on GPU, CPU-rank-hours on CPU (from the
                  run's `llmops.device` tag; "rank-hours" where a run predates it)
  tokens        = steps x micro_batch x grad_accum x world_size x block_size (steps: the last step
                  that logged a loss; the params the run logged)
  usd           = wall_h x monitor.train_cost_per_hour_usd
  usd_per_1m    = usd / tokens x 1e6
`monitor.train_cost_per_hour_usd` is the price of the whole training MACHINE per hour, as
`serve.gateway.cost_per_hour_usd` is for serving: training is one node (world_size = ranks on
that node), rented whole whatever number of its devices a run uses; device-hours are reported
for capacity planning, not priced. An int8 variant shares its fp32 parent's run, so the same
training figures (`shares_run_with`); totals count each run once.

Serving, measured from the gateway's request logs (data/requests/dt=*/*.jsonl, as
`tasks.loop.rollout.read_requests` reads them) over the last `since_hours`:
  per version: requests, completion tokens served, busy_s = sum of request latencies (the
  request-seconds the version kept the server working), and its own serving window (first
  request start = ts - latency, to last request end = ts).
  The machine's cost over the window is cost_per_hour x span, span = first request start to last
  request end over all versions (idle time outside that span is not counted, idle gaps inside are:
  this is the cost at the measured load). It is shared between versions by busy time, so
      usd_per_1m = cost_per_hour x span_h x busy share / completion tokens x 1e6.
  With one version serving, that is cost_per_hour / (3600 x tokens/s) x 1e6 at the measured
  throughput tokens / wall time, the gateway's `gateway_cost_per_million_tokens_usd` over a
  longer window; during a canary the challenger pays for its share of the work, not the whole
  machine. Shadow mirrors (data/requests/shadow/) are not counted: no user was served by them.
"""

from __future__ import annotations

import datetime as dt
import html
import logging
from collections import defaultdict
from typing import Any

from tasks.atomic import atomic_dir, write_json
from tasks.config import Settings
from tasks.errors import InputError

log = logging.getLogger(__name__)

UNITS = {"gpu": "GPU-hours", "cpu": "CPU-rank-hours"}


class CostError(InputError):
    """Nothing to price (no runs, no request logs) or a bad price setting."""


def _per_1m(usd: float, tokens: float) -> float | None:
    return usd / tokens * 1e6 if tokens else None


# ---------------------------------------------------------------- training


def run_cost(client: Any, run_id: str, price_per_hour: float) -> dict[str, Any]:
    """The training figures of one MLflow run (see the module docstring)."""
    run = client.get_run(run_id)
    p = run.data.params
    start, end = run.info.start_time, run.info.end_time
    out: dict[str, Any] = {"run_id": run_id, "run_name": run.info.run_name, "status": run.info.status}
    if not start or not end or run.info.status != "FINISHED":
        return {**out, "note": f"run {run_id} is {run.info.status}, not finished: no cost yet"}
    try:
        world = int(p["train.world_size"])
        per_step = (int(p["train.micro_batch"]) * int(p["train.grad_accum"]) * world
                    * int(p["model.block_size"]))
    except KeyError as e:
        return {**out, "note": f"run {run_id} did not log param {e.args[0]}: tokens unknown"}
    history = client.get_metric_history(run_id, "loss")
    steps = max((m.step for m in history), default=0) or int(p.get("train.max_steps", 0))
    device = run.data.tags.get("llmops.device", "")
    wall_h = (end - start) / 3.6e6
    usd = wall_h * price_per_hour
    tokens = steps * per_step
    step_tps = run.data.metrics.get("summary.tokens_per_s")
    return {**out, "device": device or "unknown", "world_size": world, "steps": steps,
            "tokens_per_step": per_step, "tokens": tokens, "wall_h": round(wall_h, 6),
            "device_hours": round(wall_h * world, 6),
            "device_hours_unit": UNITS.get(device, "rank-hours"), "usd": round(usd, 6),
            "usd_per_1m_tokens": _round(_per_1m(usd, tokens)),
            # the steps alone at their logged throughput: the gap to usd_per_1m_tokens is the overhead
            "step_tokens_per_s": step_tps, "usd_per_1m_tokens_steps_only": _round(
                price_per_hour / (step_tps * 3600) * 1e6 if step_tps else None),
            "started": _iso(start / 1e3), "ended": _iso(end / 1e3)}


def training_costs(settings: Settings) -> dict[str, dict[str, Any]]:
    """{version: training figures} for every version of the registered model (none registered: {})."""
    from tasks.tracking import mlflow_client

    client = mlflow_client(settings)
    name = settings.tracking.registered_model
    versions = client.search_model_versions(f"name='{name}'")
    by_run: dict[str, list[str]] = defaultdict(list)
    for v in versions:
        if v.run_id:
            by_run[v.run_id].append(str(v.version))
    runs = {r: run_cost(client, r, settings.monitor.train_cost_per_hour_usd) for r in by_run}
    out = {}
    for v in sorted(versions, key=lambda v: int(v.version)):
        base = {"variant": v.tags.get("variant", ""), "aliases": sorted(getattr(v, "aliases", []) or [])}
        if not v.run_id:
            out[str(v.version)] = {**base, "note": "no training run recorded on this version"}
            continue
        others = [x for x in by_run[v.run_id] if x != str(v.version)]
        out[str(v.version)] = {**base, **runs[v.run_id], **({"shares_run_with": others} if others else {})}
    return out


# ---------------------------------------------------------------- serving


def serving_costs(settings: Settings, since: dt.datetime, until: dt.datetime) -> dict[str, Any]:
    """Per-version serving figures from the request logs in [since, until) (see the module docstring)."""
    from tasks.loop.rollout import read_requests

    price = settings.serve.gateway.cost_per_hour_usd
    acc: dict[str, dict[str, Any]] = {}
    for r in read_requests(settings, since, until):
        if r.get("version") is None:
            continue  # refused before routing (bad request): no model did any work
        end = dt.datetime.fromisoformat(r["ts"]).timestamp()
        latency_s = float(r.get("latency_ms") or 0.0) / 1e3
        a = acc.setdefault(str(r["version"]), {"requests": 0, "ok": 0, "errors": 0, "prompt_tokens": 0,
                                               "completion_tokens": 0, "busy_s": 0.0,
                                               "first": end - latency_s, "last": end})
        status = int(r.get("status", 200))
        a["requests"] += 1
        a["ok"] += status == 200
        a["errors"] += status >= 500
        a["prompt_tokens"] += int(r.get("prompt_tokens") or 0)
        a["completion_tokens"] += int(r.get("completion_tokens") or 0)
        a["busy_s"] += latency_s
        a["first"], a["last"] = min(a["first"], end - latency_s), max(a["last"], end)
    if not acc:
        return {"window": {"since": since.isoformat(), "until": until.isoformat()}, "versions": {},
                "note": f"no request logs under {settings.paths.requests} in the window"}
    first, last = min(a["first"] for a in acc.values()), max(a["last"] for a in acc.values())
    span_s = last - first
    machine_usd = price * span_s / 3600
    busy_total = sum(a["busy_s"] for a in acc.values())
    versions = {}
    for v, a in sorted(acc.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0):
        wall_s = a["last"] - a["first"]
        share = a["busy_s"] / busy_total if busy_total else 1 / len(acc)
        usd = machine_usd * share
        versions[v] = {k: a[k] for k in ("requests", "ok", "errors", "prompt_tokens",
                                         "completion_tokens")} | {
            "busy_s": round(a["busy_s"], 3), "wall_s": round(wall_s, 3), "first": _iso(a["first"]),
            "last": _iso(a["last"]),
            "tokens_per_s": _round(a["completion_tokens"] / wall_s if wall_s > 0 else None),
            "busy_share": round(share, 6), "usd": round(usd, 6),
            "usd_per_1m_tokens": _round(_per_1m(usd, a["completion_tokens"]))}
    tokens = sum(a["completion_tokens"] for a in acc.values())
    return {"window": {"since": since.isoformat(), "until": until.isoformat()}, "cost_per_hour_usd": price,
            "span_s": round(span_s, 3), "usd": round(machine_usd, 6), "completion_tokens": tokens,
            "usd_per_1m_tokens": _round(_per_1m(machine_usd, tokens)), "versions": versions}


# ---------------------------------------------------------------- the report


def cost_report(settings: Settings, since_hours: float = 168.0,
                now: dt.datetime | None = None) -> dict[str, Any]:
    """Training and serving $/1M tokens per version -> reports/cost/<UTC time>/{cost.json, cost.html},
    and `cost.*` tags on each MLflow model version."""
    if since_hours <= 0:
        raise InputError(f"since_hours must be > 0, got {since_hours}")
    now = now or dt.datetime.now(dt.UTC)
    train = training_costs(settings)
    serve = serving_costs(settings, now - dt.timedelta(hours=since_hours), now)
    report = {"generated": now.isoformat(timespec="seconds"),
              "registered_model": settings.tracking.registered_model,
              "prices": {"train_machine_usd_per_hour": settings.monitor.train_cost_per_hour_usd,
                         "serve_machine_usd_per_hour": settings.serve.gateway.cost_per_hour_usd},
              "train": train, "serve": serve, "totals": _totals(train, serve)}
    out_dir = settings.paths.reports_dir / "cost" / now.strftime("%Y%m%dT%H%M%SZ")
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "cost.json", report)
        (tmp / "cost.html").write_text(_html(report))
    report["report"] = str(out_dir / "cost.json")
    report["html"] = str(out_dir / "cost.html")
    _tag_versions(settings, train, serve, report["report"])
    for v, t in train.items():
        log.info("version %s: training %s $/1M tokens (%s %s), serving %s $/1M tokens", v,
                 t.get("usd_per_1m_tokens"), t.get("device_hours"), t.get("device_hours_unit"),
                 serve["versions"].get(v, {}).get("usd_per_1m_tokens"))
    return report


def _totals(train: dict[str, dict[str, Any]], serve: dict[str, Any]) -> dict[str, Any]:
    runs = {t["run_id"]: t for t in train.values() if "usd" in t}  # each run once
    usd = sum(t["usd"] for t in runs.values())
    tokens = sum(t["tokens"] for t in runs.values())
    return {"train_runs": len(runs), "train_usd": round(usd, 6), "train_tokens": tokens,
            "train_usd_per_1m_tokens": _round(_per_1m(usd, tokens)),
            "serve_usd": serve.get("usd", 0.0), "serve_completion_tokens": serve.get("completion_tokens", 0),
            "serve_usd_per_1m_tokens": serve.get("usd_per_1m_tokens")}


def _tag_versions(settings: Settings, train: dict[str, dict[str, Any]], serve: dict[str, Any],
                  report: str) -> None:
    """The headline figures as tags on each model version, beside its eval.* and gate tags."""
    if not train:
        return
    from tasks.tracking import mlflow_client

    client = mlflow_client(settings)
    name = settings.tracking.registered_model
    for v, t in train.items():
        tags = {"cost.report": report}
        if t.get("usd_per_1m_tokens") is not None:
            tags |= {"cost.train_usd": f"{t['usd']:.6g}",
                     "cost.train_usd_per_1m_tokens": f"{t['usd_per_1m_tokens']:.6g}",
                     "cost.train_device_hours": f"{t['device_hours']:.6g} {t['device_hours_unit']}"}
        s = serve["versions"].get(v, {})
        if s.get("usd_per_1m_tokens") is not None:
            tags |= {"cost.serve_usd_per_1m_tokens": f"{s['usd_per_1m_tokens']:.6g}",
                     "cost.serve_tokens_per_s": f"{s['tokens_per_s']:.6g}"}
        for k, val in tags.items():
            client.set_model_version_tag(name, v, k, val)


def _html(report: dict[str, Any]) -> str:
    def cell(x: Any) -> str:
        if isinstance(x, float):
            x = f"{x:.6g}"
        elif isinstance(x, list):
            x = ", ".join(map(str, x))
        return f"<td>{html.escape('' if x is None else str(x))}</td>"

    def table(title: str, rows: dict[str, dict[str, Any]], cols: list[str]) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in ["version", *cols])
        body = "".join(f"<tr>{cell(v)}{''.join(cell(r.get(c)) for c in cols)}</tr>" for v, r in rows.items())
        return (f"<h2>{html.escape(title)}</h2><table><tr>{head}</tr>"
                f"{body or '<tr><td>none</td></tr>'}</table>")

    p, s = report["prices"], report["serve"]
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>llmops cost report</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}"
        "</style></head><body>"
        f"<h1>Cost per 1M tokens: {html.escape(report['registered_model'])}</h1>"
        f"<p>Generated {html.escape(report['generated'])}. "
        f"Training machine ${p['train_machine_usd_per_hour']:g}/h, "
        f"serving machine ${p['serve_machine_usd_per_hour']:g}/h (whole machines; see tasks/loop/cost.py for "
        "how each figure is measured).</p>"
        + table("Training", report["train"], ["variant", "aliases", "run_name", "device", "world_size",
                                              "steps", "tokens", "wall_h", "device_hours",
                                              "device_hours_unit", "usd", "usd_per_1m_tokens",
                                              "usd_per_1m_tokens_steps_only", "shares_run_with", "note"])
        + table(f"Serving ({s['window']['since']} to {s['window']['until']})", s["versions"],
                ["requests", "ok", "errors", "completion_tokens", "busy_s", "wall_s", "tokens_per_s",
                 "busy_share", "usd", "usd_per_1m_tokens"])
        + "<h2>Totals</h2><table>"
        + "".join(f"<tr><th>{html.escape(k)}</th>{cell(v)}</tr>" for k, v in report["totals"].items())
        + "</table></body></html>\n")


def _round(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else round(x, digits)


def _iso(epoch_s: float) -> str:
    return dt.datetime.fromtimestamp(epoch_s, dt.UTC).isoformat(timespec="milliseconds")
