"""The tier comparison report from two evaluation results shaped like tasks.judge.evaluate.evaluate()'s."""

import json
from pathlib import Path

import pytest

from tasks.judge.tiers import TiersError, tiers_report
from tasks.ops.reports import latest


def _evaluation(run_id, **metrics):
    base = {"val_nll": 4.0, "perplexity": 54.6, "rouge_l": 0.20, "bleu": 3.0, "embedding_similarity": 0.40,
            "toxicity_rate": 0.0, "toxicity_rate_adversarial": 0.0, "factuality_exact": 0.1,
            "factuality_fuzzy": 0.25, "latency_p50_ms_b1": 80.0, "latency_p99_ms_b1": 120.0,
            "tokens_per_s_b1": 200.0, "tokens_per_s_b8": 800.0, "eval_seconds": 9.0}
    return {"run_id": run_id, "weights": "/nonexistent/final", "metrics": base | metrics,
            "gate": {"passed": True, "reason": "all checks passed"},
            "report": f"reports/eval/{run_id}/report.html"}


def test_tiers_side_by_side_with_ratios_cost_and_a_plot(settings):
    evs = {"int4": _evaluation("tiny-abc-int4", perplexity=60.06, rouge_l=0.19, tokens_per_s_b8=1000.0,
                               latency_p99_ms_b1=100.0),
           "fp32": _evaluation("tiny-abc")}
    r = tiers_report(settings, evs, model_bytes={"fp32": 4_000_000, "int4": 1_500_000})
    assert r["tiers"] == ["fp32", "int4"] and r["run"] == "tiny-abc"
    out = settings.paths.reports_dir / "eval" / "tiny-abc-tiers"
    assert json.loads((out / "tiers.json").read_text())["values"] == r["values"]
    v, ratio = r["values"]["int4"], r["ratios"]["int4"]
    assert v["memory_mb"] == 1.5 and ratio["memory_mb"] == pytest.approx(0.375)
    assert ratio["perplexity"] == pytest.approx(1.1) and ratio["tokens_per_s_b8"] == pytest.approx(1.25)
    cost_h = settings.serve.gateway.cost_per_hour_usd
    assert v["cost_per_1m_tokens_usd"] == pytest.approx(cost_h / 3600 / 1000.0 * 1e6)
    assert ratio["cost_per_1m_tokens_usd"] == pytest.approx(0.8)
    assert ratio["toxicity_rate"] is None  # fp32's is 0: no ratio rather than a division by zero
    assert set(r["columns"]) >= {"perplexity", "rouge_l", "embedding_similarity", "toxicity_rate",
                                 "factuality_fuzzy", "tokens_per_s_b1", "tokens_per_s_b8",
                                 "latency_p99_ms_b1", "memory_mb", "cost_per_1m_tokens_usd"}
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "×1.1" in html and "$ per 1M tokens" in html
    assert latest(settings)["Model tiers"] == Path(r["report"])
    assert "Evaluation" not in latest(settings)  # the tiers directory is not an fp32 evaluation


def test_a_tier_without_metrics_is_named(settings):
    with pytest.raises(TiersError, match="'distilled' has no 'metrics'"):
        tiers_report(settings, {"distilled": {"run_id": "x"}})
