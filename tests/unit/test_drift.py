"""Drift features, token KL, an Evidently report on shifted vs unshifted prompts, and the retrain guards."""

from __future__ import annotations

import datetime as dt
import json
import random
from collections import Counter

import pytest

from tasks.config import MonitorConfig, RetrainGuard
from tasks.loop.drift import auc_bound, charset, drift_report, guard, kl_divergence
from tests.helpers.project import make_settings
from tests.helpers.serving import small_tokenizer

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
    s = make_settings(tmp_path, "monitor.min_rows=50",
                      "monitor.embedding_model=")  # "": no embedding drift (below)
    tok = small_tokenizer()
    rng = random.Random(0)
    words = ["order", "late", "refund", "password", "help", "account", "today", "please"]
    ref = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(400)]
    same = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(300)]
    shifted = [" ".join(["привет", "заказ"] * rng.randint(10, 30)) for _ in range(300)]
    calm = drift_report(s, ref, _records(same), tok, out_dir=tmp_path / "calm")
    assert calm["verdict"] == "ok" and not calm["fire"], calm["reason"]
    assert calm["embedding_drift"] is None and not (tmp_path / "calm" / "embeddings.html").exists()
    hot = drift_report(s, ref, _records(shifted), tok, out_dir=tmp_path / "hot")
    assert hot["fire"] and "Evidently" in hot["reason"] and "token unigram KL" in hot["reason"]
    assert (tmp_path / "hot" / "report.html").stat().st_size > 10_000
    assert json.loads((tmp_path / "hot" / "verdict.json").read_text())["verdict"] == "drift"
    slow = drift_report(s, ref, _records(same, latency=5000.0), tok, out_dir=tmp_path / "slow")
    assert slow["fire"] and "SLO: p99" in slow["reason"]
    few = drift_report(s, ref, _records(same[:10]), tok, out_dir=tmp_path / "few")
    assert few["verdict"] == "insufficient" and not few["fire"]


CODE = ("How do I {v} a {t} in {lang}?", "Why does my {lang} {t} raise {err} when I {v} it?",
        "What is the fastest way to {v} a {t} in {lang}?",
        "My {lang} code fails to {v} the {t}, any idea why?")
COOK = ("How long should I bake a {dish} at {temp} degrees?", "Can I replace {ing} in a {dish} with {ing2}?",
        "What goes well with a {dish} for {n} guests?",
        "My {dish} came out too dry, should I add more {ing}?")
SLOTS = {"v": ["sort", "parse", "serialize", "reverse", "filter", "merge", "cache"],
         "t": ["list", "dictionary", "JSON file", "string", "dataframe", "linked list", "HTTP response"],
         "lang": ["Python", "Rust", "Java", "Go", "TypeScript", "C++"],
         "err": ["a KeyError", "a null pointer exception", "an index out of range", "a type error"],
         "dish": ["lasagna", "banana bread", "risotto", "apple pie", "chicken curry", "sourdough loaf"],
         "temp": ["160", "180", "200", "220"], "ing": ["butter", "eggs", "flour", "sugar", "cream"],
         "ing2": ["olive oil", "yogurt", "oat milk", "honey"], "n": ["4", "6", "8", "12"]}


def _prompts(rng: random.Random, templates: tuple[str, ...], n: int) -> list[str]:
    return [rng.choice(templates).format(**{k: rng.choice(v) for k, v in SLOTS.items()}) for _ in range(n)]


def test_auc_bound_is_evidentlys_default_for_large_samples_and_higher_for_small_ones():
    assert auc_bound(2000, 2000) == pytest.approx(0.55)
    assert 0.6 < auc_bound(150, 150) < 0.7
    assert auc_bound(50, 50) > auc_bound(150, 150) > auc_bound(500, 500)


def test_embedding_drift_of_prompts_fires_on_a_topic_shift_and_not_on_the_same_topic(tmp_path):
    # programming questions served as trained: no embedding drift; cooking questions: drift. The
    # templates give both topics the same lengths and charset, so only the embeddings can tell them apart.
    s = make_settings(tmp_path, "monitor.min_rows=50", "monitor.embedding_sample_rows=100")
    tok = small_tokenizer()
    rng = random.Random(1)
    ref = _prompts(rng, CODE, 200)
    calm = drift_report(s, ref, _records(_prompts(rng, CODE, 120)), tok, out_dir=tmp_path / "calm")
    emb = calm["embedding_drift"]
    assert emb["method"] == "model" and emb["rows"] == {"reference": 100, "current": 100}
    assert not emb["drifted"] and emb["score"] < emb["threshold"], emb
    assert "embedding drift" not in calm["reason"]
    hot = drift_report(s, ref, _records(_prompts(rng, COOK, 120)), tok, out_dir=tmp_path / "hot")
    emb = hot["embedding_drift"]
    assert emb["drifted"] and emb["score"] > 0.9, emb
    assert hot["fire"] and \
        f"embedding drift of prompts: model score {emb['score']:.3f} > threshold" in hot["reason"]
    assert (tmp_path / "hot" / "embeddings.html").stat().st_size > 10_000
    assert json.loads((tmp_path / "hot" / "verdict.json").read_text())["embedding_drift"]["drifted"] is True
