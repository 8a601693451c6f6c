"""Latency by phase: the gateway's split of one request, and the report's breakdown at percentiles."""

import datetime as dt
import json
from pathlib import Path

import pytest

from tasks.errors import InputError
from tasks.loop.latency import PHASES, breakdown, latency_report
from tasks.serve.gateway.metrics import phases
from tests.helpers.project import make_settings


def test_phases_partition_the_total_and_show_a_clock_disagreement():
    out = {"server_ms": 80.0, "engine": {"queue_ms": 5.0, "prefill_ms": 10.0, "decode_ms": 60.0, "steps": 7}}
    ph = phases(100.0, out)
    assert ph == {"gateway_ms": 20.0, "network_ms": 5.0, "queue_ms": 5.0, "prefill_ms": 10.0,
                  "decode_ms": 60.0}
    assert sum(ph.values()) == pytest.approx(100.0)
    # an engine that claims more time than the round trip: network goes negative, not hidden
    assert phases(100.0, {**out, "server_ms": 70.0})["network_ms"] == -5.0
    assert phases(100.0, {"server_ms": 80.0}) is None  # an older export: no engine phases


def _line(total, decode, ts):
    rest = (total - decode) / 4
    return {"ts": ts, "latency_ms": total,
            "phases": {"gateway_ms": rest, "network_ms": rest, "queue_ms": rest, "prefill_ms": rest,
                       "decode_ms": decode}}


def test_breakdown_at_percentiles_sums_to_each_total():
    ts = dt.datetime.now(dt.UTC).isoformat()
    rows = [_line(10.0 + i, 5.0, ts) for i in range(99)] + [_line(1000.0, 900.0, ts)]  # one slow decode
    b = breakdown(rows, band=0.0)
    assert b["requests"] == 100
    assert b["at"]["p50"]["total_ms"] == pytest.approx(59.5)
    p99 = b["at"]["p99"]
    assert sum(p99[k] for k in PHASES) == pytest.approx(108.0)  # the 99th of 100 by rank
    assert b["per_phase"]["decode_ms"]["p50"] == 5.0 and b["sum_gap"]["max"] == 0.0
    with pytest.raises(InputError, match="no request"):
        breakdown([{"ts": ts, "latency_ms": 5.0}])  # a refusal: no phases


def test_latency_report_reads_the_window_and_writes_json_and_plot(tmp_path):
    s = make_settings(tmp_path)
    now = dt.datetime.now(dt.UTC)
    day = s.paths.requests / f"dt={now.date().isoformat()}"
    day.mkdir(parents=True)
    old = (now - dt.timedelta(hours=5)).isoformat()
    lines = [_line(20.0 + i, 10.0, now.isoformat()) for i in range(20)] + [_line(5000.0, 10.0, old)]
    (day / "gw.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"cut by a cra')
    r = latency_report(s, since_hours=1, now=now + dt.timedelta(seconds=1))
    assert r["requests"] == 20 and r["at"]["p99"]["total_ms"] < 5000
    assert all(Path(p).stat().st_size > 0 for p in r["files"].values())
