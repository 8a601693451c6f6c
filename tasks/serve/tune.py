"""`llmops tune-serving`: the serving engine's batch settings chosen against a p99 latency SLO.

    llmops tune-serving                          # the tritonserver `llmops serve` runs, grid from serve.tune
    llmops tune-serving --own-server --slo-p99-ms 800 --requests 128

The model batches in its continuous-batching engine (tasks/model/engine.py), not in Triton's dynamic
batcher, so the grid (serve.tune) is over the engine's knobs: max_seqs (sequences in an instance's
running batch) x max_batch_tokens (tokens per engine step) x instances (Triton model instances, one
engine each); a combination with max_batch_tokens < max_seqs is skipped (the engine refuses it), and
serve.engine's and serve.triton's own setting, the default, is always measured. Each point is loaded
into the running server through the repository API with a config override (the model's `max_seqs`
and `max_batch_tokens` parameters and its instance count; nothing on disk changes; no restart), warmed
up, and measured with the load generator (tasks/serve/loadgen.py): requests/s, completion tokens/s,
p50/p99, the mean batch; beside them the engine's own counters from Triton's metrics endpoint
(llmops_engine_*): tokens per engine step (the running batch's mean occupancy) and the share of
sequences that joined mid-decode. The choice (`choose`, a pure function of the recorded points) is the
highest throughput whose p99 is within the SLO; when no point meets it, the lowest p99, with slo_met
false. The default is measured first and again last, so the report shows (and warns) how much the
machine drifted meanwhile; serve.tune.rounds > 1 measures the grid round-robin that many times and
takes each point's medians. The model's configuration from before is loaded back at the end, on error
too. Written to reports/tune/<UTC time>/:

    tune.json      every point, the SLO, the choice, the default, chosen/default throughput and p99
    tune.png       throughput vs p99 per setting, the SLO line, the chosen and default points marked
    chosen.pbtxt   the config.pbtxt `llmops export` writes with the chosen values (--set overrides in
                   tune.json)

A GPU server is tuned the same way: the grid runs wherever the server runs. A model that runs the
`execute` scheduler (serve.engine.scheduler: Triton's dynamic batcher shapes its batches) is refused:
these knobs do nothing there.
"""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

from tasks.atomic import atomic_dir, atomic_file, write_json
from tasks.config import EngineConfig, Settings
from tasks.errors import InputError
from tasks.names import check_name
from tasks.progress import Progress
from tasks.serve.export import config_pbtxt
from tasks.serve.repository import read_aliases, served_versions

log = logging.getLogger(__name__)

KNOBS = ("max_seqs", "max_batch_tokens", "instances")  # a setting, as the report holds it
PARAMS = ("max_seqs", "max_batch_tokens")  # the knobs that are model parameters (the engine's)
TUNED = ("parameters", "instance_group")  # the parts of a model config a point sets


class TuneError(InputError):
    """The tuner cannot measure as asked (no served version, a bad grid, a model without the engine)."""


# ---------------------------------------------------------------- the grid


def label(setting: dict[str, Any]) -> str:
    """s16/t256/i2: max_seqs 16, max_batch_tokens 256, 2 instances."""
    return f"s{setting['max_seqs']}/t{setting['max_batch_tokens']}/i{setting['instances']}"


def default_setting(settings: Settings) -> dict[str, Any]:
    """serve.engine's and serve.triton's own setting: what `llmops export` writes into config.pbtxt."""
    e, t = settings.serve.engine, settings.serve.triton
    return {"max_seqs": e.max_seqs, "max_batch_tokens": e.max_batch_tokens, "instances": t.instances}


def _combinations(settings: Settings) -> list[dict[str, Any]]:
    g = settings.serve.tune
    return [{"max_seqs": s, "max_batch_tokens": t, "instances": i}
            for s, t, i in itertools.product(g.max_seqs, g.max_batch_tokens, g.instances)]


def skipped(settings: Settings) -> list[str]:
    """The combinations of serve.tune's lists the engine refuses (max_batch_tokens < max_seqs)."""
    return [label(c) for c in _combinations(settings) if c["max_batch_tokens"] < c["max_seqs"]]


def grid(settings: Settings) -> list[dict[str, Any]]:
    """The settings to measure: the default first, then every combination of serve.tune's lists with
    max_batch_tokens >= max_seqs, each once."""
    out = [{**default_setting(settings), "default": True}]
    for c in _combinations(settings):
        if c["max_batch_tokens"] >= c["max_seqs"] and not any(_same(c, o) for o in out):
            out.append({**c, "default": False})
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a[k] == b[k] for k in KNOBS)


def overrides(setting: dict[str, Any]) -> list[str]:
    """The --set overrides that make `llmops export` write this setting."""
    return [f"serve.engine.max_seqs={setting['max_seqs']}",
            f"serve.engine.max_batch_tokens={setting['max_batch_tokens']}",
            f"serve.triton.instances={setting['instances']}"]


def with_setting(settings: Settings, setting: dict[str, Any]) -> Settings:
    serve = settings.serve
    engine = serve.engine.model_copy(update={k: setting[k] for k in PARAMS})
    triton = serve.triton.model_copy(update={"instances": setting["instances"]})
    serve = serve.model_copy(update={"engine": engine, "triton": triton})
    return settings.model_copy(update={"serve": serve})


def model_config_for(original: dict[str, Any], setting: dict[str, Any]) -> dict[str, Any]:
    """The model configuration (Triton JSON) to load for `setting`: the original with the engine's
    parameters (max_seqs, max_batch_tokens) and the instance count replaced."""
    cfg = copy.deepcopy(original)
    cfg["parameters"] = {**(cfg.get("parameters") or {}),
                         **{k: {"string_value": str(setting[k])} for k in PARAMS}}
    groups = cfg.get("instance_group") or [{"kind": "KIND_CPU"}]
    if len(groups) != 1:
        raise TuneError(f"model {cfg.get('name')!r} has {len(groups)} instance groups; "
                        "the tuner sets the count of one")
    cfg["instance_group"] = [{**groups[0], "count": setting["instances"]}]
    return cfg


def setting_of(config: dict[str, Any]) -> dict[str, Any]:
    """The engine setting a Triton model configuration (JSON) holds; an absent parameter is
    serve.engine's default."""
    params = config.get("parameters") or {}
    groups = config.get("instance_group") or [{}]
    out: dict[str, Any] = {k: int(params[k]["string_value"]) if k in params
                           else EngineConfig.model_fields[k].default for k in PARAMS}
    return {**out, "instances": sum(int(g.get("count", 1)) for g in groups)}


def engine_of(config: dict[str, Any]) -> str | None:
    """Why a loaded model's batches are not the engine's (so the grid means nothing), or None: the
    continuous scheduler runs only in a decoupled model (tasks/serve/triton_model.py)."""
    scheduler = ((config.get("parameters") or {}).get("scheduler") or {}).get("string_value", "continuous")
    if scheduler != "continuous":
        return f"it runs the {scheduler!r} scheduler (serve.engine.scheduler)"
    if not (config.get("model_transaction_policy") or {}).get("decoupled"):
        return "it is not decoupled (an export from before the engine)"
    return None


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
    keys = ("label", "setting", "tokens_per_s", "req_per_s", "p50_ms", "p99_ms", "mean_batch",
            "engine_tokens_per_step")
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


ENGINE = ("steps", "decode_tokens", "joined_mid_decode", "finished")  # llmops_engine_<counter>s read
_SAMPLE = re.compile(r"^llmops_engine_(?P<name>\w+)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def engine_counters(text: str, model: str, version: str = "") -> dict[str, float] | None:
    """The engine's counters in Triton's metrics (Prometheus text: llmops_engine_*, summed over the
    lines of the model; all versions, or one); None when it has none of them."""
    out, seen = dict.fromkeys(ENGINE, 0.0), False
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or m["name"] not in out:
            continue
        labels = dict(_LABEL.findall(m["labels"] or ""))
        if labels.get("model") == model and (not version or labels.get("version") == version):
            out[m["name"]] += float(m["value"])
            seen = True
    return out if seen else None


def _engine(metrics_url: str, model: str, version: str) -> dict[str, float] | None:
    """engine_counters from the server's metrics endpoint; None when it cannot be read."""
    import httpx

    try:
        r = httpx.get(metrics_url, timeout=10.0)
        r.raise_for_status()
    except httpx.HTTPError as e:
        log.debug("engine metrics at %s not read: %s", metrics_url, e)
        return None
    return engine_counters(r.text, model, version)


def _engine_settled(metrics_url: str, model: str, version: str, wait_s: float = 0.2,
                    tries: int = 10) -> dict[str, float] | None:
    """The engine's counters once two reads wait_s apart agree: an engine publishes them every 0.5 s
    while busy and once more when it goes idle, which may come just after the last reply."""
    last = _engine(metrics_url, model, version)
    for _ in range(tries):
        if last is None:
            return None
        time.sleep(wait_s)
        now = _engine(metrics_url, model, version)
        if now == last:
            return now
        last = now
    return last


def engine_delta(a: dict[str, float] | None, b: dict[str, float] | None,
                 max_seqs: int) -> dict[str, float | None]:
    """The engine's figures over a point: its steps (all instances), the tokens generated per step
    (about the running batch's mean size) and that against max_seqs (occupancy; a little over 1 when
    full: a sequence whose prefill ends samples its first token in the step it first decodes in), the
    share of sequences admitted while others were decoding."""
    none: dict[str, float | None] = {"engine_steps": None, "engine_tokens_per_step": None,
                                     "engine_occupancy": None, "engine_joined_mid_decode": None}
    if a is None or b is None:
        return none
    d = {k: b[k] - a[k] for k in ENGINE}
    if d["steps"] <= 0 or any(v < 0 for v in d.values()):  # nothing ran, or the counters were reset
        return none
    per_step = d["decode_tokens"] / d["steps"]
    return {"engine_steps": d["steps"], "engine_tokens_per_step": round(per_step, 3),
            "engine_occupancy": round(per_step / max_seqs, 3),
            "engine_joined_mid_decode": (round(d["joined_mid_decode"] / d["finished"], 3) if d["finished"]
                                         else None)}


def _clean(r: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}


def _measure(settings: Settings, http_url: str, grpc_url: str, metrics_url: str, model: str, version: str,
             original: dict[str, Any], setting: dict[str, Any]) -> dict[str, Any]:
    """Load `setting` into the server and measure it: one point of the report."""
    from tasks.serve import loadgen, triton

    shape = load_shape(settings)
    point: dict[str, Any] = {"label": label(setting), "default": setting.get("default", False),
                             "setting": {k: v for k, v in setting.items() if k != "default"}, "error": None}
    t0 = time.monotonic()
    try:
        triton.load(http_url, model, config=model_config_for(original, setting),
                    headers=triton.admin_headers(settings))
        triton.wait_ready(http_url, settings.serve.triton.startup_timeout_s, (model,))
    except triton.TritonError as e:  # Triton keeps the previous configuration loaded: nothing to measure
        return {**point, "error": f"load failed: {e}"[:1000], "errors": 0, "requests": 0}
    point["reload_s"] = round(time.monotonic() - t0, 2)
    loaded = setting_of(triton.model_config(http_url, model, headers=triton.admin_headers(settings)))
    if not _same(loaded, setting):  # Triton filled something in, or the override did not take
        point["loaded_as"] = loaded
        log.warning("%s was loaded as %s, not %s", model, label(loaded), point["label"])
    if shape["warmup_requests"]:
        loadgen.run(grpc_url, model, shape["concurrency"], requests=shape["warmup_requests"],
                    max_tokens=shape["max_tokens"], version=version, timeout_s=shape["request_timeout_s"])
    before, engine_before = _stats(http_url, model, version), _engine_settled(metrics_url, model, version)
    r = loadgen.run(grpc_url, model, shape["concurrency"], requests=shape["requests"],
                    duration_s=shape["duration_s"], max_tokens=shape["max_tokens"], version=version,
                    timeout_s=shape["request_timeout_s"])
    after = _stats(http_url, model, version)
    engine = engine_delta(engine_before, _engine_settled(metrics_url, model, version), setting["max_seqs"])
    return {**point, **_clean(r), **_stats_delta(before, after), **engine}


MEDIAN = ("req_per_s", "tokens_per_s", "p50_ms", "p99_ms", "mean_ms", "mean_batch", "triton_mean_batch",
          "queue_ms_mean", "compute_ms_mean", "engine_tokens_per_step", "engine_occupancy",
          "engine_joined_mid_decode", "reload_s", "wall_s")
SUMMED = ("requests", "errors", "completion_tokens", "engine_steps")
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
        out[k] = (sum(r[k] for r in rounds if _num(r.get(k)))
                  if any(_num(r.get(k)) for r in rounds) else None)
    out["error"] = next((r["error"] for r in rounds if r.get("error")), None)
    out["rounds"] = [{k: r.get(k) for k in ("tokens_per_s", "req_per_s", "p50_ms", "p99_ms", "mean_batch",
                                            "engine_tokens_per_step", "errors")}
                     for r in rounds]
    return out


def _restore(http_url: str, model: str, original: dict[str, Any], timeout: float,
             admin: dict[str, str]) -> str | None:
    """Load the configuration from before back; None when it is back, else what went wrong."""
    from tasks.serve import triton

    try:
        triton.load(http_url, model, config=original, headers=admin)
        triton.wait_ready(http_url, timeout, (model,))
        now = triton.model_config(http_url, model, headers=admin)
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
         server: str = "running", metrics_url: str | None = None) -> dict[str, Any]:
    """Measure every setting of the grid on the tritonserver at http_url/grpc_url (the model loaded
    there), choose, restore, and write the report. Returns tune.json's contents (+ file paths).
    metrics_url: the server's Prometheus endpoint, for the engine's counters (default: http_url's host
    on serve.triton.metrics_port)."""
    import httpx

    from tasks.serve import triton

    model = check_name(model or settings.serve.triton.model_name)
    metrics_url = metrics_url or (f"http://{http_url.rsplit(':', 1)[0]}:"
                                  f"{settings.serve.triton.metrics_port}/metrics")
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
    admin = triton.admin_headers(settings)
    original = triton.model_config(http_url, model, headers=admin)
    why = engine_of(original)
    if why:
        raise TuneError(f"model {model!r} does not batch in the serving engine: {why}; the tuner's grid is "
                        "the engine's knobs (serve.engine.max_seqs, max_batch_tokens): export it with "
                        "serve.engine.scheduler=continuous")
    before = setting_of(original)
    points_to_run = grid(settings)
    if not _same(before, points_to_run[0]):
        log.warning("%s is loaded with %s, not serve.engine's and serve.triton's %s; it is loaded back as it "
                    "was at the end",
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
            p = _measure(settings, http_url, grpc_url, metrics_url, model, ver, original, setting)
            if i >= 0:
                measured[i].append(p)
            else:
                repeat = p
            log.info("%-16s %s", p["label"], p["error"] or
                     f"{p.get('tokens_per_s')} tok/s {p.get('req_per_s')} req/s p50 {p.get('p50_ms')} ms "
                     f"p99 {p.get('p99_ms')} ms batch {p.get('mean_batch')} "
                     f"tokens/step {p.get('engine_tokens_per_step')} errors {p.get('errors')}")
            progress.update(1)
    finally:
        problem = _restore(http_url, model, original, settings.serve.triton.startup_timeout_s, admin)
        if problem:
            log.error("could not load %s's configuration from before back: %s", model, problem)
    if problem:
        raise TuneError(f"tuning finished but {model}'s configuration from before could not be loaded back "
                        f"({problem}); reload it with `llmops serve` or "
                        f"POST /v2/repository/models/{model}/load with the {triton.ADMIN_HEADER} header")
    points = [_combine(m) for m in measured]
    choice = choose(points, slo, objective)
    chosen = next(p for p in points if p["label"] == choice["label"])
    now = dt.datetime.now(dt.UTC)
    report: dict[str, Any] = {
        "generated": now.isoformat(timespec="seconds"), "model": model, "version": ver or "newest",
        "server": {"http": http_url, "grpc": grpc_url, "kind": server,
                   "device": settings.serve.triton.device},
        "slo_p99_ms": slo, "objective": objective, "load": shape, "rounds": rounds,
        "grid": {k: list(getattr(settings.serve.tune, k)) for k in KNOBS} | {"skipped": skipped(settings)},
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
                                                       report["model"]))
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
        per_step = p.get("engine_tokens_per_step")
        rows.append(f"{n:>2} {p['label']:<16} {p[obj]:>9.1f} {p['p99_ms']:>8.1f} "
                    f"{format(per_step, '.2f') if _num(per_step) else '-':>6}{mark}")
    rows += [f" - {p['label']:<16} {'failed':>9}" for p in report["points"] if not _eligible(p)]
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
    head = f"{'#':>2} {'setting':<16} {obj:>9} {'p99 ms':>8} {'tok/st':>6}"
    fig.text(0.64, 0.9, "\n".join([head, *rows]), family="monospace", fontsize=7.5, va="top")
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- the CLI's entry


def apply(settings: Settings, report: dict[str, Any], http_url: str | None = None) -> dict[str, Any]:
    """Write the chosen setting into the repository's config.pbtxt of the model and reload it when it
    is loaded at http_url. A later `llmops export` writes serve.engine's and serve.triton's values
    again: the report's overrides belong in configs/serve.yaml to keep them."""
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
            # config.pbtxt changed on disk: the load reads it
            triton.load(http_url, name, headers=triton.admin_headers(settings))
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
            report = tune(settings, tp.http_url, tp.grpc_url, model, version, server="own",
                          metrics_url=tp.metrics_url)
        finally:
            tp.stop()
    else:
        report = tune(settings, u["triton_http"], u["triton_grpc"], model, version,
                      metrics_url=u["triton_metrics"])
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
