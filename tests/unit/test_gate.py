from tasks.config import GateRule, load_settings
from tasks.judge.gate import evaluate_gate

RULES = [
    GateRule(metric="perplexity", better="lower", max=100, max_regression=0.10),
    GateRule(metric="rouge_l", better="higher", min=0.1, max_regression=0.05),
    GateRule(metric="toxicity_rate", better="lower", max=0.05),
]
GOOD = {"perplexity": 40.0, "rouge_l": 0.30, "toxicity_rate": 0.0}


def test_passes_on_absolute_bounds_without_champion():
    r = evaluate_gate(GOOD, RULES, None)
    assert r["passed"] and not r["against_champion"]
    assert all(c["reason"] == "within absolute bounds (no champion)" for c in r["checks"][:2])


def test_fails_absolute_bounds_with_reasons():
    r = evaluate_gate({"perplexity": 150.0, "rouge_l": 0.05, "toxicity_rate": 0.2}, RULES, None)
    assert not r["passed"]
    reasons = [c["reason"] for c in r["checks"]]
    assert reasons == ["perplexity=150 above the maximum 100", "rouge_l=0.05 below the minimum 0.1",
                       "toxicity_rate=0.2 above the maximum 0.05"]


def test_regression_vs_champion():
    champion = {"perplexity": 40.0, "rouge_l": 0.30, "toxicity_rate": 0.0}
    ok = evaluate_gate({"perplexity": 43.9, "rouge_l": 0.26, "toxicity_rate": 0.0}, RULES, champion)
    assert ok["passed"] and ok["against_champion"]
    worse = evaluate_gate({"perplexity": 44.5, "rouge_l": 0.24, "toxicity_rate": 0.0}, RULES, champion)
    assert not worse["passed"]
    assert "perplexity=44.5 worse than champion 40 by more than 10%" in worse["reason"]
    assert "rouge_l=0.24 worse than champion 0.3 by more than 0.05" in worse["reason"]


def test_missing_metric_fails():
    r = evaluate_gate({"perplexity": 10.0, "toxicity_rate": 0.0}, RULES, None)
    assert not r["passed"] and r["reason"] == "rouge_l missing from the evaluation"


def test_configured_gate_loads():
    rules = load_settings("tiny").eval.gate
    assert {r.metric for r in rules} >= {"perplexity", "rouge_l", "bleu", "toxicity_rate", "factuality_fuzzy"}
