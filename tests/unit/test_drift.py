"""Drift features, token KL, an Evidently report on shifted vs unshifted prompts, and the retrain guards."""

from __future__ import annotations

import datetime as dt
import json
import random
from collections import Counter

import pytest

from tasks.config import MonitorConfig, RetrainGuard
from tasks.drift import charset, drift_report, guard, kl_divergence
from tests.conftest import make_settings
from tests.unit.test_serving_parts import _tokenizer

NOW = dt.datetime(2026, 11, 28, 12, tzinfo=dt.UTC)
CFG = MonitorConfig(guard=RetrainGuard(cooldown_hours=24, max_per_week=2, min_new_rows=100))


def test_charset_and_kl():
    assert [charset(t) for t in ("hello", "héllo wörld", "привет", "你好", "12 34", "")] == [
        "ascii", "ascii", "cyrillic", "cjk", "none", "none"]
    same = Counter({1: 10, 2: 10})
    assert kl_divergence(same, same) == pytest.approx(0.0)
    assert kl_divergence(Counter({1: 100}), Counter({2: 100})) > 1.0


def test_guards():
    ok, why = guard({"triggers": []}, NOW, CFG, running_or_queued=0, new_rows=500)
    assert ok and why == "guards passed"
    recent = {"triggers": [(NOW - dt.timedelta(hours=3)).isoformat()]}
    assert guard(recent, NOW, CFG, 0, 500)[0] is False
    assert "cooldown" in guard(recent, NOW, CFG, 0, 500)[1]
    assert "already has 1 run" in guard({"triggers": []}, NOW, CFG, running_or_queued=1, new_rows=500)[1]
    week = {"triggers": [(NOW - dt.timedelta(days=d)).isoformat() for d in (2, 4)]}
    assert "weekly cap" in guard(week, NOW, CFG, 0, 500)[1]
    old = {"triggers": [(NOW - dt.timedelta(days=d)).isoformat() for d in (8, 9)]}
    assert guard(old, NOW, CFG, 0, 500)[0] is True
    assert "only 20 new request rows" in guard({"triggers": []}, NOW, CFG, 0, 20)[1]


def _records(prompts, latency=100.0):
    return [{"status": 200, "prompt": p, "latency_ms": latency} for p in prompts]


def test_evidently_report_sees_shifted_prompts_and_not_the_same_ones(tmp_path):
    s = make_settings(tmp_path, "monitor.min_rows=50")
    tok = _tokenizer()
    rng = random.Random(0)
    words = ["order", "late", "refund", "password", "help", "account", "today", "please"]
    ref = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(400)]
    same = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(300)]
    shifted = [" ".join(["привет", "заказ"] * rng.randint(10, 30)) for _ in range(300)]
    calm = drift_report(s, ref, _records(same), tok, out_dir=tmp_path / "calm")
    assert calm["verdict"] == "ok" and not calm["fire"], calm["reason"]
    hot = drift_report(s, ref, _records(shifted), tok, out_dir=tmp_path / "hot")
    assert hot["fire"] and "Evidently" in hot["reason"] and "token unigram KL" in hot["reason"]
    assert (tmp_path / "hot" / "report.html").stat().st_size > 10_000
    assert json.loads((tmp_path / "hot" / "verdict.json").read_text())["verdict"] == "drift"
    slow = drift_report(s, ref, _records(same, latency=5000.0), tok, out_dir=tmp_path / "slow")
    assert slow["fire"] and "SLO: p99" in slow["reason"]
    few = drift_report(s, ref, _records(same[:10]), tok, out_dir=tmp_path / "few")
    assert few["verdict"] == "insufficient" and not few["fire"]
