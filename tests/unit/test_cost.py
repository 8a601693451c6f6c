"""The cost report against a real MLflow store (sqlite in tmp_path) and request logs in the gateway's
format."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tasks.loop.cost import cost_report, serving_costs
from tasks.ops.cli import app
from tasks.tracking import mlflow_client
from tests.helpers.project import make_settings

UTC = dt.UTC
NOW = dt.datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
T0 = dt.datetime(2026, 11, 19, 8, 0, tzinfo=UTC)
PRICES = ["monitor.train_cost_per_hour_usd=2.0", "serve.gateway.cost_per_hour_usd=3.6"]


def _ms(t: dt.datetime) -> int:
    return int(t.timestamp() * 1000)


def _train_run(client, exp: str, name: str, start: dt.datetime, minutes: float,
               params: dict[str, int], steps: int, device: str | None, tokens_per_s: float) -> str:
    """A finished training run as tasks/train/launch.py leaves it: flattened params, per-step loss,
    summary metrics."""
    from mlflow.entities import Metric, Param, RunTag

    tags = [RunTag("llmops.stage", "train")] + ([RunTag("llmops.device", device)] if device else [])
    run = client.create_run(exp, start_time=_ms(start), run_name=name)
    rid = run.info.run_id
    client.log_batch(rid, params=[Param(k, str(v)) for k, v in params.items()], tags=tags,
                     metrics=[Metric("loss", 5.0 - s / steps, _ms(start), s) for s in range(1, steps + 1)]
                     + [Metric("summary.tokens_per_s", tokens_per_s, _ms(start), 0)])
    client.set_terminated(rid, "FINISHED", end_time=_ms(start + dt.timedelta(minutes=minutes)))
    return rid


def _record(end: dt.datetime, version: int | None, status: int = 200, latency_ms: float | None = 2000.0,
            completion: int = 0) -> dict:
    """One request log line with the keys tasks/serve/gateway.py writes."""
    r = {"ts": end.isoformat(), "request_id": f"chatcmpl-{end.timestamp():.0f}",
         "safety_version": "2026.11.1"}
    if version is not None:
        r |= {"model": "chat-gpt", "version": version, "alias": "champion" if version == 1 else "challenger",
              "session": "s1", "stream": False, "priority": "interactive",
              "safety_input": {"blocked": False, "rule": None, "score": 0.01}}
    r["status"] = status
    if latency_ms is not None and status == 200:
        r |= {"latency_ms": latency_ms, "ttft_ms": latency_ms, "prompt_tokens": 20,
              "completion_tokens": completion, "finish_reason": "length", "batch_size": 2,
              "prompt": "where is my order", "response": "it ships today"}
    elif status >= 500:
        r["error"] = "model_server_unavailable"
    else:
        r["error"] = "invalid_value"
    return r


def _write_log(root: Path, day: str, name: str, lines: list[dict | str]) -> None:
    d = root / f"dt={day}"
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def at(hms: str) -> dt.datetime:
    return dt.datetime.fromisoformat(f"2026-11-20T{hms}+00:00")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("cost")
    s = make_settings(root, *PRICES)
    client = mlflow_client(s)
    exp = client.create_experiment("chat-gpt", artifact_location=(root / "artifacts").as_uri())
    # run A: 2 CPU ranks x 8 sequences x 128 tokens, 200 steps, 30 minutes
    a = _train_run(client, exp, "tiny-a", T0, 30,
                   {"train.world_size": 2, "train.micro_batch": 8, "train.grad_accum": 1,
                    "model.block_size": 128, "train.max_steps": 200}, 200, "cpu", 4096.0)
    # run B: 4 GPUs x 4 sequences x 2 accumulation x 64 tokens, 100 steps, 6 minutes; fp32 and its
    # int8 variant
    b = _train_run(client, exp, "tiny-b", T0 + dt.timedelta(hours=2), 6,
                   {"train.world_size": 4, "train.micro_batch": 4, "train.grad_accum": 2,
                    "model.block_size": 64, "train.max_steps": 100}, 100, "gpu", 10_000.0)
    client.create_registered_model("chat-gpt")
    for run, variant in ((a, "fp32"), (b, "fp32"), (b, "int8")):
        client.create_model_version("chat-gpt", f"{root.as_uri()}/artifacts/{run}", run_id=run,
                                    tags={"variant": variant})

    # request logs: v1 alone from 10:00, v2 (the canary) from 10:03 to 10:07, everything ends 10:10
    req = s.paths.requests
    v1 = [_record(at(t), 1, completion=100)
          for t in ("10:00:02", "10:01:00", "10:02:00", "10:03:00", "10:04:00", "10:05:00", "10:06:00",
                    "10:08:00", "10:10:00")]
    v2 = [_record(at(t), 2, completion=50) for t in ("10:04:30", "10:05:30", "10:06:30")]
    noise = [
        _record(at("10:05:45"), 2, status=503, latency_ms=None),  # a request Triton never answered: no work
        _record(at("10:07:00"), None, status=400),                # refused before routing: no version
        '{"ts": "2026-11-20T10:09:00+00:00", "version": 1, "sta']  # a line cut by a crash
    _write_log(req, "2026-11-20", "gateway-101.jsonl", v1 + noise)
    _write_log(req, "2026-11-20", "gateway-102.jsonl", v2)
    _write_log(req, "2026-11-16", "gateway-101.jsonl",
               [_record(dt.datetime(2026, 11, 16, 9, tzinfo=UTC), 1, completion=999)])
    _write_log(req / "shadow", "2026-11-20", "gateway-101.jsonl",
               [{"ts": at("10:05:00").isoformat(), "request_id": "x",
                 "challenger": {"version": 2, "completion_tokens": 77}}])
    return s


def test_training_cost_per_version(store):
    report = cost_report(store, since_hours=24, now=NOW)
    t = report["train"]
    assert set(t) == {"1", "2", "3"}
    # A: 200 x 8 x 1 x 2 x 128 = 409,600 tokens; 0.5 h of a $2/h machine = $1.00;
    # 2 ranks -> 1.0 CPU-rank-hours
    a = t["1"]
    assert (a["tokens"], a["wall_h"], a["usd"], a["device_hours"], a["device_hours_unit"]) == \
        (409_600, 0.5, 1.0, 1.0, "CPU-rank-hours")
    assert a["usd_per_1m_tokens"] == pytest.approx(1.0 / 409_600 * 1e6)        # $2.44
    assert a["usd_per_1m_tokens_steps_only"] == pytest.approx(2.0 / (4096 * 3600) * 1e6, abs=1e-6)
    # B: 100 x 4 x 2 x 4 x 64 = 204,800 tokens; 0.1 h -> $0.20; 4 GPUs -> 0.4 GPU-hours
    b = t["2"]
    assert (b["tokens"], b["usd"], b["device_hours"], b["device_hours_unit"]) == \
        (204_800, 0.2, 0.4, "GPU-hours")
    assert b["usd_per_1m_tokens"] == pytest.approx(0.9765625)
    # the int8 variant is the same training run: same figures, and the totals count the run once
    assert t["3"]["variant"] == "int8" and t["3"]["usd"] == 0.2 and t["3"]["shares_run_with"] == ["2"]
    tot = report["totals"]
    assert (tot["train_runs"], tot["train_usd"], tot["train_tokens"]) == (2, 1.2, 614_400)
    assert tot["train_usd_per_1m_tokens"] == pytest.approx(1.2 / 614_400 * 1e6)


def test_serving_cost_per_version(store):
    report = cost_report(store, since_hours=24, now=NOW)
    sv = report["serve"]
    # the machine served from 10:00:00 (first start: 10:00:02 - 2 s) to 10:10:00: 600 s at $3.60/h = $0.60
    assert (sv["span_s"], sv["usd"], sv["completion_tokens"]) == (600.0, 0.6, 1050)
    v1, v2 = sv["versions"]["1"], sv["versions"]["2"]
    # the 400 had no version; 11-16 is outside the window; shadow not counted
    assert set(sv["versions"]) == {"1", "2"}
    # busy: v1 9 x 2 s = 18 s, v2 3 x 2 s = 6 s (the 503 did no work) -> shares 3/4 and 1/4 of $0.60
    assert (v1["requests"], v1["busy_s"], v1["busy_share"], v1["usd"]) == (9, 18.0, 0.75, 0.45)
    assert (v2["requests"], v2["ok"], v2["errors"], v2["busy_s"], v2["usd"]) == (4, 3, 1, 6.0, 0.15)
    assert v1["usd_per_1m_tokens"] == pytest.approx(0.45 / 900 * 1e6)   # $500
    assert v2["usd_per_1m_tokens"] == pytest.approx(0.15 / 150 * 1e6)   # $1000
    assert (v1["wall_s"], v2["wall_s"]) == (600.0, 122.0)
    assert v1["tokens_per_s"] == pytest.approx(900 / 600)
    assert sv["usd_per_1m_tokens"] == pytest.approx(0.6 / 1050 * 1e6)


def test_one_version_alone_costs_the_machine_at_its_measured_throughput(store):
    sv = serving_costs(store, at("10:00:00"), at("10:02:30"))  # v1's first three requests only
    v1 = sv["versions"]["1"]
    assert (v1["wall_s"], v1["completion_tokens"], v1["busy_share"]) == (120.0, 300, 1.0)
    # 300 tokens in 120 s = 2.5 tokens/s; $3.60/h / (3600 x 2.5) x 1e6 = $400 per 1M
    assert v1["tokens_per_s"] == 2.5
    assert v1["usd_per_1m_tokens"] == pytest.approx(3.6 / (3600 * 2.5) * 1e6)


def test_report_files_and_version_tags(store):
    report = cost_report(store, since_hours=24, now=NOW)
    path = Path(report["report"])
    assert path.parent.name == "20261120T120000Z" and (path.parent / "_SUCCESS").is_file()
    saved = json.loads(path.read_text())
    assert saved["train"]["1"]["usd_per_1m_tokens"] == report["train"]["1"]["usd_per_1m_tokens"]
    html = Path(report["html"]).read_text()
    assert "<h2>Training</h2>" in html and "GPU-hours" in html and "2.44141" in html
    client = mlflow_client(store)
    v1 = client.get_model_version("chat-gpt", "1").tags
    assert v1["cost.train_usd_per_1m_tokens"] == "2.44141" and v1["cost.serve_usd_per_1m_tokens"] == "500"
    assert v1["cost.train_device_hours"] == "1 CPU-rank-hours" and v1["cost.report"] == report["report"]
    assert "cost.serve_usd_per_1m_tokens" not in \
        client.get_model_version("chat-gpt", "3").tags  # never served


def test_no_registry_and_no_logs_is_an_empty_report_not_an_error(tmp_path):
    report = cost_report(make_settings(tmp_path), since_hours=1)
    assert report["train"] == {} and report["serve"]["versions"] == {} and \
        "no request logs" in report["serve"]["note"]
    with pytest.raises(ValueError, match="since_hours must be > 0"):
        cost_report(make_settings(tmp_path), since_hours=0)


def test_cli(store):
    r = CliRunner().invoke(app, ["cost", "--since-hours", "1", "--set", f"paths.root={store.paths.root}",
                                 *[x for p in PRICES for x in ("--set", p)]])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["train"]["1"]["usd_per_1m_tokens"] == pytest.approx(2.44140625) and Path(out["html"]).is_file()
