"""`llmops tune-serving`'s choice, grid and report logic, on recorded points (no server).

tests/data/tune_run.json is the tune.json of a real grid run on a 2-core machine: `llmops tune-serving
--own-server --set serve.tune.rounds=2` on the tiny profile's GPT with random weights (bench/serve.py's
model), serve.tune's default grid of the engine's knobs (16 settings), concurrency 16, 256 requests of
64 tokens per point; another test run shared the machine (the default drifted +53 %)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tasks.config import ConfigError
from tasks.ops.cli import app
from tasks.procs import free_port
from tasks.serve.export import config_pbtxt
from tasks.serve.tune import (
    TuneError,
    choose,
    compare,
    default_setting,
    engine_counters,
    engine_delta,
    engine_of,
    grid,
    label,
    model_config_for,
    overrides,
    setting_of,
    skipped,
    with_setting,
    write_report,
)
from tests.helpers.project import REPO, make_settings

RUN = json.loads((REPO / "tests" / "data" / "tune_run.json").read_text())


def _p(name: str, tps: float, p99: float, errors: int = 0, error: str | None = None,
       instances: int = 1) -> dict:
    return {"label": name, "tokens_per_s": tps, "req_per_s": tps / 64, "p50_ms": p99 / 2, "p99_ms": p99,
            "requests": 0 if error else 64, "errors": errors, "error": error,
            "setting": {"max_seqs": 8, "max_batch_tokens": 256, "instances": instances}}


def test_the_choice_on_a_recorded_run_is_the_fastest_point_within_the_slo():
    points, slo = RUN["points"], RUN["slo_p99_ms"]
    c = choose(points, slo, RUN["objective"])
    assert c == RUN["choice"]  # the recorded choice is what the function chooses from the recorded points
    chosen = next(p for p in points if p["label"] == c["label"])
    assert c["slo_met"] and chosen["p99_ms"] <= slo
    assert chosen["tokens_per_s"] == \
        max(p["tokens_per_s"] for p in points if p["p99_ms"] <= slo and not p["errors"])


def test_every_slo_on_the_recorded_points_gets_the_fastest_point_within_it():
    # the recorded winner is also the lowest p99, and so is the next fastest of the rest; without the
    # two (as if they had failed) faster points lie over the lower SLOs: each set, every SLO from below
    # the lowest p99 to the highest
    fastest = sorted(RUN["points"], key=lambda p: -p["tokens_per_s"])
    faster_over = 0
    for points in (fastest, fastest[1:], fastest[2:]):
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
    s = make_settings(tmp_path, "serve.tune.max_seqs=[8,16,32]", "serve.tune.max_batch_tokens=[16,256]",
                      "serve.tune.instances=[2]")
    g = grid(s)
    # serve.engine's max_seqs 16 and max_batch_tokens 256, serve.triton's 2 instances
    assert g[0] == {**default_setting(s), "default": True} and label(g[0]) == "s16/t256/i2"
    # s16/t256/i2 is the default itself, measured once; s32/t16 is skipped: the engine refuses a step
    # budget below its sequences (every decoding sequence takes one token of a step)
    assert [label(x) for x in g] == ["s16/t256/i2", "s8/t16/i2", "s8/t256/i2", "s16/t16/i2", "s32/t256/i2"]
    assert skipped(s) == ["s32/t16/i2"]
    assert [x["default"] for x in g] == [True, False, False, False, False]
    for x in g:  # every point is one the engine (and serve.engine's validation) accepts
        make_settings(tmp_path, *overrides(x))
    # a default outside the lists is measured too, first
    other = grid(make_settings(tmp_path, "serve.engine.max_seqs=4", "serve.engine.max_batch_tokens=64",
                               "serve.triton.instances=1", "serve.tune.max_seqs=[8]",
                               "serve.tune.max_batch_tokens=[128]", "serve.tune.instances=[1,2]"))
    assert [label(x) for x in other] == ["s4/t64/i1", "s8/t128/i1", "s8/t128/i2"]


def test_the_overrides_reproduce_the_setting(tmp_path):
    setting = {"max_seqs": 32, "max_batch_tokens": 64, "instances": 1}
    s = make_settings(tmp_path, *overrides(setting))
    assert default_setting(s) == setting
    assert overrides(setting) == ["serve.engine.max_seqs=32", "serve.engine.max_batch_tokens=64",
                                  "serve.triton.instances=1"]
    base = make_settings(tmp_path)
    w = with_setting(base, setting)
    assert default_setting(w) == setting and default_setting(base) != setting  # base left as it was
    # the rest of serve.engine and serve.triton stays
    assert w.serve.engine.scheduler == base.serve.engine.scheduler
    assert w.serve.triton.max_batch_size == base.serve.triton.max_batch_size
    assert config_pbtxt(w, "chat-gpt") == config_pbtxt(s, "chat-gpt")


def _triton_json() -> dict:
    """A model configuration as Triton's /v2/models/<m>/config returns it for what `llmops export` writes
    (abridged)."""
    return {"name": "chat-gpt", "backend": "python", "max_batch_size": 8, "version_policy": {"all": {}},
            "input": [{"name": "messages"}],
            "parameters": {"dtype": {"string_value": "float32"}, "scheduler": {"string_value": "continuous"},
                           "max_seqs": {"string_value": "16"}, "max_batch_tokens": {"string_value": "256"}},
            "dynamic_batching": {"preferred_batch_size": [], "max_queue_delay_microseconds": 0,
                                 "preserve_ordering": False},
            "instance_group": [{"name": "chat-gpt_0", "kind": "KIND_CPU", "count": 2, "gpus": []}],
            "model_transaction_policy": {"decoupled": True}}


def test_the_model_config_override_sets_only_the_tuned_parts():
    original = _triton_json()
    setting = {"max_seqs": 4, "max_batch_tokens": 64, "instances": 1}
    cfg = model_config_for(original, setting)
    # the original is left as it was
    assert setting_of(cfg) == setting
    assert setting_of(original) == {"max_seqs": 16, "max_batch_tokens": 256, "instances": 2}
    assert cfg["instance_group"] == [{"name": "chat-gpt_0", "kind": "KIND_CPU", "count": 1, "gpus": []}]
    # Triton's JSON form of a parameter: a string value, the other parameters as they were
    assert cfg["parameters"] == {**original["parameters"], "max_seqs": {"string_value": "4"},
                                 "max_batch_tokens": {"string_value": "64"}}
    assert {k: v for k, v in cfg.items() if k not in ("parameters", "instance_group")} == \
        {k: v for k, v in original.items() if k not in ("parameters", "instance_group")}
    # a configuration without the parameters gets them; read back, absent ones are serve.engine's defaults
    bare = {k: v for k, v in original.items() if k != "parameters"}
    assert setting_of(bare) == {"max_seqs": 16, "max_batch_tokens": 256, "instances": 2}
    assert setting_of(model_config_for(bare, setting)) == setting
    with pytest.raises(TuneError, match="2 instance groups"):
        model_config_for({**original, "instance_group": [{"count": 1}, {"count": 1}]}, setting)


def test_the_override_names_the_parameters_export_writes(tmp_path):
    # the tuner replaces parameters by name: they must be those config.pbtxt holds (and the model reads)
    import re

    setting = {"max_seqs": 8, "max_batch_tokens": 32, "instances": 1}
    pbtxt = config_pbtxt(with_setting(make_settings(tmp_path), setting), "chat-gpt")
    written = dict(re.findall(r'parameters \{ key: "(\w+)" value: \{ string_value: "([^"]*)" \} \}', pbtxt))
    cfg = model_config_for(_triton_json(), setting)
    assert {k: v["string_value"] for k, v in cfg["parameters"].items()} == \
        {k: written[k] for k in cfg["parameters"]}
    assert f"count: {setting['instances']} kind: KIND_CPU" in pbtxt


def test_only_a_model_batching_in_the_engine_is_tuned():
    assert engine_of(_triton_json()) is None
    execute = _triton_json()
    execute["parameters"]["scheduler"] = {"string_value": "execute"}
    assert "'execute' scheduler" in engine_of(execute)
    assert "not decoupled" in engine_of({**_triton_json(), "model_transaction_policy": {}})


METRICS = """\
# HELP nv_inference_count Number of inferences performed
# TYPE nv_inference_count counter
nv_inference_count{model="chat-gpt",version="1"} 40
# HELP llmops_engine_steps Engine steps (one decode step of the running batch each)
# TYPE llmops_engine_steps counter
llmops_engine_steps{model="chat-gpt",version="1"} 100
llmops_engine_steps{model="chat-gpt",version="2"} 10
llmops_engine_steps{model="chat-gpt-small",version="1"} 999
# TYPE llmops_engine_decode_tokens counter
llmops_engine_decode_tokens{model="chat-gpt",version="1"} 640
llmops_engine_decode_tokens{model="chat-gpt",version="2"} 20
# TYPE llmops_engine_joined_mid_decode counter
llmops_engine_joined_mid_decode{model="chat-gpt",version="1"} 30
# TYPE llmops_engine_finished counter
llmops_engine_finished{model="chat-gpt",version="1"} 40
# TYPE llmops_engine_running gauge
llmops_engine_running{model="chat-gpt",version="1"} 0
"""


def test_the_engine_counters_from_tritons_metrics():
    one = engine_counters(METRICS, "chat-gpt", "1")
    assert one == {"steps": 100, "decode_tokens": 640, "joined_mid_decode": 30, "finished": 40}
    # all versions of the model (the load went to Triton's choice), never another model's
    assert engine_counters(METRICS, "chat-gpt") == {"steps": 110, "decode_tokens": 660,
                                                    "joined_mid_decode": 30, "finished": 40}
    assert engine_counters(METRICS, "chat-gpt", "3") is None
    assert engine_counters("nv_inference_count 1\n", "chat-gpt") is None  # no engine: nothing to read
    after = {"steps": 150, "decode_tokens": 1040, "joined_mid_decode": 42, "finished": 56}
    # 400 tokens in 50 steps: 8 sequences decoding together on average, all of max_seqs 8 busy;
    # 12 of the 16 sequences admitted while others decoded
    assert engine_delta(one, after, 8) == {"engine_steps": 50, "engine_tokens_per_step": 8.0,
                                          "engine_occupancy": 1.0, "engine_joined_mid_decode": 0.75}
    assert engine_delta(one, after, 16)["engine_occupancy"] == 0.5
    nothing = {"engine_steps": None, "engine_tokens_per_step": None, "engine_occupancy": None,
               "engine_joined_mid_decode": None}
    assert engine_delta(None, after, 8) == nothing  # the metrics could not be read
    assert engine_delta(after, one, 8) == nothing  # counters reset (the model reloaded) in between
    assert engine_delta(one, one, 8) == nothing  # nothing ran


@pytest.mark.parametrize("override, key", [
    ("serve.tune.max_seqs=[0,8]", "serve.tune.max_seqs.0"),
    ("serve.tune.max_seqs=[4,4]", "serve.tune.max_seqs"),
    ("serve.tune.max_batch_tokens=[0]", "serve.tune.max_batch_tokens.0"),
    ("serve.tune.max_batch_tokens=[2,3]", "max_batch_tokens >= max_seqs"),  # every point refused
    ("serve.tune.instances=[]", "serve.tune.instances"),
    ("serve.tune.instances=[100]", "serve.tune.instances.0"),
    ("serve.tune.slo_p99_ms=0", "serve.tune.slo_p99_ms"),
    ("serve.tune.objective=latency", "serve.tune.objective"),
    ("serve.tune.requests=0", "serve.tune"),  # and duration_s 0: no load at all
    ("serve.tune.max_points=4", "max_points=4"),  # 4 x 2 x 2 points
])
def test_bad_grid_values_name_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError) as e:
        make_settings(tmp_path, override)
    assert key in str(e.value), str(e.value)


def test_the_grid_size_counts_only_the_points_the_engine_takes(tmp_path):
    # 3 x 2 x 1 combinations, 2 of them below max_seqs: 4 points fit max_points 4
    s = make_settings(tmp_path, "serve.tune.max_seqs=[4,8,16]", "serve.tune.max_batch_tokens=[4,256]",
                      "serve.tune.instances=[1]", "serve.tune.max_points=4")
    assert skipped(s) == ["s8/t4/i1", "s16/t4/i1"] and len(grid(s)) == 5  # the default beside them


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
    # what `llmops export` writes with the chosen values: the engine batches, Triton hands over at once
    assert pbtxt == config_pbtxt(make_settings(tmp_path, *RUN["overrides"]), RUN["model"])
    assert f'parameters {{ key: "max_seqs" value: {{ string_value: "{chosen["max_seqs"]}" }} }}' in pbtxt
    assert (f'parameters {{ key: "max_batch_tokens" value: {{ string_value: "{chosen["max_batch_tokens"]}" '
            '} }') in pbtxt
    assert f"instance_group [ {{ count: {chosen['instances']} kind: KIND_CPU }} ]" in pbtxt
    assert "dynamic_batching { max_queue_delay_microseconds: 0 }" in pbtxt and "decoupled: true" in pbtxt
    # a point that failed to load stays in the report (and the plot's table), never chosen
    failed = {**report, "points": [*report["points"],
                                   {"label": "s64/t64/i8", "error": "load failed: out of memory",
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
