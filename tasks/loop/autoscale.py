"""Autoscaling: the live serving signals, a scale-out / scale-in policy, and a replay of a load curve.

    llmops autoscale                          # scrape twice 5 s apart, print signals + recommendation as JSON
    llmops autoscale --interval 10
    llmops autoscale --replay tests/data/load_curve.csv   # the policy over a recorded day, no server needed

Signals come from two scrapes, `interval_s` apart, of Triton's Prometheus endpoint
(:{serve.triton.metrics_port}/metrics) and the gateway's (:{serve.gateway.port}/metrics): counters
only mean something as rates, so every rate is a difference of the two scrapes over the measured
time between them. Queue depth is what waits now: Triton's pending requests plus the gateway's
admission queue.

`recommend()` is a pure function of the signals, the current instance count, the config
(`serve.autoscale`) and the time of the last change; `simulate()` replays a load curve through a
fluid queue model calling it every step, so the policy is tested on a day of traffic in
milliseconds. Nothing here changes the running server: the recommendation is advice (appended to
reports/autoscale/recommendations.jsonl) for a person, a DAG, or an orchestrator that sets
`serve.triton.instances` (or a Kubernetes HPA fed these signals).

The policy, in order:
  1. bounds: below min_instances or above max_instances -> move to the bound at once.
  2. scale out when the queue per instance exceeds scale_out_queue_per_instance, or utilisation
     exceeds target_utilization. Target: enough instances that utilisation falls to the target
     (ceil(busy instance-equivalents / target_utilization)) and, on a queue trigger, that the queue
     per instance falls to its threshold; at least one more, at most max_instances. A queue
     trigger BYPASSES the cooldown (a burst must not wait five minutes); a utilisation-only
     trigger respects it.
  3. scale in, ONE instance at a time, when utilisation < scale_in_utilization, the queue is
     empty, the cooldown has passed, and the remaining instances would stay at or below the target
     utilisation (so a scale-in is never undone by the next scale-out).
  4. otherwise hold.
Warm pool: every decision says how many extra instances to keep loaded and idle
(`warm_pool`, but never past max_instances), so the next scale-out is instant instead of a cold
model load.
"""

from __future__ import annotations

import bisect
import csv
import datetime as dt
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from tasks.config import AutoscaleConfig, Settings
from tasks.errors import InputError, ServiceError

log = logging.getLogger(__name__)

Action = Literal["scale_out", "scale_in", "hold"]
# {sample name: [(labels, value), ...]} of one scrape
Scrape = dict[str, list[tuple[dict[str, str], float]]]


class AutoscaleError(ServiceError):
    """A signal could not be read (server down, not Prometheus text) or a load curve is malformed."""


# ---------------------------------------------------------------- signals


def scrape(url: str, timeout_s: float = 5.0) -> Scrape:
    """One GET of a Prometheus text endpoint, parsed by prometheus_client."""
    import httpx

    try:
        r = httpx.get(url, timeout=timeout_s)
        r.raise_for_status()
    except httpx.HTTPError as e:
        raise AutoscaleError(f"cannot read metrics from {url} ({e}); "
                             "is the server up? (`llmops serve status`)") from None
    return parse(r.text, url)


def parse(text: str, source: str = "metrics") -> Scrape:
    """Prometheus text exposition -> {sample name: [(labels, value)]}, a counter's samples under its
    name without `_total`: Triton writes `nv_inference_count`, prometheus_client writes
    `gateway_tokens_total`, and the parser adds `_total` to the first kind; one key for both."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Scrape = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                name = s.name.removesuffix("_total") if family.type == "counter" else s.name
                out.setdefault(name, []).append((dict(s.labels), float(s.value)))
    except ValueError as e:
        raise AutoscaleError(f"{source} is not Prometheus text format: {e}") from None
    return out


def _by_pool(s: Scrape, name: str, models: set[str]) -> dict[tuple[str, str], float]:
    return {(lab.get("model", ""), lab.get("version", "")): v
            for lab, v in s.get(name, []) if lab.get("model") in models}


def _sum_by_pool(s: Scrape, name: str, models: set[str]) -> dict[tuple[str, str], float]:
    """Like _by_pool, summed over the series of one pool (the engine's metrics carry an instance label)."""
    out: dict[tuple[str, str], float] = {}
    for lab, v in s.get(name, []):
        if lab.get("model") in models:
            key = (lab.get("model", ""), lab.get("version", ""))
            out[key] = out.get(key, 0.0) + v
    return out


def _delta(a: float, b: float) -> float:
    return b - a if b >= a else b  # a counter that went down was reset (server restart): count from zero


def _sum(s: Scrape, name: str, **labels: str) -> float:
    return sum(v for lab, v in s.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def derive(triton_a: Scrape, triton_b: Scrape, gateway_a: Scrape, gateway_b: Scrape, elapsed_s: float,
           settings: Settings) -> dict[str, Any]:
    """The signals from two scrapes `elapsed_s` apart (pure; `signals()` does the HTTP).

    Triton keeps one instance pool per (model, version): `chat-gpt` and the small tier's model, each
    version loaded with `serve.triton.instances` instances. Per pool:
      busy_s      = Δnv_inference_compute_infer_duration_us × Δexec_count / Δrequest_success
                    (Triton adds a batch's compute time to EVERY request in the batch, so the raw
                    counter over-counts busy time by the mean batch size; this divides it back out)
      utilization = busy_s / (elapsed_s × instances)       busy share per instance
      batch_fill  = Δnv_inference_count / Δexec_count / max_batch_size
    A pool served by the continuous-batching engine (its `llmops_engine_*` series are on Triton's
    metrics) is measured by the engine instead, since its execute() only hands requests over:
      busy_s      = Δllmops_engine_busy_seconds (time spent stepping, all instances)
      mean_batch  = Δllmops_engine_decode_tokens / Δllmops_engine_steps (sequences per step)
      batch_fill  = mean_batch / serve.engine.max_seqs
      waiting, running, kv_use: the engine's gauges at the second scrape (kv_use: the fullest instance)
    The headline `utilization` and `batch_fill` are the busiest pool's: scaling is for the pool
    that saturates first (capped at 1; the pools keep the raw figure). `queue_depth` = Triton
    pending + the engines' waiting requests (all pools, at the second scrape) + the gateway's
    admission queue (same).
    `tokens_per_s` = Δgateway_tokens_total{kind="completion"} / elapsed_s: the gauge
    `gateway_tokens_per_second` keeps its last value when traffic stops, so it is reported raw only.
    """
    t = settings.serve.triton
    if elapsed_s <= 0:
        raise InputError(f"elapsed_s must be > 0, got {elapsed_s}")
    r = settings.serve.routing
    models = {t.model_name} | ({r.small_model} if r.enabled else set())  # each served tier is a pool
    names = {"requests": "nv_inference_request_success", "inferences": "nv_inference_count",
             "executions": "nv_inference_exec_count",
             "compute_infer_us": "nv_inference_compute_infer_duration_us",
             "request_us": "nv_inference_request_duration_us", "queue_us": "nv_inference_queue_duration_us"}
    names |= {"engine_busy_s": "llmops_engine_busy_seconds", "engine_steps": "llmops_engine_steps",
              "engine_tokens": "llmops_engine_decode_tokens"}
    before = {k: _sum_by_pool(triton_a, n, models) for k, n in names.items()}
    after = {k: _sum_by_pool(triton_b, n, models) for k, n in names.items()}
    gauges = {k: {lab_key: [v for lab, v in triton_b.get(f"llmops_engine_{k}", [])
                            if (lab.get("model"), lab.get("version")) == lab_key]
                  for lab_key in after["requests"]} for k in ("running", "waiting", "kv_use")}
    pools = []
    for key in sorted(set().union(*(after[k].keys() for k in names))):
        d = {k: _delta(before[k].get(key, 0.0), after[k].get(key, 0.0)) for k in names}
        engine = key in after["engine_steps"]
        if engine:
            busy_s = d["engine_busy_s"]
            mean_batch = d["engine_tokens"] / d["engine_steps"] if d["engine_steps"] else 0.0
            fill = mean_batch / settings.serve.engine.max_seqs
        else:
            busy_s = d["compute_infer_us"] / 1e6 * (d["executions"] / d["requests"]) if d["requests"] else 0.0
            mean_batch = d["inferences"] / d["executions"] if d["executions"] else 0.0
            fill = mean_batch / t.max_batch_size
        pools.append({"model": key[0], "version": key[1], "requests": d["requests"],
                      "executions": d["executions"], "inferences": d["inferences"],
                      "scheduler": "continuous" if engine else "execute",
                      "busy_s": round(busy_s, 6), "utilization": round(busy_s / (elapsed_s * t.instances), 4),
                      "mean_batch": round(mean_batch, 3),
                      "batch_fill": round(fill, 4),
                      **({"engine_running": sum(gauges["running"].get(key, [])),
                          "engine_waiting": sum(gauges["waiting"].get(key, [])),
                          "kv_use": max(gauges["kv_use"].get(key, []), default=0.0)} if engine else {}),
                      "mean_request_ms": (round(d["request_us"] / d["requests"] / 1e3, 3) if d["requests"]
                                          else None),
                      "mean_queue_ms": (round(d["queue_us"] / d["requests"] / 1e3, 3) if d["requests"]
                                        else None)})
    busiest = max(pools, key=lambda p: p["utilization"], default=None)
    pending = sum(_by_pool(triton_b, "nv_inference_pending_request_count", models).values())
    waiting = sum(p.get("engine_waiting", 0.0) for p in pools)
    gw_queue = _sum(gateway_b, "gateway_queue_depth")
    completion = _delta(_sum(gateway_a, "gateway_tokens", kind="completion"),
                        _sum(gateway_b, "gateway_tokens", kind="completion"))
    tps = completion / elapsed_s
    return {
        "queue_depth": pending + waiting + gw_queue,
        "kv_use": max((p.get("kv_use", 0.0) for p in pools), default=0.0),
        "batch_fill": busiest["batch_fill"] if busiest else 0.0,
        "tokens_per_s": round(tps, 3),
        "tokens_per_s_per_instance": round(tps / t.instances, 3),
        # a long execution that ends inside a short interval credits all its compute to it: cap at 1
        "utilization": min(1.0, busiest["utilization"]) if busiest else 0.0,
        "instances": t.instances,
        "requests_per_s": round(sum(p["requests"] for p in pools) / elapsed_s, 3),
        "interval_s": round(elapsed_s, 3),
        "raw": {
            "triton_pending": pending,
            "engine_waiting": waiting,
            "gateway_queue_depth": gw_queue,
            "gateway_inflight": _sum(gateway_b, "gateway_inflight"),
            "gateway_tokens_per_second_gauge": _sum(gateway_b, "gateway_tokens_per_second"),
            "gateway_completion_tokens": completion,
            "pools": pools,
        },
    }


def signals(settings: Settings, interval_s: float = 5.0) -> dict[str, Any]:
    """Scrape Triton and the gateway twice, `interval_s` apart, and derive the signals (see `derive`)."""
    if interval_s <= 0:
        raise InputError(f"--interval must be > 0 seconds, got {interval_s}")
    host = settings.stack.host
    triton_url = f"http://{host}:{settings.serve.triton.metrics_port}/metrics"
    gateway_url = f"http://{host}:{settings.serve.gateway.port}/metrics"
    t0 = time.monotonic()
    ta, ga = scrape(triton_url), scrape(gateway_url)
    time.sleep(max(0.0, interval_s - (time.monotonic() - t0)))
    t1 = time.monotonic()
    tb, gb = scrape(triton_url), scrape(gateway_url)
    out = derive(ta, tb, ga, gb, t1 - t0, settings)
    out["sources"] = {"triton": triton_url, "gateway": gateway_url}
    return out


# ---------------------------------------------------------------- policy


@dataclass
class Decision:
    """What to do with the instance count, and why (the reason names the figures)."""

    action: Action
    instances: int      # the count the decision was made at
    target: int         # the count to move to (== instances on hold)
    warm: int           # extra instances to keep loaded and idle beside `target`
    reason: str
    trigger: str = ""   # "queue", "utilization", "bounds", "idle" or "" (hold)


def recommend(signal: dict[str, Any], current: int, cfg: AutoscaleConfig, last_change_at: float | None,
              now: float) -> Decision:
    """The policy of this module's docstring. `signal` needs `queue_depth` and `utilization`
    (busy share per instance, 0..1); times are seconds on any one clock."""
    if current < 1:
        raise InputError(f"current instances must be >= 1, got {current}")
    q = float(signal.get("queue_depth", 0.0))
    u = float(signal.get("utilization", 0.0))
    since = None if last_change_at is None else now - last_change_at
    cooling = since is not None and since < cfg.cooldown_s
    figures = f"queue {q:g} ({q / current:.2f}/instance), utilization {u:.3f} at {current} instances"

    def decision(action: Action, target: int, trigger: str, why: str) -> Decision:
        warm = max(0, min(cfg.warm_pool, cfg.max_instances - target))
        return Decision(action, current, target, warm, f"{why}; {figures}", trigger)

    if current < cfg.min_instances:
        return decision("scale_out", cfg.min_instances, "bounds", f"below min_instances={cfg.min_instances}")
    if current > cfg.max_instances:
        return decision("scale_in", cfg.max_instances, "bounds", f"above max_instances={cfg.max_instances}")

    busy = u * current  # instance-equivalents of work
    queue_hot = q / current > cfg.scale_out_queue_per_instance
    util_hot = u > cfg.target_utilization
    cooldown = f"cooldown {since:.0f}s of {cfg.cooldown_s:g}s" if since is not None else ""
    if queue_hot or util_hot:
        want = max(current + 1, math.ceil(busy / cfg.target_utilization - 1e-9))
        if queue_hot:
            want = max(want, math.ceil(q / cfg.scale_out_queue_per_instance - 1e-9))
        target = min(want, cfg.max_instances)
        why = (f"queue/instance {q / current:.2f} > "
               f"scale_out_queue_per_instance={cfg.scale_out_queue_per_instance:g}"
               if queue_hot else f"utilization {u:.3f} > target_utilization={cfg.target_utilization:g}")
        if target <= current:
            return decision("hold", current, "", f"{why} but already at max_instances={cfg.max_instances}")
        if cooling and not queue_hot:
            return decision("hold", current, "", f"{why} but in {cooldown} (only a queue burst bypasses it)")
        capped = f" (wanted {want}, capped by max_instances)" if want > target else ""
        bypass = f", bypassing {cooldown}" if cooling else ""
        return decision("scale_out", target, "queue" if queue_hot else "utilization",
                        f"{why}: {current} -> {target}{capped}{bypass}")

    if u < cfg.scale_in_utilization and q == 0 and current > cfg.min_instances:
        after = busy / (current - 1)
        if cooling:
            return decision("hold", current, "", f"utilization {u:.3f} < scale_in_utilization="
                            f"{cfg.scale_in_utilization:g} but in {cooldown}")
        if after > cfg.target_utilization:
            return decision("hold", current, "", f"one fewer instance would run at {after:.2f} > "
                            f"target_utilization={cfg.target_utilization:g}")
        return decision("scale_in", current - 1, "idle", f"utilization {u:.3f} < scale_in_utilization="
                        f"{cfg.scale_in_utilization:g} and no queue: {current} -> {current - 1} "
                        f"(one at a time; {after:.2f} after)")
    return decision("hold", current, "", "within bounds")


# ---------------------------------------------------------------- replay of a load curve


def load_curve(path: Path | str) -> list[tuple[float, float]]:
    """A recorded load curve: CSV with header `t_s,arrival_rps`, t ascending (seconds, any origin)."""
    path = Path(path)
    if not path.is_file():
        raise AutoscaleError(f"load curve {path} not found")
    rows: list[tuple[float, float]] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"t_s", "arrival_rps"} <= set(reader.fieldnames):
            raise AutoscaleError(f"{path}: header must name t_s and arrival_rps, got {reader.fieldnames}")
        for i, row in enumerate(reader, start=2):
            try:
                t, rps = float(row["t_s"]), float(row["arrival_rps"])
            except (TypeError, ValueError):
                raise AutoscaleError(f"{path}:{i}: not numbers: {row}") from None
            if rps < 0 or (rows and t <= rows[-1][0]):
                raise AutoscaleError(f"{path}:{i}: t_s must increase and arrival_rps be >= 0: {row}")
            rows.append((t, rps))
    if not rows:
        raise AutoscaleError(f"{path}: no rows")
    return rows


def simulate(curve: list[tuple[float, float]], cfg: AutoscaleConfig, capacity_rps_per_instance: float,
             step_s: float = 10.0, cold_start_s: float = 60.0,
             initial_instances: int | None = None) -> list[dict[str, Any]]:
    """Replay `curve` ([(t_s, arrival requests/s)], held constant until the next point) through a
    fluid queue, calling `recommend` every `step_s`; returns one dict per step.

    Model: each active instance serves `capacity_rps_per_instance`; arrivals beyond capacity queue
    up and are served first-come later. A scale-out takes warm instances at once and starts the
    rest cold, active after `cold_start_s`; instances starting count as current (the policy does not
    order them twice), and the utilisation it sees is over them too. The warm pool is refilled by
    cold starts; a released instance stays loaded as warm if the pool has room. `wait_s` is the
    queue's drain time at current capacity (Little's law), what a request arriving then would wait.
    """
    if capacity_rps_per_instance <= 0 or step_s <= 0 or cold_start_s < 0:
        raise InputError("capacity_rps_per_instance and step_s must be > 0, cold_start_s >= 0")
    times = [t for t, _ in curve]
    active = initial_instances or cfg.min_instances
    warm = max(0, min(cfg.warm_pool, cfg.max_instances - active))
    starting: list[list[Any]] = []  # [ready_at, count, "active" | "warm"]
    queue, last_change = 0.0, None
    out: list[dict[str, Any]] = []
    # the last point holds for one more spacing of the curve (a per-minute curve ends a minute after it)
    t, end = curve[0][0], curve[-1][0] + (curve[-1][0] - curve[-2][0] if len(curve) > 1 else step_s)
    while t < end - 1e-9:
        for s in [s for s in starting if s[0] <= t]:
            starting.remove(s)
            if s[2] == "active":
                active += s[1]
            else:
                warm += s[1]
        rps = curve[bisect.bisect_right(times, t) - 1][1]
        arrivals, cap = rps * step_s, active * capacity_rps_per_instance * step_s
        served = min(queue + arrivals, cap)
        # exactly 0: scale-in needs it
        queue = 0.0 if served == queue + arrivals else queue + arrivals - served
        pending = sum(s[1] for s in starting if s[2] == "active")
        current = active + pending
        d = recommend({"queue_depth": queue,
                       "utilization": served / (current * capacity_rps_per_instance * step_s)},
                      current, cfg, last_change, t)
        if d.action == "scale_out":
            need = d.target - current
            take = min(need, warm)
            warm, active = warm - take, active + take
            if need - take:
                starting.append([t + cold_start_s, need - take, "active"])
            last_change = t
        elif d.action == "scale_in":
            drop = current - d.target
            for s in sorted((s for s in starting if s[2] == "active"), key=lambda s: -s[0]):
                cancel = min(drop, s[1])  # cancel starts not yet done before releasing live instances
                s[1], drop = s[1] - cancel, drop - cancel
            starting = [s for s in starting if s[1] > 0]
            active, warm = active - drop, warm + drop
            last_change = t
        warm_starting = sum(s[1] for s in starting if s[2] == "warm")
        if warm + warm_starting < d.warm:
            starting.append([t + cold_start_s, d.warm - warm - warm_starting, "warm"])
        elif warm > d.warm:
            warm = d.warm  # unload the extra
        out.append({"t": t, "arrival_rps": rps, "instances": active,
                    "starting": sum(s[1] for s in starting if s[2] == "active"),
                    "warm": warm, "queue": round(queue, 3),
                    "utilization": round(served / cap, 4) if cap else 1.0,
                    "wait_s": round(queue / (active * capacity_rps_per_instance), 3), "action": d.action,
                    "target": d.target, "trigger": d.trigger, "reason": d.reason})
        t += step_s
    return out


def summarize(timeline: list[dict[str, Any]], step_s: float) -> dict[str, Any]:
    """The figures a replay is judged by."""
    changes = [r for r in timeline if r["action"] != "hold"]
    return {
        "steps": len(timeline), "peak_queue": max(r["queue"] for r in timeline),
        "max_wait_s": max(r["wait_s"] for r in timeline),
        "min_instances": min(r["instances"] for r in timeline),
        "max_instances": max(r["instances"] for r in timeline),
        "scale_outs": sum(r["action"] == "scale_out" for r in changes),
        "scale_ins": sum(r["action"] == "scale_in" for r in changes),
        "cooldown_bypasses": sum("bypassing cooldown" in r["reason"] for r in changes),
        "instance_hours": round(sum(r["instances"] + r["starting"] + r["warm"] for r in timeline)
                                * step_s / 3600, 2),
        "warm_instance_hours": round(sum(r["warm"] for r in timeline) * step_s / 3600, 2),
    }


# ---------------------------------------------------------------- the command


def recommendations_log(settings: Settings) -> Path:
    return settings.paths.reports_dir / "autoscale" / "recommendations.jsonl"


def last_change_at(path: Path) -> float | None:
    """Epoch seconds of the last logged recommendation that changed the count. Nothing applies the
    recommendations automatically yet, so the log is the record the cooldown is counted from."""
    if not path.is_file():
        return None
    last = None
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash mid-write
        if rec.get("decision", {}).get("action") in ("scale_out", "scale_in"):
            last = float(rec["ts"])
    return last


def autoscale(settings: Settings, interval_s: float = 5.0) -> dict[str, Any]:
    """Read the signals, recommend, append the recommendation to reports/autoscale/recommendations.jsonl."""
    sig = signals(settings, interval_s)
    path = recommendations_log(settings)
    now = time.time()
    d = recommend(sig, settings.serve.triton.instances, settings.serve.autoscale, last_change_at(path), now)
    headline = {k: sig[k] for k in ("queue_depth", "utilization", "batch_fill", "tokens_per_s",
                                    "tokens_per_s_per_instance", "requests_per_s", "instances", "interval_s")}
    entry = {"ts": now, "at": dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="seconds"),
             "decision": asdict(d), "signals": headline}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:  # an append-only log: one whole line per write
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())
    log.info("autoscale: %s %d -> %d (+%d warm): %s", d.action, d.instances, d.target, d.warm, d.reason)
    return {"signals": sig, "decision": asdict(d), "log": str(path),
            "metrics": str(export_metrics(settings, sig, d))}


def advise(settings: Settings) -> dict[str, Any]:
    """chat_monitor's `autoscale`: the recommendation, or {"skipped": why} when nothing is serving here to
    read."""
    try:
        return autoscale(settings)["decision"]
    except AutoscaleError as e:  # nothing is serving: no signals, nothing to recommend
        log.info("no autoscaling signals: %s", e)
        return {"skipped": str(e)}


def export_metrics(settings: Settings, sig: dict[str, Any], d: Decision) -> Path:
    """The signals and the recommendation as Prometheus gauges in reports/autoscale/autoscale.prom
    (the textfile-collector format node_exporter scrapes; written atomically), so dashboards and an
    HPA-style controller can read them beside the servers' own metrics."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    reg = CollectorRegistry()
    for key, help_ in (("queue_depth", "requests waiting (Triton pending + gateway queue)"),
                       ("batch_fill", "mean Triton batch size / max_batch_size"),
                       ("tokens_per_s_per_instance", "completion tokens per second per model instance"),
                       ("utilization", "busy share of the busiest instance pool"),
                       ("instances", "model instances now")):
        Gauge(f"llmops_autoscale_{key}", help_, registry=reg).set(float(sig.get(key) or 0.0))
    Gauge("llmops_autoscale_recommended_instances", "instances the policy recommends",
          registry=reg).set(d.target)
    Gauge("llmops_autoscale_recommended_warm", "idle warm instances the policy recommends",
          registry=reg).set(d.warm)
    path = recommendations_log(settings).with_name("autoscale.prom")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), reg)  # writes a temporary file and renames it
    return path


def replay(settings: Settings, curve_path: Path | str, capacity_rps_per_instance: float, step_s: float = 10.0,
           cold_start_s: float = 60.0) -> dict[str, Any]:
    """`simulate` over a recorded curve with this config's policy: the summary and the changes made."""
    cfg = settings.serve.autoscale
    timeline = simulate(load_curve(curve_path), cfg, capacity_rps_per_instance, step_s, cold_start_s)
    changes = [{"hour": round(r["t"] / 3600, 3),
                **{k: r[k] for k in ("action", "target", "instances", "starting", "warm", "queue", "reason")}}
               for r in timeline if r["action"] != "hold"]
    return {"curve": str(curve_path), "capacity_rps_per_instance": capacity_rps_per_instance,
            "step_s": step_s, "cold_start_s": cold_start_s, "policy": cfg.model_dump(),
            "summary": summarize(timeline, step_s), "changes": changes}
