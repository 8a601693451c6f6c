"""The canary judge on synthetic samples: thresholds, significance, minimum samples; and log parsing."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest

from tasks.config import RolloutConfig
from tasks.loop.rollout import Sample, compare, read_requests, samples
from tests.helpers.project import make_settings

CFG = RolloutConfig(min_samples=50, max_p99_regression_ms=50, max_safety_regression=0.05, max_error_rate=0.02)


def _sample(rng, n, mean_ms, sd_ms=10.0, safety=0, errors=0) -> Sample:
    return Sample(latencies_ms=list(rng.normal(mean_ms, sd_ms, n - errors)), requests=n, errors=errors,
                  safety_hits=safety)


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
    # p99 jumps far past +50 ms: a noisy window, not a slower model
    chal.latencies_ms[:3] = [900.0, 950.0, 990.0]
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


def test_each_tier_samples_only_its_own_model():
    """The small tier (chat-gpt-small) has version numbers of its own: its lines never count for chat-gpt's
    canary."""
    lines = [{"model": m, "version": v, "status": 200, "latency_ms": 10.0}
             for m, v in (("chat-gpt", 1), ("chat-gpt:2", 2), ("chat-gpt-small", 1),
                          ("chat-gpt-small:challenger", 2))]
    lines.append({"version": 1, "status": 200, "latency_ms": 10.0})  # a line from before the tiers: counted
    main, small, both = (samples(lines, [1, 2], "chat-gpt"), samples(lines, [1, 2], "chat-gpt-small"),
                         samples(lines, [1, 2]))
    assert (main[1].requests, main[2].requests, small[1].requests, small[2].requests) == (2, 1, 2, 1)
    assert (both[1].requests, both[2].requests) == (3, 2)


def test_steps_must_increase():
    with pytest.raises(ValueError):
        RolloutConfig(steps=(50, 25))


# ------------------------------------------------------------------ the shadow report on mirrored pairs

REPLIES = ["Your parcel is on its way and should arrive on Monday.",
           "You can reset your password from the login page.",
           "Our support team is available every day from 9 to 5.",
           "I have cancelled the order; the refund takes 3 days."]
UNRELATED = ["The mitochondria is the powerhouse of the cell.",
             "Volcanic basalt cools into hexagonal columns.",
             "Chess openings reward control of the centre.",
             "Baroque fugues weave several independent voices."]


def _pairs(s, t, n, chal_ms=100.0, chal_replies=REPLIES, chal_status=200, seed=0):
    from tasks.serve.repository import write_aliases

    write_aliases(s.paths.triton_repository, "chat-gpt", {"champion": 1, "challenger": 2})
    rng = np.random.default_rng(seed)
    d = s.paths.requests / "shadow" / f"dt={t.date().isoformat()}"
    d.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        champ = {"version": 1, "status": 200, "latency_ms": float(rng.normal(100, 5)),
                 "completion_tokens": 8 + i % 5, "response": REPLIES[i % 4],
                 "safety_output": {"blocked": False}}
        chal = {"version": 2, "status": chal_status, "latency_ms": float(rng.normal(chal_ms, 5)),
                "completion_tokens": 8 + i % 5, "response": chal_replies[i % 4],
                "safety_output": {"blocked": False}}
        lines.append({"ts": (t + dt.timedelta(seconds=i)).isoformat(), "request_id": f"r{i}", "prompt": "hi",
                      "champion": champ, "challenger": chal})
    (d / "gateway-1.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_shadow_report_passes_a_comparable_challenger_and_writes_its_reports(tmp_path):
    from tasks.loop.rollout import shadow_report

    s = make_settings(tmp_path, "rollout.shadow_min_pairs=30")
    t = dt.datetime(2026, 11, 28, 10, tzinfo=dt.UTC)
    _pairs(s, t, 40)
    out = shadow_report(s, t, t + dt.timedelta(hours=1), out_dir=tmp_path / "shadow")
    assert out["verdict"] == "pass", out["reason"]
    assert out["pairs"] == 40 and out["replies"]["similarity_mean"] > 0.99 and \
        out["replies"]["identical_share"] == 1.0
    assert {c["check"] for c in out["checks"]} == \
        {"p99_latency", "safety_hit_rate", "error_rate", "reply_similarity", "reference_quality"}
    # no snapshot here, so no held-out references: that check is reported, not judged
    ref = next(c for c in out["checks"] if c["check"] == "reference_quality")
    assert ref["pairs"] == 0 and not ref["failed"] and "needed to judge" in ref["note"]
    assert json.loads((tmp_path / "shadow" / "shadow.json").read_text())["verdict"] == "pass"
    html = (tmp_path / "shadow" / "shadow.html").read_text()
    assert "similarity_to_champion" in html and "completion_tokens" in html


def test_shadow_report_fails_unrelated_replies_slow_or_failing_challengers_and_waits_for_pairs(tmp_path):
    from tasks.loop.rollout import shadow_report

    s = make_settings(tmp_path, "rollout.shadow_min_pairs=30", "rollout.min_reply_similarity=0.3")
    t = dt.datetime(2026, 11, 28, 10, tzinfo=dt.UTC)
    end = t + dt.timedelta(hours=1)
    _pairs(s, t, 40, chal_replies=UNRELATED)
    off = shadow_report(s, t, end, out_dir=tmp_path / "a")
    assert off["verdict"] == "fail" and "embedding similarity" in off["reason"], off
    _pairs(s, t, 40, chal_ms=300.0)
    slow = shadow_report(s, t, end, out_dir=tmp_path / "b")
    assert slow["verdict"] == "fail" and "p99 latency" in slow["reason"] and \
        "similarity" not in slow["reason"]
    _pairs(s, t, 40, chal_status=502)
    broken = shadow_report(s, t, end, out_dir=tmp_path / "c")
    assert broken["verdict"] == "fail" and "error rate 100.0%" in broken["reason"]
    _pairs(s, t, 10)
    assert shadow_report(s, t, end, out_dir=tmp_path / "d")["verdict"] == "wait"


def test_the_gateway_mirrors_only_champion_routed_requests_by_the_shadow_share(tmp_path):
    from tasks.loop.rollout import set_traffic
    from tasks.serve.gateway import Router
    from tasks.serve.repository import write_aliases

    s = make_settings(tmp_path)
    write_aliases(s.paths.triton_repository, "chat-gpt", {"champion": 1, "challenger": 2})
    router = Router(s.paths.triton_repository, "chat-gpt")
    router.ready = {1, 2}
    set_traffic(s, 0.0, shadow_percent=30.0)
    routes = [router.route("chat-gpt", f"s{i}") for i in range(2000)]
    assert {r.version for r in routes} == {1}  # users are only ever served by the champion
    mirrored = [router.shadow_of(r, f"s{i}") for i, r in enumerate(routes)]
    share = sum(m is not None for m in mirrored) / len(mirrored)
    assert 0.25 < share < 0.35 and {m.version for m in mirrored if m} == {2}
    assert router.shadow_of(router.route("chat-gpt:1", "x"), "x") is None  # a pinned version is not mirrored
    set_traffic(s, 50.0)  # the canary steps: no shadow share any more
    assert all(router.shadow_of(router.route("chat-gpt", f"s{i}"), f"s{i}") is None for i in range(200))


def test_rollback_and_drill_refuse_what_is_not_there_and_touch_nothing(settings):
    """No challenger: a clear error and the traffic file untouched; a drill of an unserved version: an error,
    and no half version directory for tritonserver to choke on."""
    from tasks.loop import rollout
    from tasks.serve.repository import write_aliases

    repo = settings.paths.triton_repository
    (repo / "chat-gpt" / "1").mkdir(parents=True)
    write_aliases(repo, "chat-gpt", {"champion": 1})
    with pytest.raises(ValueError, match="no challenger to roll back"):
        rollout.rollback(settings, "why not", {})
    with pytest.raises(ValueError, match="version 3 is not in the Triton repository"):
        rollout.drill(settings, 3, 40.0)
    # no traffic.json either
    assert sorted(p.name for p in (repo / "chat-gpt").iterdir()) == ["1", "aliases.json"]
