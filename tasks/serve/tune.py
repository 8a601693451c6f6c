"""`llmops tune-serving`: Triton's dynamic-batching settings chosen against a p99 latency SLO.

    llmops tune-serving                          # the tritonserver `llmops serve` runs, grid from serve.tune
    llmops tune-serving --own-server --slo-p99-ms 800 --requests 128

Each point of the grid (serve.tune: max_batch_size x max_queue_delay_us x instances, plus serve.triton's
own setting, the default) is loaded into the running server through the repository API with a config
override (nothing on disk changes; no restart), warmed up, and measured with the load generator
(tasks/serve/loadgen.py): requests/s, completion tokens/s, p50/p99, the mean batch. The choice (`choose`, a
pure function of the recorded points) is the highest throughput whose p99 is within the SLO; when no
point meets it, the lowest p99, with slo_met false. The default is measured first and again last, so
the report shows (and warns) how much the machine drifted meanwhile; serve.tune.rounds > 1 measures
the grid round-robin that many times and takes each point's medians. The model's configuration from
before is loaded back at the end, on error too. Written to reports/tune/<UTC time>/:

    tune.json      every point, the SLO, the choice, the default, chosen/default throughput and p99
    tune.png       throughput vs p99 per setting, the SLO line, the chosen and default points marked
    chosen.pbtxt   the config.pbtxt `llmops export` writes with the chosen values (--set overrides in
                   tune.json)

A GPU server is tuned the same way: the grid runs wherever the server runs. The streaming twin
(<model>-stream) shares serve.triton's settings; only the model itself is measured.
"""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from tasks.atomic import atomic_dir, atomic_file, write_json
from tasks.config import Settings
from tasks.errors import InputError
from tasks.names import check_name
from tasks.progress import Progress
from tasks.serve.export import config_pbtxt
from tasks.serve.repository import read_aliases, served_versions

log = logging.getLogger(__name__)

TUNED = ("max_batch_size", "dynamic_batching", "instance_group")  # the parts of a model config a point sets


class TuneError(InputError):
    """The tuner cannot measure as asked (no served version, a bad grid)."""


# ---------------------------------------------------------------- the grid


def label(setting: dict[str, Any]) -> str:
    """b8/d2000us/i2 (+ /p4,8 with preferred batch sizes other than [max_batch_size]; nobatch without
    dynamic batching)."""
    delay = "nobatch" if not setting["dynamic_batching"] else f"d{setting['max_queue_delay_us']}us"
    preferred = setting.get("preferred_batch_sizes") or []
    own = preferred and preferred != [setting["max_batch_size"]]
    return (f"b{setting['max_batch_size']}/{delay}/i{setting['instances']}"
            + (f"/p{','.join(str(x) for x in preferred)}" if own else ""))


def default_setting(settings: Settings) -> dict[str, Any]:
    """serve.triton's own batch setting: what `llmops export` writes into config.pbtxt."""
    t = settings.serve.triton
    return {"max_batch_size": t.max_batch_size, "dynamic_batching": t.dynamic_batching,
            "max_queue_delay_us": t.max_queue_delay_us if t.dynamic_batching else None,
            "preferred_batch_sizes": list(t.preferred_batch_sizes) if t.dynamic_batching else [],
            "instances": t.instances}


def grid(settings: Settings) -> list[dict[str, Any]]:
    """The settings to measure: the default first, then every combination of serve.tune's lists
    (with dynamic batching on), each once."""
    g, base = settings.serve.tune, default_setting(settings)
    out = [{**base, "default": True}]
    for b, d, i in itertools.product(g.max_batch_size, g.max_queue_delay_us, g.instances):
        # Triton fills in [max_batch_size] when none are given: "max" says so explicitly
        preferred = ([x for x in settings.serve.triton.preferred_batch_sizes if x <= b]
                     if g.preferred_batch_sizes == "keep" else [b])
        s = {"max_batch_size": b, "dynamic_batching": True, "max_queue_delay_us": d,
             "preferred_batch_sizes": preferred, "instances": i, "default": False}
        if not any(_same(s, o) for o in out):
            out.append(s)
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("max_batch_size", "dynamic_batching", "max_queue_delay_us", "preferred_batch_sizes", "instances")
    return all(a[k] == b[k] for k in keys)


def overrides(setting: dict[str, Any]) -> list[str]:
    """The --set overrides that make `llmops export` write this setting."""
    out = [f"serve.triton.max_batch_size={setting['max_batch_size']}",
           f"serve.triton.dynamic_batching={str(setting['dynamic_batching']).lower()}",
           f"serve.triton.instances={setting['instances']}"]
    if setting["dynamic_batching"]:
        out += [f"serve.triton.max_queue_delay_us={setting['max_queue_delay_us']}",
                f"serve.triton.preferred_batch_sizes="
                f"[{','.join(str(x) for x in setting['preferred_batch_sizes'])}]"]
    return out


def with_setting(settings: Settings, setting: dict[str, Any]) -> Settings:
    t = settings.serve.triton
    update: dict[str, Any] = {"max_batch_size": setting["max_batch_size"],
                              "dynamic_batching": setting["dynamic_batching"],
                              "instances": setting["instances"]}
    if setting["dynamic_batching"]:
        update |= {"max_queue_delay_us": setting["max_queue_delay_us"],
                   "preferred_batch_sizes": tuple(setting["preferred_batch_sizes"])}
    return settings.model_copy(update={"serve": settings.serve.model_copy(
        update={"triton": t.model_copy(update=update)})})


def model_config_for(original: dict[str, Any], setting: dict[str, Any]) -> dict[str, Any]:
    """The model configuration (Triton JSON) to load for `setting`: the original with the batch
    settings and the instance count replaced."""
    cfg = copy.deepcopy(original)
    cfg["max_batch_size"] = setting["max_batch_size"]
    if setting["dynamic_batching"]:
        cfg["dynamic_batching"] = {**(cfg.get("dynamic_batching") or {}),
                                   "max_queue_delay_microseconds": setting["max_queue_delay_us"],
                                   "preferred_batch_size": list(setting["preferred_batch_sizes"])}
    else:
        cfg.pop("dynamic_batching", None)
    groups = cfg.get("instance_group") or [{"kind": "KIND_CPU"}]
    if len(groups) != 1:
        raise TuneError(f"model {cfg.get('name')!r} has {len(groups)} instance groups; "
                        "the tuner sets the count of one")
    cfg["instance_group"] = [{**groups[0], "count": setting["instances"]}]
    return cfg


def setting_of(config: dict[str, Any]) -> dict[str, Any]:
    """The batch setting a Triton model configuration (JSON) holds."""
    db = config.get("dynamic_batching")
    groups = config.get("instance_group") or [{}]
    return {"max_batch_size": int(config.get("max_batch_size", 0)), "dynamic_batching": db is not None,
            "max_queue_delay_us": int(db.get("max_queue_delay_microseconds", 0)) if db is not None else None,
            "preferred_batch_sizes": ([int(x) for x in db.get("preferred_batch_size", [])] if db is not None
                                      else []),
            "instances": sum(int(g.get("count", 1)) for g in groups)}


def slo_p99_ms(settings: Settings) -> float:
    return settings.serve.tune.slo_p99_ms or settings.monitor.slo_p99_ms


def load_shape(settings: Settings) -> dict[str, Any]:
    g = settings.serve.tune
    return {"concurrency": g.concurrency or settings.serve.gateway.max_inflight, "requests": g.requests,
            "duration_s": g.duration_s,
            "max_tokens": g.max_tokens or settings.serve.gateway.default_max_tokens,
            "warmup_requests": g.warmup_requests, "request_timeout_s": g.request_timeout_s}


# ---------------------------------------------------------------- the choice (pure)


def _eligible(p: dict[str, Any]) -> bool:
    return (p.get("error") is None and not p.get("errors") and bool(p.get("requests"))
            and _num(p.get("p99_ms")))


def _num(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def choose(points: list[dict[str, Any]], slo_ms: float, objective: str = "tokens_per_s") -> dict[str, Any]:
    """The highest `objective` among the points whose p99 <= slo_ms (ties: lower p99, then fewer
    instances); with none, the lowest p99 and slo_met False. A point that failed to load or had a
    failed request is never chosen. Each point needs label, p99_ms, the objective, errors, error."""
    if objective not in ("tokens_per_s", "req_per_s"):
        raise TuneError(f"objective {objective!r}: tokens_per_s or req_per_s")
    ok = [p for p in points if _eligible(p)]
    failed = [p["label"] for p in points if not _eligible(p)]
    if not ok:
        raise TuneError(f"none of the {len(points)} settings was measured without errors "
                        f"({', '.join(failed)}); see each point's error in the report")
    within = [p for p in ok if p["p99_ms"] <= slo_ms]
    over = [p["label"] for p in ok if p["p99_ms"] > slo_ms]
    if within:
        best = max(within,
                   key=lambda p: (p[objective], -p["p99_ms"], -p.get("setting", {}).get("instances", 0)))
        reason = (f"the highest {objective} ({best[objective]:g}) of the {len(within)} settings with p99 <= "
                  f"{slo_ms:g} ms (its p99 {best['p99_ms']:g} ms)")
    else:
        best = min(ok, key=lambda p: (p["p99_ms"], -p[objective]))
        reason = (f"no setting met the SLO p99 <= {slo_ms:g} ms: the lowest p99 is {best['p99_ms']:g} ms "
                  f"({best['label']}); serve less load per server, a smaller max_tokens, or faster hardware")
    return {"slo_met": bool(within), "label": best["label"], "reason": reason, "objective": objective,
            "slo_p99_ms": slo_ms, "within_slo": [p["label"] for p in within], "over_slo": over,
            "failed": failed}


def _brief(p: dict[str, Any]) -> dict[str, Any]:
    keys = ("label", "setting", "tokens_per_s", "req_per_s", "p50_ms", "p99_ms", "mean_batch")
    return {k: p.get(k) for k in keys}


def _ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 3) if _num(a) and _num(b) and b else None


def compare(report: dict[str, Any] | str | Path) -> dict[str, Any]:
    """The chosen setting against the default, from a tune report (tune.json's contents or its path):
    throughput_ratio = chosen / default in the report's objective, p99_ratio = chosen / default p99,
    and `at_default_p99`: the best eligible point whose p99 is no worse than the default's (and within
    the SLO), with its throughput ratio: the gain at equal or better latency."""
    if not isinstance(report, dict):
        report = json.loads(Path(report).read_text())
    obj = report["objective"]
    points = {p["label"]: p for p in report["points"]}
    chosen, default = points[report["choice"]["label"]], points[report["default"]]
    out: dict[str, Any] = {"objective": obj, "slo_p99_ms": report["slo_p99_ms"],
                           "slo_met": report["choice"]["slo_met"],
                           "chosen": _brief(chosen), "default": _brief(default),
                           "throughput_ratio": _ratio(chosen.get(obj), default.get(obj)),
                           "p99_ratio": _ratio(chosen.get("p99_ms"), default.get("p99_ms")),
                           "p99_not_worse": (_num(chosen.get("p99_ms")) and _num(default.get("p99_ms"))
                                             and chosen["p99_ms"] <= default["p99_ms"])}
    if _eligible(default):
        same = [p for p in points.values() if _eligible(p) and p["p99_ms"] <= default["p99_ms"]
                and p["p99_ms"] <= report["slo_p99_ms"]]
        if same:
            best = max(same, key=lambda p: (p[obj], -p["p99_ms"]))
            out["at_default_p99"] = {**_brief(best), "throughput_ratio": _ratio(best[obj], default[obj])}
    if report.get("default_repeat"):
        out["default_drift"] = report["default_repeat"].get("throughput_change")
    return out


# ---------------------------------------------------------------- measuring


def _stats(http_url: str, model: str, version: str) -> dict[str, float]:
    """Triton's cumulative counters for the model (all versions, or one)."""
    import httpx

    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/stats"
    r = httpx.get(f"http://{http_url}{path}", timeout=30.0)
    r.raise_for_status()
    out = {"inferences": 0.0, "executions": 0.0, "queue_ns": 0.0, "queue_n": 0.0, "compute_ns": 0.0,
           "compute_n": 0.0}
    for m in r.json().get("model_stats", []):
        s = m.get("inference_stats", {})
        out["inferences"] += float(m.get("inference_count", 0))
        out["executions"] += float(m.get("execution_count", 0))
        out["queue_ns"] += float(s.get("queue", {}).get("ns", 0))
        out["queue_n"] += float(s.get("queue", {}).get("count", 0))
        out["compute_ns"] += float(s.get("compute_infer", {}).get("ns", 0))
        out["compute_n"] += float(s.get("compute_infer", {}).get("count", 0))
    return out


def _stats_delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float | None]:
    d = {k: b[k] - a[k] for k in a}

    def per(x: str, n: str, scale: float = 1.0) -> float | None:
        return round(d[x] / d[n] * scale, 3) if d[n] > 0 else None

    # triton_mean_batch is per execution; the load generator's mean_batch is per request
    return {"triton_mean_batch": per("inferences", "executions"),
            "queue_ms_mean": per("queue_ns", "queue_n", 1e-6),
            "compute_ms_mean": per("compute_ns", "compute_n", 1e-6)}


def _clean(r: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}


def _measure(settings: Settings, http_url: str, grpc_url: str, model: str, version: str,
             original: dict[str, Any], setting: dict[str, Any]) -> dict[str, Any]:
    """Load `setting` into the server and measure it: one point of the report."""
    from tasks.serve import loadgen, triton

    shape = load_shape(settings)
    point: dict[str, Any] = {"label": label(setting), "default": setting.get("default", False),
                             "setting": {k: v for k, v in setting.items() if k != "default"}, "error": None}
    t0 = time.monotonic()
    try:
        triton.load(http_url, model, config=model_config_for(original, setting))
        triton.wait_ready(http_url, settings.serve.triton.startup_timeout_s, (model,))
    except triton.TritonError as e:  # Triton keeps the previous configuration loaded: nothing to measure
        return {**point, "error": f"load failed: {e}"[:1000], "errors": 0, "requests": 0}
    point["reload_s"] = round(time.monotonic() - t0, 2)
    loaded = setting_of(triton.model_config(http_url, model))
    if not _same(loaded, setting):  # Triton filled something in, or the override did not take
        point["loaded_as"] = loaded
        log.warning("%s was loaded as %s, not %s", model, label(loaded), point["label"])
    if shape["warmup_requests"]:
        loadgen.run(grpc_url, model, shape["concurrency"], requests=shape["warmup_requests"],
                    max_tokens=shape["max_tokens"], version=version, timeout_s=shape["request_timeout_s"])
    before = _stats(http_url, model, version)
    r = loadgen.run(grpc_url, model, shape["concurrency"], requests=shape["requests"],
                    duration_s=shape["duration_s"], max_tokens=shape["max_tokens"], version=version,
                    timeout_s=shape["request_timeout_s"])
    return {**point, **_clean(r), **_stats_delta(before, _stats(http_url, model, version))}


MEDIAN = ("req_per_s", "tokens_per_s", "p50_ms", "p99_ms", "mean_ms", "mean_batch", "triton_mean_batch",
          "queue_ms_mean", "compute_ms_mean", "reload_s", "wall_s")
SUMMED = ("requests", "errors", "completion_tokens")
DRIFT = 0.15  # the default's throughput may move this much between its first and last measurement


def _combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One point from its measurements in each round: medians of the figures, sums of the counts,
    the first error. With one round, that round as it is."""
    if len(rounds) == 1:
        return rounds[0]
    import statistics

    out = dict(rounds[0])
    for k in MEDIAN:
        vals = [r[k] for r in rounds if _num(r.get(k))]
        out[k] = round(statistics.median(vals), 3) if vals else None
    for k in SUMMED:
        out[k] = sum(r.get(k) or 0 for r in rounds)
    out["error"] = next((r["error"] for r in rounds if r.get("error")), None)
    out["rounds"] = [{k: r.get(k)
                      for k in ("tokens_per_s", "req_per_s", "p50_ms", "p99_ms", "mean_batch", "errors")}
                     for r in rounds]
    return out


def _restore(http_url: str, model: str, original: dict[str, Any], timeout: float) -> str | None:
    """Load the configuration from before back; None when it is back, else what went wrong."""
    from tasks.serve import triton

    try:
        triton.load(http_url, model, config=original)
        triton.wait_ready(http_url, timeout, (model,))
        now = triton.model_config(http_url, model)
    except Exception as e:  # the server gone, a refused load: reported, never raised over the error at hand
        return f"{type(e).__name__}: {e}"
    differs = [k for k in TUNED if now.get(k) != original.get(k)]
    return f"after restoring, {', '.join(differs)} still differ" if differs else None


def _version(settings: Settings, model: str, version: int | None) -> str:
    """The version the load goes to: the one asked for, else the champion (what the gateway's default
    route serves), else "" (Triton's choice: the newest)."""
    if version is not None:
        return str(version)
    champion = read_aliases(settings.paths.triton_repository, model).get("champion")
    return str(champion) if champion else ""


def tune(settings: Settings, http_url: str, grpc_url: str, model: str | None = None,
         version: int | None = None, out_dir: Path | str | None = None,
         server: str = "running") -> dict[str, Any]:
    """Measure every setting of the grid on the tritonserver at http_url/grpc_url (the model loaded
    there), choose, restore, and write the report. Returns tune.json's contents (+ file paths)."""
    import httpx

    from tasks.serve import triton

    model = check_name(model or settings.serve.triton.model_name)
    try:
        live = httpx.get(f"http://{http_url}/v2/health/live", timeout=5.0).status_code == 200
    except httpx.HTTPError:
        live = False
    if not live:
        raise TuneError(f"no tritonserver answers at {http_url} (serve.triton.http_port): start it with "
                        "`llmops serve`, or pass --own-server to start a private one")
    ver = _version(settings, model, version)
    ready = httpx.get(f"http://{http_url}/v2/models/{model}" + (f"/versions/{ver}" if ver else "") + "/ready",
                      timeout=5.0)
    if ready.status_code != 200:
        raise TuneError(f"model {model!r}{f' version {ver}' if ver else ''} is not ready in the tritonserver "
                        f"at {http_url}: export it (`llmops export`) and load it (`llmops serve`)")
    original = triton.model_config(http_url, model)
    before = setting_of(original)
    points_to_run = grid(settings)
    if not _same(before, points_to_run[0]):
        log.warning("%s is loaded with %s, not serve.triton's %s; it is loaded back as it was at the end",
                    model, label(before), label(points_to_run[0]))
    slo, shape, objective = slo_p99_ms(settings), load_shape(settings), settings.serve.tune.objective
    log.info("tuning %s%s on %s: %d settings, concurrency %d, %s requests of %d tokens each, "
             "SLO p99 <= %g ms",
             model, f" version {ver}" if ver else "", http_url, len(points_to_run), shape["concurrency"],
             shape["requests"] or f"{shape['duration_s']:g} s of", shape["max_tokens"], slo)
    rounds = settings.serve.tune.rounds
    progress = Progress("tune-serving", rounds * len(points_to_run) + 1, "points", log, every_s=0.0)
    measured: list[list[dict[str, Any]]] = [[] for _ in points_to_run]
    repeat: dict[str, Any] | None = None
    # round-robin (every setting once per round, the default first) so a change in the machine's load
    # hits all settings alike; then the default once more, last: how much the machine drifted
    order = [*((i, x) for _ in range(rounds) for i, x in enumerate(points_to_run)), (-1, points_to_run[0])]
    try:
        for i, setting in order:
            p = _measure(settings, http_url, grpc_url, model, ver, original, setting)
            if i >= 0:
                measured[i].append(p)
            else:
                repeat = p
            log.info("%-22s %s", p["label"], p["error"] or
                     f"{p.get('tokens_per_s')} tok/s {p.get('req_per_s')} req/s p50 {p.get('p50_ms')} ms "
                     f"p99 {p.get('p99_ms')} ms batch {p.get('mean_batch')} errors {p.get('errors')}")
            progress.update(1)
    finally:
        problem = _restore(http_url, model, original, settings.serve.triton.startup_timeout_s)
        if problem:
            log.error("could not load %s's configuration from before back: %s", model, problem)
    if problem:
        raise TuneError(f"tuning finished but {model}'s configuration from before could not be loaded back "
                        f"({problem}); reload it with `llmops serve` or "
                        f"POST /v2/repository/models/{model}/load")
    points = [_combine(m) for m in measured]
    choice = choose(points, slo, objective)
    chosen = next(p for p in points if p["label"] == choice["label"])
    now = dt.datetime.now(dt.UTC)
    report: dict[str, Any] = {
        "generated": now.isoformat(timespec="seconds"), "model": model, "version": ver or "newest",
        "server": {"http": http_url, "grpc": grpc_url, "kind": server,
                   "device": settings.serve.triton.device},
        "slo_p99_ms": slo, "objective": objective, "load": shape, "rounds": rounds,
        "grid": {k: list(getattr(settings.serve.tune, k))
                 for k in ("max_batch_size", "max_queue_delay_us", "instances")}
        | {"preferred_batch_sizes": settings.serve.tune.preferred_batch_sizes},
        "loaded_before": before, "restored": True, "default": points[0]["label"], "points": points,
        "choice": choice, "chosen": chosen["setting"], "overrides": overrides(chosen["setting"])}
    warnings = []
    if repeat is not None and _eligible(repeat) and _eligible(points[0]):
        first = measured[0][0][objective]  # the default's first measurement, against the one at the very end
        change = _ratio(repeat[objective] - first, first)
        report["default_repeat"] = {**_brief(repeat), "throughput_change": change}
        if change is not None and abs(change) > DRIFT:
            warnings.append(f"the default's {objective} changed by {change:+.0%} between its first and its "
                            "last measurement: the machine's load changed during the run (other work on it, "
                            "or live traffic), and differences between settings smaller than that may be "
                            "noise; rerun on a quiet server"
                            + (" or with more serve.tune.rounds" if rounds < 3 else ""))
    if shape["requests"] and shape["requests"] < 100:
        warnings.append(f"p99 of {shape['requests']} requests is about the slowest one: "
                        "use more requests for a stable p99")
    for w in warnings:
        log.warning("%s", w)
    report["warnings"] = warnings
    report["comparison"] = compare(report)
    return write_report(settings, report,
                        out_dir or settings.paths.reports_dir / "tune" / now.strftime("%Y%m%dT%H%M%SZ"))


# ---------------------------------------------------------------- the report


def write_report(settings: Settings, report: dict[str, Any], out_dir: Path | str) -> dict[str, Any]:
    out_dir = Path(out_dir)
    report = {**report, "files": {"json": str(out_dir / "tune.json"), "png": str(out_dir / "tune.png"),
                                  "pbtxt": str(out_dir / "chosen.pbtxt")}}
    with atomic_dir(out_dir) as tmp:
        (tmp / "chosen.pbtxt").write_text(config_pbtxt(with_setting(settings, report["chosen"]),
                                                       report["model"], decoupled=False))
        _plot(report, tmp / "tune.png")
        write_json(tmp / "tune.json", report)
    log.info("tune report: %s", out_dir)
    return report


def _plot(report: dict[str, Any], path: Path) -> None:
    """Throughput against p99, one numbered point per setting (within the SLO blue, over it grey), the
    numbers' settings and figures listed beside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    obj, slo = report["objective"], report["slo_p99_ms"]
    chosen, default = report["choice"]["label"], report["default"]
    pts = [p for p in report["points"] if _eligible(p)]
    fig = plt.figure(figsize=(12, 5.8))
    ax = fig.add_axes((0.07, 0.1, 0.55, 0.8))
    rows = []
    for n, p in enumerate(sorted(pts, key=lambda p: -p[obj]), 1):
        ax.scatter(p["p99_ms"], p[obj], s=36, color="tab:blue" if p["p99_ms"] <= slo else "tab:gray",
                   zorder=3)
        ax.annotate(str(n), (p["p99_ms"], p[obj]), textcoords="offset points", xytext=(4, 3), fontsize=7)
        mark = " *" if p["label"] == chosen else " d" if p["label"] == default else ""
        rows.append(f"{n:>2} {p['label']:<22} {p[obj]:>9.1f} {p['p99_ms']:>8.1f}{mark}")
    rows += [f" - {p['label']:<22} {'failed':>9}" for p in report["points"] if not _eligible(p)]
    by = {p["label"]: p for p in pts}
    if default in by:
        ax.scatter(by[default]["p99_ms"], by[default][obj], s=200, facecolors="none", edgecolors="black",
                   linewidths=1.5, marker="s", zorder=4, label=f"default {default} (d)")
    again = report.get("default_repeat")
    if again and _num(again.get("p99_ms")):
        change = again.get("throughput_change")
        ax.scatter(again["p99_ms"], again[obj], s=120, facecolors="none", edgecolors="gray", linewidths=1.2,
                   marker="s", zorder=4,
                   label="default again, last" + (f" ({change:+.0%})" if _num(change) else ""))
    if chosen in by:
        ax.scatter(by[chosen]["p99_ms"], by[chosen][obj], s=320, color="tab:red", marker="*", zorder=5,
                   label=f"chosen {chosen} (*)" + ("" if report["choice"]["slo_met"] else ", SLO not met"))
    ax.axvline(slo, color="tab:red", linestyle="--", linewidth=1, label=f"SLO p99 {slo:g} ms")
    shape, unit = report["load"], {"tokens_per_s": "completion tokens/s", "req_per_s": "requests/s"}[obj]
    ax.set_xlabel("p99 latency (ms), Triton direct")
    ax.set_ylabel(unit)
    ax.set_title(f"{report['model']}: {len(report['points'])} settings, concurrency {shape['concurrency']}, "
                 f"max_tokens {shape['max_tokens']}, {report.get('rounds', 1)} round(s)", fontsize=10)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    head = f"{'#':>2} {'setting':<22} {obj:>9} {'p99 ms':>8}"
    fig.text(0.64, 0.9, "\n".join([head, *rows]), family="monospace", fontsize=7.5, va="top")
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- the CLI's entry


def apply(settings: Settings, report: dict[str, Any], http_url: str | None = None) -> dict[str, Any]:
    """Write the chosen setting into the repository's config.pbtxt of the model and its streaming twin
    and reload those loaded at http_url. A later `llmops export` writes serve.triton's values again:
    the report's overrides belong in configs/serve.yaml to keep them."""
    import httpx

    from tasks.serve import triton

    s = with_setting(settings, report["chosen"])
    repo, model = settings.paths.triton_repository, report["model"]
    written, reloaded = [], []
    for name in (model,):
        if not served_versions(repo, name):
            continue
        with atomic_file(repo / name / "config.pbtxt") as tmp:
            tmp.write_text(config_pbtxt(s, name))
        written.append(str(repo / name / "config.pbtxt"))
        if http_url and httpx.get(f"http://{http_url}/v2/models/{name}/ready",
                                  timeout=5.0).status_code == 200:
            triton.load(http_url, name)  # config.pbtxt changed on disk: the load reads it
            triton.wait_ready(http_url, settings.serve.triton.startup_timeout_s, (name,))
            reloaded.append(name)
    return {"written": written, "reloaded": reloaded, "overrides": report["overrides"]}


def tune_serving(settings: Settings, model: str | None = None, version: int | None = None,
                 own_server: bool = False, apply_chosen: bool = False) -> dict[str, Any]:
    """`llmops tune-serving`: tune on the running server (serve.triton's ports), or with own_server on a
    private tritonserver (free loopback ports, only this model loaded, stopped at the end)."""
    from tasks.procs import free_port
    from tasks.serve import triton
    from tasks.serve.server import urls

    model = check_name(model or settings.serve.triton.model_name)
    u = urls(settings)
    if own_server:
        if not served_versions(settings.paths.triton_repository, model):
            raise TuneError(f"no exported version of {model!r} in {settings.paths.triton_repository}: "
                            "`llmops export` first")
        t = settings.serve.triton
        private = settings.model_copy(update={"serve": settings.serve.model_copy(update={
            "triton": t.model_copy(update={
                "http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()})})})
        tp = triton.start(private, models=(model,),
                          log=settings.paths.var_dir / "log" / "tritonserver-tune.log")
        try:
            report = tune(settings, tp.http_url, tp.grpc_url, model, version, server="own")
        finally:
            tp.stop()
    else:
        report = tune(settings, u["triton_http"], u["triton_grpc"], model, version)
    if apply_chosen and report["choice"]["slo_met"]:
        import httpx

        try:
            running = httpx.get(f"http://{u['triton_http']}/v2/health/live", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            running = False
        report["applied"] = apply(settings, report, u["triton_http"] if running else None)
    elif apply_chosen:
        report["applied"] = {"skipped": "no setting met the SLO: nothing was written"}
    return report


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the CLI prints: the choice against the default, the overrides, where the report is."""
    c = report["comparison"]
    return {"slo_p99_ms": report["slo_p99_ms"], "slo_met": report["choice"]["slo_met"],
            "reason": report["choice"]["reason"], "chosen": c["chosen"], "default": c["default"],
            "throughput_ratio": c["throughput_ratio"], "p99_ratio": c["p99_ratio"],
            "default_drift": c.get("default_drift"), "points": len(report["points"]),
            "failed": report["choice"]["failed"], "warnings": report.get("warnings", []),
            "overrides": report["overrides"], "report": report["files"],
            **({"applied": report["applied"]} if "applied" in report else {})}
