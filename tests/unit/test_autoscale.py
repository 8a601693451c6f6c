"""The autoscaling policy, its replay over the committed load curve, and the signals read over real HTTP."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tasks.config import AutoscaleConfig
from tasks.loop.autoscale import (
    AutoscaleError,
    derive,
    last_change_at,
    load_curve,
    parse,
    recommend,
    recommendations_log,
    signals,
    simulate,
    summarize,
)
from tasks.ops.cli import app
from tasks.procs import free_port
from tests.helpers.project import REPO, make_settings

# min 1, max 8, warm 1, target 0.7, queue 2/instance, scale-in below 0.3, cooldown 300 s
CFG = AutoscaleConfig()
CURVE = REPO / "tests" / "data" / "load_curve.csv"
HOUR = 3600.0
BURST = (10.5 * HOUR, 11.25 * HOUR)  # the curve's burst (10:30-10:45) and the quarter hour it takes to drain


# ---------------------------------------------------------------- policy


def test_queue_burst_scales_out_at_once_even_inside_the_cooldown():
    d = recommend({"queue_depth": 12, "utilization": 0.5}, 2, CFG, last_change_at=1000.0, now=1060.0)
    # 6 per instance > 2: enough instances for the queue to fall to 2 each (12 / 2 = 6)
    assert (d.action, d.instances, d.target, d.trigger) == ("scale_out", 2, 6, "queue")
    assert "queue/instance 6.00 > scale_out_queue_per_instance=2" in d.reason
    assert "bypassing cooldown 60s of 300s" in d.reason


def test_utilisation_scales_out_to_the_target_but_waits_for_the_cooldown():
    d = recommend({"queue_depth": 0, "utilization": 0.95}, 4, CFG, last_change_at=None, now=0.0)
    # 4 x 0.95 = 3.8 busy instances; at 0.7 each that needs ceil(5.43) = 6
    assert (d.action, d.target, d.trigger) == ("scale_out", 6, "utilization")
    assert "utilization 0.950 > target_utilization=0.7" in d.reason
    held = recommend({"queue_depth": 0, "utilization": 0.95}, 4, CFG, last_change_at=0.0, now=120.0)
    assert (held.action, held.target) == ("hold", 4) and "cooldown 120s of 300s" in held.reason


def test_scale_in_is_one_instance_at_a_time_and_respects_the_cooldown():
    idle = {"queue_depth": 0, "utilization": 0.1}
    d = recommend(idle, 6, CFG, last_change_at=None, now=0.0)
    assert (d.action, d.target, d.trigger) == ("scale_in", 5, "idle")  # not straight to 1
    assert "utilization 0.100 < scale_in_utilization=0.3" in d.reason
    assert recommend(idle, 5, CFG, last_change_at=0.0, now=299.0).action == "hold"
    assert recommend(idle, 5, CFG, last_change_at=0.0, now=300.0).target == 4
    # any queue at all keeps the instances
    assert recommend({"queue_depth": 1, "utilization": 0.1}, 5, CFG, None, 0.0).action == "hold"


def test_scale_in_never_makes_the_rest_exceed_the_target():
    cfg = AutoscaleConfig(scale_in_utilization=0.5, target_utilization=0.6)
    d = recommend({"queue_depth": 0, "utilization": 0.45}, 2, cfg, None, 0.0)
    assert d.action == "hold" and "one fewer instance would run at 0.90 > target_utilization=0.6" in d.reason


def test_bounds():
    burst = {"queue_depth": 100, "utilization": 1.0}
    d = recommend(burst, 4, CFG, None, 0.0)
    assert d.target == 8 and "wanted 50, capped by max_instances" in d.reason
    assert recommend(burst, 8, CFG, None, 0.0).action == "hold"  # already at max
    assert "already at max_instances=8" in recommend(burst, 8, CFG, None, 0.0).reason
    assert recommend({"queue_depth": 0, "utilization": 0.0}, 1, CFG, None, 0.0).action == "hold"  # at min
    cfg = AutoscaleConfig(min_instances=2, max_instances=4)
    d = recommend({"queue_depth": 0, "utilization": 0.0}, 1, cfg, 0.0, 1.0)
    assert (d.action, d.target, d.trigger) == ("scale_out", 2, "bounds") and \
        "below min_instances=2" in d.reason
    d = recommend({"queue_depth": 0, "utilization": 0.5}, 6, cfg, 0.0, 1.0)  # bounds ignore the cooldown
    assert (d.action, d.target, d.trigger) == ("scale_in", 4, "bounds")
    with pytest.raises(ValueError, match="current instances"):
        recommend({}, 0, CFG, None, 0.0)


def test_warm_pool_is_kept_beside_the_target_but_not_past_max():
    assert recommend({"queue_depth": 0, "utilization": 0.5}, 3, CFG, None, 0.0).warm == 1
    assert recommend({"queue_depth": 100, "utilization": 1.0}, 4, CFG, None, 0.0).warm == 0  # target 8 = max
    cfg = AutoscaleConfig(warm_pool=3)
    assert recommend({"queue_depth": 0, "utilization": 0.95}, 4, cfg, None, 0.0).warm == 2  # 6 + 2 = 8
    assert recommend({"queue_depth": 0, "utilization": 0.5}, 3, AutoscaleConfig(warm_pool=0),
                     None, 0.0).warm == 0


# ---------------------------------------------------------------- replay of the committed day


@pytest.fixture(scope="module")
def curve():
    rows = load_curve(CURVE)
    assert len(rows) == 1440 and rows[-1][0] == 86_340  # one day, per minute
    return rows


def _at(timeline, hour):
    return min(timeline, key=lambda r: abs(r["t"] - hour * HOUR))


def test_policy_follows_the_day_and_keeps_the_queue_bounded(curve):
    tl = simulate(curve, CFG, capacity_rps_per_instance=4.0, step_s=10.0, cold_start_s=120.0)
    s = summarize(tl, 10.0)
    assert s["steps"] == 8640
    # up with the afternoon peak (~20 req/s needs 20 / 4 / 0.7 = 7.1 -> 8) and back down at night
    assert _at(tl, 4)["instances"] == 1
    assert max(r["instances"] for r in tl if 14 * HOUR <= r["t"] <= 18 * HOUR) == 8
    assert _at(tl, 23.99)["instances"] <= 2
    assert all(r["utilization"] <= 0.75 for r in tl if 14 * HOUR <= r["t"] <= 18 * HOUR)
    # the diurnal ramp is followed without any queue; the burst's queue drains in minutes
    assert max(r["queue"] for r in tl if not BURST[0] <= r["t"] < BURST[1]) == 0
    assert s["peak_queue"] < 1000 and s["max_wait_s"] < 60
    # a fixed single instance (the floor) drowns: the policy is what bounds the queue
    fixed = summarize(simulate(curve, AutoscaleConfig(max_instances=1, warm_pool=0), 4.0, 10.0), 10.0)
    assert fixed["peak_queue"] > 100 * s["peak_queue"]


def test_a_warm_pool_shortens_the_burst_at_a_price(curve):
    runs = {w: simulate(curve, AutoscaleConfig(warm_pool=w), 4.0, 10.0, cold_start_s=120.0) for w in (0, 1)}
    peak = {w: max(r["queue"] for r in tl if BURST[0] <= r["t"] < BURST[1]) for w, tl in runs.items()}
    wait = {w: max(r["wait_s"] for r in tl) for w, tl in runs.items()}
    assert peak[0] > 1.5 * peak[1] and wait[0] > 1.5 * wait[1]
    # the burst arrived outside any cooldown: the scale-out came on its first step
    first = next(r for r in runs[1] if r["t"] >= BURST[0] and r["action"] == "scale_out")
    assert first["t"] == BURST[0] and first["trigger"] == "queue" and first["target"] == 8
    # what the warm instance costs: its idle hours
    hours = {w: summarize(tl, 10.0) for w, tl in runs.items()}
    assert hours[1]["warm_instance_hours"] > 10 and hours[0]["warm_instance_hours"] == 0


def test_the_cooldown_limits_how_often_the_count_changes():
    # a load that flips between 2 and 9 req/s every 2 minutes for 2 hours: a flapping trap
    flappy = [(float(t), 9.0 if (t // 120) % 2 else 2.0) for t in range(0, 7200, 60)]
    changes = {}
    for cooldown in (0.0, 300.0):
        tl = simulate(flappy, AutoscaleConfig(cooldown_s=cooldown), 4.0, 10.0, cold_start_s=30.0)
        changes[cooldown] = [r for r in tl if r["action"] != "hold"]
    assert len(changes[0.0]) > 3 * len(changes[300.0])
    assert len(changes[300.0]) <= 7200 / 300 + 1
    for a, b in zip(changes[300.0], changes[300.0][1:], strict=False):  # only a queue burst comes sooner
        assert b["t"] - a["t"] >= 300 or (b["action"] == "scale_out" and b["trigger"] == "queue"), (a, b)


def test_day_replay_respects_the_cooldown(curve):
    tl = simulate(curve, CFG, 4.0, 10.0, cold_start_s=120.0)
    changes = [r for r in tl if r["action"] != "hold"]
    assert 4 <= len(changes) <= 30
    ins = [r["t"] for r in changes if r["action"] == "scale_in"]
    assert all(b - a >= CFG.cooldown_s for a, b in zip(ins, ins[1:], strict=False))


def test_a_bad_load_curve_names_the_line(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("t_s,arrival_rps\n0,1\n60,x\n")
    with pytest.raises(AutoscaleError, match=r"c.csv:3: not numbers"):
        load_curve(p)
    p.write_text("t,rps\n0,1\n")
    with pytest.raises(AutoscaleError, match="header must name t_s and arrival_rps"):
        load_curve(p)


# ---------------------------------------------------------------- signals, over real HTTP

# Triton's exposition format (names, HELP/TYPE lines, labels) as tritonserver writes it; a second
# model and the CPU gauges are there to be ignored.
TRITON = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{{model="chat-gpt",version="1"}} {ok}
nv_inference_request_success{{model="chat-gpt-small",version="1"}} {s_ok}
nv_inference_request_success{{model="other",version="3"}} {ok}
# HELP nv_inference_request_failure Number of failed inference requests, all batch sizes
# TYPE nv_inference_request_failure counter
nv_inference_request_failure{{model="chat-gpt",reason="OTHER",version="1"}} 0
nv_inference_request_failure{{model="chat-gpt",reason="BACKEND",version="1"}} 0
nv_inference_request_failure{{model="chat-gpt",reason="REJECTED",version="1"}} 0
nv_inference_request_failure{{model="chat-gpt",reason="CANCELED",version="1"}} 0
# HELP nv_inference_count Number of inferences performed (does not include cached requests)
# TYPE nv_inference_count counter
nv_inference_count{{model="chat-gpt",version="1"}} {ok}
nv_inference_count{{model="chat-gpt-small",version="1"}} {s_ok}
nv_inference_count{{model="other",version="3"}} {ok}
# HELP nv_inference_exec_count Number of model executions performed (does not include cached requests)
# TYPE nv_inference_exec_count counter
nv_inference_exec_count{{model="chat-gpt",version="1"}} {ex}
nv_inference_exec_count{{model="chat-gpt-small",version="1"}} {s_ok}
nv_inference_exec_count{{model="other",version="3"}} 1
# HELP nv_inference_request_duration_us Cumulative inference request duration in microseconds \
(includes cached requests)
# TYPE nv_inference_request_duration_us counter
nv_inference_request_duration_us{{model="chat-gpt",version="1"}} {req_us}
nv_inference_request_duration_us{{model="chat-gpt-small",version="1"}} {s_us}
nv_inference_request_duration_us{{model="other",version="3"}} 99999999
# HELP nv_inference_queue_duration_us Cumulative inference queuing duration in microseconds \
(includes cached requests)
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{{model="chat-gpt",version="1"}} {q_us}
nv_inference_queue_duration_us{{model="chat-gpt-small",version="1"}} 0
# HELP nv_inference_compute_infer_duration_us Cumulative compute inference duration in microseconds \
(does not include cached requests)
# TYPE nv_inference_compute_infer_duration_us counter
nv_inference_compute_infer_duration_us{{model="chat-gpt",version="1"}} {inf_us}
nv_inference_compute_infer_duration_us{{model="chat-gpt-small",version="1"}} {s_us}
nv_inference_compute_infer_duration_us{{model="other",version="3"}} 99999999
# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting execution \
per-model.
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{{model="chat-gpt",version="1"}} {pend}
nv_inference_pending_request_count{{model="chat-gpt-small",version="1"}} {s_pend}
nv_inference_pending_request_count{{model="other",version="3"}} 50
# HELP nv_cpu_utilization CPU utilization rate [0.0 - 1.0]
# TYPE nv_cpu_utilization gauge
nv_cpu_utilization 0.02255639097744361
"""
# first and second scrape. chat-gpt: +40 requests in 10 batches of 4, each batch 100 ms of compute,
# which Triton adds to each of its 4 requests (+4 s); busy 1 s. stream: +10 requests unbatched,
# 200 ms each, busy 2 s. Queue now: 3 + 1 at Triton, 5 at the gateway.
T1 = {"ok": 100, "ex": 50, "req_us": 3_000_000, "q_us": 100_000, "inf_us": 2_000_000, "s_ok": 20,
      "s_us": 4_000_000, "pend": 0, "s_pend": 0}
T2 = {"ok": 140, "ex": 60, "req_us": 9_000_000, "q_us": 500_000, "inf_us": 6_000_000, "s_ok": 30,
      "s_us": 6_000_000, "pend": 3, "s_pend": 1}


def gateway_text(prompt: float, completion: float, queue: float) -> str:
    """The gateway's /metrics body, written by the gateway's own Metrics registry."""
    from prometheus_client import generate_latest

    from tasks.serve.gateway import Metrics

    m = Metrics(60.0, 0.10)
    m.tokens.labels("chat-gpt:1", "prompt").inc(prompt)
    m.tokens.labels("chat-gpt:1", "completion").inc(completion)
    m.tokens.labels("chat-gpt:2", "completion").inc(100)
    m.queue.set(queue)
    m.inflight.set(16)
    m.tps.set(240.5)
    return generate_latest(m.registry).decode()


G1, G2 = gateway_text(5000, 1000, 0), gateway_text(9000, 1500, 5)


class _Metrics(ThreadingHTTPServer):
    """Serves the next payload of its list on each GET /metrics (the last one again after that)."""

    def __init__(self, payloads: list[str]):
        self.payloads, self.hits = payloads, 0
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]


class _Handler(BaseHTTPRequestHandler):
    server: _Metrics

    def do_GET(self):  # noqa: N802 - the http.server API
        if self.path != "/metrics":
            self.send_error(404)
            return
        body = self.server.payloads[min(self.server.hits, len(self.server.payloads) - 1)].encode()
        self.server.hits += 1
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def servers(tmp_path):
    triton = _Metrics([TRITON.format(**T1), TRITON.format(**T2)])
    gateway = _Metrics([G1, G2])
    s = make_settings(tmp_path, f"serve.triton.metrics_port={triton.port}",
                      f"serve.gateway.port={gateway.port}", "serve.triton.instances=2",
                      "serve.triton.max_batch_size=8")
    yield s, triton, gateway
    for srv in (triton, gateway):
        srv.shutdown()
        srv.server_close()


def test_derive_from_two_scrapes(tmp_path):
    s = make_settings(tmp_path, "serve.triton.instances=2", "serve.triton.max_batch_size=8")
    out = derive(parse(TRITON.format(**T1)), parse(TRITON.format(**T2)), parse(G1), parse(G2), 2.0, s)
    pools = {p["model"]: p for p in out["raw"]["pools"]}
    assert set(pools) == {"chat-gpt", "chat-gpt-small"}  # "other" is not ours
    main, stream = pools["chat-gpt"], pools["chat-gpt-small"]
    # 4 s of per-request compute over 40 requests in 10 executions = 1 s busy; / (2 s x 2 instances)
    assert (main["busy_s"], main["utilization"], main["mean_batch"], main["batch_fill"]) == \
        (1.0, 0.25, 4.0, 0.5)
    assert (main["mean_request_ms"], main["mean_queue_ms"]) == (150.0, 10.0)
    assert (stream["busy_s"], stream["utilization"], stream["batch_fill"]) == (2.0, 0.5, 0.125)
    # the headline is the busiest pool's; the queue is Triton's pending plus the gateway's
    assert (out["utilization"], out["batch_fill"], out["queue_depth"], out["instances"]) == \
        (0.5, 0.125, 9.0, 2)
    assert (out["tokens_per_s"], out["tokens_per_s_per_instance"], out["requests_per_s"]) == \
        (250.0, 125.0, 25.0)
    assert out["raw"]["gateway_tokens_per_second_gauge"] == 240.5 and out["raw"]["gateway_inflight"] == 16.0
    # a counter that went down was a restart: the new value is the whole delta
    reset = derive(parse(TRITON.format(**T2)), parse(TRITON.format(**T1)), parse(G1), parse(G1), 2.0, s)
    assert {p["model"]: p["requests"] for p in reset["raw"]["pools"]} == \
        {"chat-gpt": 100, "chat-gpt-small": 20}


def test_signals_over_http(servers):
    s, triton, gateway = servers
    out = signals(s, interval_s=0.2)
    assert triton.hits == gateway.hits == 2
    assert 0.2 <= out["interval_s"] < 2.0
    stream = next(p for p in out["raw"]["pools"] if p["model"] == "chat-gpt-small")
    assert stream["utilization"] == pytest.approx(2.0 / (out["interval_s"] * 2), rel=1e-2)
    assert out["utilization"] == 1.0  # 2 s of work in a 0.2 s interval: the headline is capped
    assert out["tokens_per_s"] == pytest.approx(500 / out["interval_s"], rel=1e-2)
    assert out["queue_depth"] == 9.0 and out["batch_fill"] == 0.125
    assert out["sources"]["triton"] == f"http://127.0.0.1:{triton.port}/metrics"


def test_a_server_that_is_down_is_named(tmp_path):
    port = free_port()
    s = make_settings(tmp_path, f"serve.triton.metrics_port={port}")
    with pytest.raises(AutoscaleError, match=rf"cannot read metrics from http://127.0.0.1:{port}/metrics"):
        signals(s, interval_s=0.1)


# ---------------------------------------------------------------- the command


runner = CliRunner()


def test_cli_prints_and_logs_the_recommendation(servers):
    s, triton, gateway = servers
    args = ["--set", f"paths.root={s.paths.root}", "--set", f"serve.triton.metrics_port={triton.port}",
            "--set", f"serve.gateway.port={gateway.port}", "--set", "serve.triton.instances=2"]
    r = runner.invoke(app, ["autoscale", "--interval", "0.2", *args])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout[r.stdout.index("{"):])
    # 9 waiting over 2 instances = 4.5 each > 2: out to ceil(9 / 2) = 5, one warm beside them
    assert out["decision"] | {"reason": ""} == {"action": "scale_out", "instances": 2, "target": 5, "warm": 1,
                                                "reason": "", "trigger": "queue"}
    lines = recommendations_log(s).read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["decision"]["target"] == 5
    assert last_change_at(recommendations_log(s)) == json.loads(lines[0])["ts"]
    from prometheus_client.parser import text_string_to_metric_families

    gauges = {f.name: f.samples[0].value
              for f in text_string_to_metric_families(Path(out["metrics"]).read_text())}
    assert gauges["llmops_autoscale_recommended_instances"] == 5 and \
        gauges["llmops_autoscale_queue_depth"] == 9
    assert gauges["llmops_autoscale_instances"] == 2

    down = runner.invoke(app, ["autoscale", "--interval", "0.1", "--set", f"paths.root={s.paths.root}",
                               "--set", f"serve.triton.metrics_port={free_port()}"])
    assert down.exit_code == 1 and "cannot read metrics from http://127.0.0.1:" in down.output


def test_cli_replays_a_load_curve(tmp_path):
    r = runner.invoke(app, ["autoscale", "--replay", str(CURVE), "--cold-start", "120",
                            "--set", f"paths.root={tmp_path}"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["summary"]["max_instances"] == 8 and out["changes"][0]["action"] == "scale_out"


def _engine_text(ok, busy, steps, tokens, running, waiting, kv):
    lines = [f'nv_inference_request_success{{model="chat-gpt",version="3"}} {ok}',
             f'nv_inference_count{{model="chat-gpt",version="3"}} {ok}',
             f'nv_inference_exec_count{{model="chat-gpt",version="3"}} {ok}',
             # execute() only hands requests to the engine: Triton's compute time says nothing
             'nv_inference_compute_infer_duration_us{model="chat-gpt",version="3"} 10']
    for i, share in enumerate((0.25, 0.75)):  # two instances, each its own series
        lab = f'model="chat-gpt",version="3",instance="chat-gpt_{i}"'
        lines += [f"llmops_engine_busy_seconds{{{lab}}} {busy * share}",
                  f"llmops_engine_steps{{{lab}}} {steps * share}",
                  f"llmops_engine_decode_tokens{{{lab}}} {tokens * share}",
                  f"llmops_engine_running{{{lab}}} {running * share}",
                  f"llmops_engine_waiting{{{lab}}} {waiting * share}",
                  f"llmops_engine_kv_use{{{lab}}} {kv * (i + 1) / 2}"]
    return "\n".join(lines) + "\n"


def test_derive_reads_the_continuous_engine_s_own_signals(tmp_path):
    s = make_settings(tmp_path, "serve.triton.instances=2", "serve.engine.max_seqs=8")
    a = parse(_engine_text(100, 10.0, 1000, 4000, 0, 0, 0.0))
    b = parse(_engine_text(140, 12.0, 1100, 4600, 8, 4, 0.5))
    out = derive(a, b, parse(G1), parse(G1), 2.0, s)
    [pool] = out["raw"]["pools"]
    assert pool["scheduler"] == "continuous"
    # 2 s of stepping over 2 s x 2 instances; 600 tokens in 100 steps = 6 sequences per step of 8
    assert (pool["busy_s"], pool["utilization"], pool["mean_batch"], pool["batch_fill"]) == \
        (2.0, 0.5, 6.0, 0.75)
    assert (pool["engine_running"], pool["engine_waiting"], pool["kv_use"]) == (8.0, 4.0, 0.5)
    assert out["queue_depth"] == 4.0 + out["raw"]["gateway_queue_depth"] and out["kv_use"] == 0.5
