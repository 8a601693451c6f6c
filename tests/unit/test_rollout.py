"""The canary judge on synthetic samples: thresholds, significance, minimum samples; and log parsing."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest

from tasks.config import RolloutConfig
from tasks.rollout import Sample, compare, read_requests, samples
from tests.conftest import make_settings

CFG = RolloutConfig(min_samples=50, max_p99_regression_ms=50, max_safety_regression=0.05, max_error_rate=0.02)


def _sample(rng, n, mean_ms, sd_ms=10.0, safety=0, errors=0) -> Sample:
    return Sample(latencies_ms=list(rng.normal(mean_ms, sd_ms, n - errors)), requests=n, errors=errors, safety_hits=safety)


def test_same_distribution_passes_and_a_clearly_slower_challenger_fails():
    rng = np.random.default_rng(0)
    champ = _sample(rng, 400, 100)
    assert compare(champ, _sample(rng, 400, 100), CFG)["verdict"] == "pass"
    slow = compare(champ, _sample(rng, 400, 180), CFG)
    assert slow["verdict"] == "fail" and "p99 latency" in slow["reason"] and "Mann-Whitney" in slow["reason"]


def test_a_single_outlier_moves_p99_but_not_the_rank_test():
    rng = np.random.default_rng(1)
    champ = _sample(rng, 200, 100, sd_ms=5)
    chal = _sample(rng, 200, 100, sd_ms=5)
    chal.latencies_ms[:3] = [900.0, 950.0, 990.0]  # p99 jumps far past +50 ms: a noisy window, not a slower model
    out = compare(champ, chal, CFG)
    lat = next(c for c in out["checks"] if c["check"] == "p99_latency")
    assert lat["delta_ms"] > 50 and lat["p_value"] > CFG.alpha and out["verdict"] == "pass"


def test_too_few_requests_waits():
    rng = np.random.default_rng(2)
    out = compare(_sample(rng, 400, 100), _sample(rng, 20, 500), CFG)
    assert out["verdict"] == "wait" and "20" in out["reason"]


def test_safety_hits_and_errors():
    rng = np.random.default_rng(3)
    champ = _sample(rng, 300, 100, safety=3)
    unsafe = compare(champ, _sample(rng, 300, 100, safety=60), CFG)
    assert unsafe["verdict"] == "fail" and "safety-hit rate" in unsafe["reason"]
    # +5.3 points but only 4 vs 0 hits in 75 requests: over the bound, not significant at 5 %
    small = compare(_sample(rng, 75, 100), _sample(rng, 75, 100, safety=4), RolloutConfig(min_samples=50))
    assert next(c for c in small["checks"] if c["check"] == "safety_hit_rate")["failed"] is False
    broken = compare(champ, _sample(rng, 300, 100, errors=30), CFG)
    assert broken["verdict"] == "fail" and "error rate 10.0%" in broken["reason"]


def test_request_logs_become_per_version_samples(tmp_path):
    s = make_settings(tmp_path)
    d = s.paths.requests / "dt=2026-11-28"
    d.mkdir(parents=True)
    t = dt.datetime(2026, 11, 28, 10, tzinfo=dt.UTC)
    lines = [{"ts": (t + dt.timedelta(seconds=i)).isoformat(), "version": 1 + i % 2, "status": 200,
              "latency_ms": 100 + i, "safety_input": {"blocked": i == 3}} for i in range(10)]
    lines.append({"ts": t.isoformat(), "version": 2, "status": 503})
    d.joinpath("gateway-1.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{cut mid-wri")
    recs = read_requests(s, t, t + dt.timedelta(seconds=8))
    assert len(recs) == 9  # 8 in the window + the 503 at t; the cut line is skipped
    by = samples(recs, [1, 2])
    assert (by[1].requests, by[2].requests, by[2].errors, by[2].safety_hits) == (4, 5, 1, 1)
    assert by[2].latencies_ms == [101.0, 103.0, 105.0, 107.0]


def test_steps_must_increase():
    with pytest.raises(ValueError):
        RolloutConfig(steps=(50, 25))
