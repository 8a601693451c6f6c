"""`llmops tune-serving`'s choice, grid and report logic, on recorded points (no server).

tests/data/tune_run.json is the tune.json of a real grid run on a 2-core machine: `llmops tune-serving
--own-server --set serve.tune.rounds=2` on the tiny profile's GPT with random weights (bench/serve.py's
model), serve.tune's default grid (19 settings), concurrency 16, 256 requests of 64 tokens per point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tasks.config import ConfigError
from tasks.ops.cli import app
from tasks.procs import free_port
from tasks.serve.tune import (
    TuneError,
    choose,
    compare,
    default_setting,
    grid,
    label,
    model_config_for,
    overrides,
    setting_of,
    write_report,
)
from tests.helpers.project import REPO, make_settings

RUN = json.loads((REPO / "tests" / "data" / "tune_run.json").read_text())


def _p(name: str, tps: float, p99: float, errors: int = 0, error: str | None = None,
       instances: int = 1) -> dict:
    return {"label": name, "tokens_per_s": tps, "req_per_s": tps / 64, "p50_ms": p99 / 2, "p99_ms": p99,
            "requests": 0 if error else 64, "errors": errors, "error": error,
            "setting": {"max_batch_size": 8, "dynamic_batching": True, "max_queue_delay_us": 0,
                        "preferred_batch_sizes": [], "instances": instances}}


def test_the_choice_on_a_recorded_run_is_the_fastest_point_within_the_slo():
    points, slo = RUN["points"], RUN["slo_p99_ms"]
    c = choose(points, slo, RUN["objective"])
    assert c == RUN["choice"]  # the recorded choice is what the function chooses from the recorded points
    chosen = next(p for p in points if p["label"] == c["label"])
    assert c["slo_met"] and chosen["p99_ms"] <= slo
    assert chosen["tokens_per_s"] == \
        max(p["tokens_per_s"] for p in points if p["p99_ms"] <= slo and not p["errors"])


def test_every_slo_on_the_recorded_points_gets_the_fastest_point_within_it():
    # the recorded winner is also the lowest p99; without it (as if it had failed) faster points lie over
    # the lower SLOs: both sets, every SLO from below the lowest p99 to the highest
    winner = RUN["choice"]["label"]
    faster_over = 0
    for points in (RUN["points"], [p for p in RUN["points"] if p["label"] != winner]):
        by = {p["label"]: p for p in points}
        lowest = min(points, key=lambda p: p["p99_ms"])
        for slo in [lowest["p99_ms"] - 1, *sorted({p["p99_ms"] for p in points})]:
            c = choose(points, slo, "tokens_per_s")
            within = [p for p in points if p["p99_ms"] <= slo]
            if not within:  # below every p99: nothing meets it, the lowest p99 is chosen and said so
                assert not c["slo_met"] and c["label"] == lowest["label"] and \
                    "no setting met the SLO" in c["reason"]
                continue
            chosen = by[c["label"]]
            assert c["slo_met"] and chosen["p99_ms"] <= slo
            assert chosen["tokens_per_s"] == max(p["tokens_per_s"] for p in within)
            assert set(c["over_slo"]) == {p["label"] for p in points if p["p99_ms"] > slo}
            faster_over += any(p["tokens_per_s"] > chosen["tokens_per_s"] for p in points
                               if p["p99_ms"] > slo)
    assert faster_over, "the recording should hold SLOs where a faster point is over the SLO"


def test_compare_on_the_recorded_run():
    c = compare(RUN)
    chosen = next(p for p in RUN["points"] if p["label"] == RUN["choice"]["label"])
    default = next(p for p in RUN["points"] if p["default"])
    assert c["default"]["label"] == default["label"] == RUN["default"]
    assert c["throughput_ratio"] == round(chosen["tokens_per_s"] / default["tokens_per_s"], 3)
    assert c["p99_ratio"] == round(chosen["p99_ms"] / default["p99_ms"], 3)
    at = c["at_default_p99"]
    assert at["p99_ms"] <= default["p99_ms"] and at["throughput_ratio"] >= 1.0  # the default itself qualifies
    assert c == RUN["comparison"]


def test_a_faster_point_over_the_slo_is_not_chosen():
    points = [_p("fast-but-slow-p99", 5000, 900), _p("ok", 3000, 450), _p("slower", 2000, 300),
              _p("default", 1000, 200)]
    c = choose(points, 500.0)
    assert (c["slo_met"], c["label"]) == (True, "ok")
    assert c["over_slo"] == ["fast-but-slow-p99"] and set(c["within_slo"]) == {"ok", "slower", "default"}
    assert choose(points, 900.0)["label"] == "fast-but-slow-p99"  # on the SLO line counts as within


def test_ties_go_to_the_lower_p99_then_fewer_instances():
    assert choose([_p("a", 3000, 400), _p("b", 3000, 350)], 500.0)["label"] == "b"
    assert choose([_p("two", 3000, 350, instances=2), _p("one", 3000, 350)], 500.0)["label"] == "one"


def test_no_point_meets_the_slo():
    points = [_p("a", 3000, 900), _p("b", 2000, 700), _p("c", 2500, 700)]
    c = choose(points, 500.0)
    assert (c["slo_met"], c["label"]) == (False, "c")  # the lowest p99, and of those the faster
    assert "p99 <= 500 ms" in c["reason"] and "700" in c["reason"]


def test_failed_points_are_never_chosen():
    points = [_p("errors", 9000, 100, errors=3), _p("unloadable", 0, float("nan"), error="load failed: oom"),
              _p("ok", 1000, 300)]
    c = choose(points, 500.0)
    assert c["label"] == "ok" and set(c["failed"]) == {"errors", "unloadable"}
    with pytest.raises(TuneError, match="none of the 2 settings"):
        choose(points[:2], 500.0)
    with pytest.raises(TuneError, match="objective"):
        choose(points, 500.0, "latency")


def test_requests_per_second_as_the_objective():
    points = [_p("a", 3000, 300), _p("b", 2000, 300)]
    points[1]["req_per_s"] = 100.0  # short answers: more requests, fewer tokens
    assert choose(points, 500.0, "req_per_s")["label"] == "b"
    assert choose(points, 500.0, "tokens_per_s")["label"] == "a"


def test_the_grid_always_holds_the_default_first_and_each_setting_once(tmp_path):
    s = make_settings(tmp_path, "serve.tune.max_batch_size=[4,8]", "serve.tune.max_queue_delay_us=[2000]",
                      "serve.tune.instances=[2]", "serve.tune.preferred_batch_sizes=keep")
    g = grid(s)
    assert g[0] == {**default_setting(s), "default": True} and label(g[0]) == "b8/d2000us/i2/p4,8"
    # keep: b8/d2000/i2 with serve.triton's [4, 8] is the default itself, measured once
    assert [label(x) for x in g] == ["b8/d2000us/i2/p4,8", "b4/d2000us/i2"] and \
        g[1]["preferred_batch_sizes"] == [4]
    # preferred_batch_sizes max: [16], as Triton fills it in
    mx = grid(make_settings(tmp_path, "serve.tune.max_batch_size=[16]",
                            "serve.tune.max_queue_delay_us=[0,500]", "serve.tune.instances=[1]"))
    assert [label(x) for x in mx] == ["b8/d2000us/i2/p4,8", "b16/d0us/i1", "b16/d500us/i1"]
    assert [x["preferred_batch_sizes"] for x in mx] == [[4, 8], [16], [16]]
    off = grid(make_settings(tmp_path, "serve.triton.dynamic_batching=false", "serve.tune.max_batch_size=[8]",
                             "serve.tune.max_queue_delay_us=[0]", "serve.tune.instances=[1]",
                             "serve.tune.preferred_batch_sizes=max"))
    assert [label(x) for x in off] == ["b8/nobatch/i2", "b8/d0us/i1"]


def test_the_overrides_reproduce_the_setting(tmp_path):
    setting = {"max_batch_size": 16, "dynamic_batching": True, "max_queue_delay_us": 500,
               "preferred_batch_sizes": [16], "instances": 1}
    assert default_setting(make_settings(tmp_path, *overrides(setting))) == setting


def test_the_model_config_override_sets_only_the_tuned_parts():
    original = {"name": "chat-gpt", "backend": "python", "max_batch_size": 8, "version_policy": {"all": {}},
                "input": [{"name": "messages"}], "parameters": {"dtype": {"string_value": "float32"}},
                "dynamic_batching": {"preferred_batch_size": [4, 8], "max_queue_delay_microseconds": 2000,
                                     "preserve_ordering": False},
                "instance_group": [{"name": "chat-gpt_0", "kind": "KIND_CPU", "count": 2, "gpus": []}]}
    setting = {"max_batch_size": 16, "dynamic_batching": True, "max_queue_delay_us": 0,
               "preferred_batch_sizes": [16], "instances": 1}
    cfg = model_config_for(original, setting)
    # the original is left as it was
    assert setting_of(cfg) == setting and setting_of(original)["instances"] == 2
    assert cfg["instance_group"] == [{"name": "chat-gpt_0", "kind": "KIND_CPU", "count": 1, "gpus": []}]
    assert cfg["dynamic_batching"]["preserve_ordering"] is False
    assert {k: v for k, v in cfg.items()
            if k not in ("max_batch_size", "dynamic_batching", "instance_group")} == \
        {k: v for k, v in original.items()
         if k not in ("max_batch_size", "dynamic_batching", "instance_group")}
    off = model_config_for(original, {**setting, "dynamic_batching": False, "max_queue_delay_us": None})
    assert "dynamic_batching" not in off and setting_of(off)["dynamic_batching"] is False
    with pytest.raises(TuneError, match="2 instance groups"):
        model_config_for({**original, "instance_group": [{"count": 1}, {"count": 1}]}, setting)


@pytest.mark.parametrize("override, key", [
    ("serve.tune.max_batch_size=[0,8]", "serve.tune.max_batch_size.0"),
    ("serve.tune.max_batch_size=[4,4]", "serve.tune.max_batch_size"),
    ("serve.tune.instances=[]", "serve.tune.instances"),
    ("serve.tune.instances=[100]", "serve.tune.instances.0"),
    ("serve.tune.max_queue_delay_us=[-1]", "serve.tune.max_queue_delay_us.0"),
    ("serve.tune.slo_p99_ms=0", "serve.tune.slo_p99_ms"),
    ("serve.tune.objective=latency", "serve.tune.objective"),
    ("serve.tune.requests=0", "serve.tune"),  # and duration_s 0: no load at all
    ("serve.tune.max_points=4", "max_points=4"),  # 3 x 3 x 2 points
])
def test_bad_grid_values_name_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError) as e:
        make_settings(tmp_path, override)
    assert key in str(e.value), str(e.value)


def test_the_slo_and_load_shape_default_to_the_serving_config(tmp_path):
    from tasks.serve.tune import load_shape, slo_p99_ms

    s = make_settings(tmp_path, "monitor.slo_p99_ms=1500", "serve.gateway.max_inflight=12")
    assert slo_p99_ms(s) == 1500 and load_shape(s)["concurrency"] == 12
    assert load_shape(s)["max_tokens"] == s.serve.gateway.default_max_tokens
    assert slo_p99_ms(make_settings(tmp_path, "serve.tune.slo_p99_ms=300")) == 300


def test_the_report_files_from_a_recorded_run(tmp_path):
    s = make_settings(tmp_path)
    report = {k: v for k, v in RUN.items() if k != "files"}
    out = write_report(s, report, tmp_path / "reports" / "tune" / "recorded")
    d = tmp_path / "reports" / "tune" / "recorded"
    assert (d / "_SUCCESS").is_file() and (d / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((d / "tune.json").read_text())["choice"] == RUN["choice"] == out["choice"]
    pbtxt = (d / "chosen.pbtxt").read_text()
    chosen = RUN["chosen"]
    assert f"max_batch_size: {chosen['max_batch_size']}\n" in pbtxt
    assert f"instance_group [ {{ count: {chosen['instances']} kind: KIND_CPU }} ]" in pbtxt
    assert f"max_queue_delay_microseconds: {chosen['max_queue_delay_us']}" in pbtxt
    # a point that failed to load stays in the report (and the plot's table), never chosen
    failed = {**report, "points": [*report["points"],
                                   {"label": "b64/d0us/i8", "error": "load failed: out of memory",
                                    "errors": 0, "requests": 0, "setting": {}}]}
    out = write_report(s, failed, tmp_path / "reports" / "tune" / "failed")
    assert json.loads(Path(out["files"]["json"]).read_text())["points"][-1]["error"].startswith("load failed")


def test_cli_without_a_server_says_how_to_get_one(tmp_path):
    r = CliRunner().invoke(app, ["tune-serving", "--set", f"paths.root={tmp_path}",
                                 "--set", f"serve.triton.http_port={free_port()}"])
    assert r.exit_code == 1 and "no tritonserver answers" in r.output and "llmops serve" in r.output
    r = CliRunner().invoke(app, ["tune-serving", "--set", f"paths.root={tmp_path}",
                                 "--set", "serve.tune.instances=[0]"])
    assert r.exit_code == 2 and "serve.tune.instances.0" in r.output
    r = CliRunner().invoke(app, ["tune-serving", "--own-server", "--set", f"paths.root={tmp_path}"])
    assert r.exit_code == 1 and "no exported version" in r.output
