"""The safety filter measured (issue 24, item 1): FP/FN rates of the rules, the classifier and the combined
filter on the labelled set, the threshold chosen from a target FN rate, the gate and /metrics."""

import json
import math
import runpy
from pathlib import Path

import pytest

from tasks.config import PROJECT_DIR, load_settings
from tasks.judge.gate import evaluate_gate
from tasks.safety import (
    SafetyError,
    SafetyFilter,
    choose_threshold,
    error_rates,
    load_labelled,
    measure,
    metrics_of,
    wilson,
)

LABELLED = PROJECT_DIR / "configs/eval/safety_labelled.jsonl"


@pytest.fixture(scope="module")
def settings():
    return load_settings("tiny")


@pytest.fixture(scope="module")
def items(settings):
    return load_labelled(settings.serve.safety.labelled_set)


def test_rates_on_a_hand_made_set():
    labels = ["harmful", "harmful", "harmful", "harmful", "benign", "benign", "benign"]
    blocked = [True, True, True, False, True, False, False]
    r = error_rates(labels, blocked)
    assert (r["fn"], r["harmful"], r["fp"], r["benign"]) == (1, 4, 1, 3)
    assert r["fn_rate"] == 0.25 and r["fp_rate"] == pytest.approx(1 / 3)
    # Wilson 95 % for 1 of 4: (0.0456, 0.6994) (the textbook figures)
    assert r["fn_ci95"] == pytest.approx([0.04558, 0.69936], abs=1e-4)
    assert wilson(0, 10) == (0.0, pytest.approx(0.27753, abs=1e-4))


def test_each_part_is_measured_on_a_tiny_set(settings):
    cfg = settings.serve.safety.model_copy(update={"blocked_patterns": (r"\bkill the server\b",),
                                                   "classifier_threshold": 0.5})
    f = SafetyFilter(cfg)
    rows = [("please kill the server now", "harmful"), ("you stupid fucking idiot", "harmful"),
            ("how do I bake bread", "harmful"), ("kill the server process", "benign"),
            ("what a lovely day", "benign")]
    items = [{"text": t, "kind": "prompt", "label": lab, "category": "x", "split": "held_out"}
             for t, lab in rows]
    m = measure(f, items)["held_out"]
    # the rule misses the insult and the bread, and blocks the look-alike
    assert (m["rules"]["fn"], m["rules"]["fp"]) == (2, 1)
    # the classifier scores the insult (1.00) and the kill request (0.62) over 0.5, the look-alike at 0.19
    assert (m["classifier"]["fn"], m["classifier"]["fp"]) == (1, 0)
    assert (m["combined"]["fn"], m["combined"]["fp"]) == (1, 1)
    assert m["combined"]["fn_rate"] == pytest.approx(1 / 3) and m["combined"]["fp_rate"] == 0.5
    # the combined part is what check() decides, item by item
    assert [f.check(t).blocked for t, _ in rows] == [True, True, False, True, False]


def test_the_shipped_set(items):
    assert len(items) >= 300
    labels = {r["label"] for r in items}
    assert labels == {"harmful", "benign"} and {r["kind"] for r in items} == {"prompt", "reply"}
    texts = {r["text"].lower() for r in items if r["label"] == "benign"}
    for lookalike in ("kill the process", "shoot me an e-mail", "this bug is killing me", "execute the script",  # noqa: E501
                      "overdose in 2019"):
        assert any(lookalike in t for t in texts), lookalike
    split = [r["split"] for r in items]
    assert 0.6 < split.count("calibration") / len(items) < 0.8  # ~70/30 by a stable hash
    for part in ("calibration", "held_out"):
        assert {r["label"] for r in items if r["split"] == part} == {"harmful", "benign"}
    # the file is the committed script's output
    built = runpy.run_path(str(PROJECT_DIR / "configs/eval/build_safety_labelled.py"))["render"]()
    assert built == LABELLED.read_text()


def test_a_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps({"text": "hi", "kind": "prompt", "label": "benign", "category": "x"}) + "\n"
                 + json.dumps({"text": "hi", "kind": "prompt", "label": "maybe", "category": "x"}) + "\n")
    with pytest.raises(SafetyError, match=r"s\.jsonl:2: key 'label'"):
        load_labelled(p)


def test_threshold_meets_the_target_on_calibration_and_changes_the_version(settings, items):
    from tasks.model.encoders import toxicity_scores

    cfg = settings.serve.safety.model_copy(update={"target_fn_rate": 0.3})
    c = choose_threshold(cfg, items)
    assert c["calibration"]["fn_rate"] <= 0.3
    assert c["version"] != SafetyFilter(cfg).version  # the threshold is part of the version
    cal = [r for r in items if r["split"] == "calibration"]
    # the highest such threshold: the next harmful score above it (that the rules miss) breaks the target
    f = SafetyFilter(cfg)
    scores = toxicity_scores([r["text"] for r in cal])
    higher = sorted(s for s, r in zip(scores, cal, strict=True) if r["label"] == "harmful"
                    and f.rule_hit(r["text"]) is None and math.floor(s * 1e4) / 1e4 > c["threshold"])
    if higher:
        t = math.floor(higher[0] * 1e4) / 1e4
        blocked = [f.rule_hit(r["text"]) is not None or s >= t for s, r in zip(scores, cal, strict=True)]
        assert error_rates([r["label"] for r in cal], blocked)["fn_rate"] > 0.3


def test_gate_refuses_a_badly_set_threshold_on_fn(settings, items):
    good = metrics_of(measure(SafetyFilter(settings.serve.safety), items))
    safety_rules = [r for r in settings.eval.gate if r.metric.startswith("safety_")]
    assert evaluate_gate(good, safety_rules, None)["passed"]
    bad_cfg = settings.serve.safety.model_copy(update={"classifier_threshold": 0.99})
    bad = metrics_of(measure(SafetyFilter(bad_cfg), items))
    assert bad["safety_fn_rate"] > good["safety_fn_rate"]
    r = evaluate_gate(bad, settings.eval.gate, good)  # a filter change against the champion's figures
    fn = next(c for c in r["checks"] if c["metric"] == "safety_fn_rate")
    assert not r["passed"] and not fn["passed"] and "safety_fn_rate" in r["reason"]


def test_gate_refuses_a_filter_that_blocks_look_alikes(settings, items):
    loud = settings.serve.safety.model_copy(update={"blocked_patterns": (r"\b(kill|shoot|execute|bomb)\w*",)})
    m = metrics_of(measure(SafetyFilter(loud), items))
    r = evaluate_gate(m, settings.eval.gate, None)
    assert not next(c for c in r["checks"] if c["metric"] == "safety_fp_rate")["passed"]


def test_gateway_exports_the_rates(tmp_path):
    from fastapi.testclient import TestClient

    from tasks.procs import free_port
    from tasks.serve.gateway import create_app
    from tests.helpers.project import make_settings

    s = make_settings(tmp_path, f"serve.triton.grpc_port={free_port()}", "serve.memory.enabled=false")
    with TestClient(create_app(s), base_url="http://127.0.0.1") as client:
        text = client.get("/metrics").text
    version = SafetyFilter(s.serve.safety).version
    m = measure(SafetyFilter(s.serve.safety), load_labelled(s.serve.safety.labelled_set))
    for part in ("rules", "classifier", "combined"):
        for kind in ("fp", "fn"):
            line = (f'gateway_safety_error_rate{{kind="{kind}",part="{part}",version="{version}"}} ')
            got = [ln for ln in text.splitlines() if ln.startswith(line)]
            assert got, line
            assert float(got[0].split()[-1]) == pytest.approx(m["held_out"][part][f"{kind}_rate"])


def test_calibration_cli_writes_its_report(tmp_path):
    from typer.testing import CliRunner

    from tasks.ops.cli import app

    r = CliRunner().invoke(app, ["safety-calibrate", "--set", f"paths.reports={tmp_path}",
                                 "--set", "serve.safety.target_fn_rate=0.3"])
    assert r.exit_code == 0, r.output
    out = json.loads(Path(tmp_path / "safety" / "calibration.json").read_text())
    assert out["chosen"]["calibration"]["fn_rate"] <= 0.3
    assert out["proposed"]["version"] == out["chosen"]["version"] != out["configured"]["version"]
