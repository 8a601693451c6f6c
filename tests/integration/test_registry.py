"""evaluate -> gate -> register against a real MLflow store; promote; load by alias; a worse model is
refused."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tasks.data.ingest import ingest
from tasks.data.shard import shard
from tasks.data.snapshot import snapshot
from tasks.data.synth import synth
from tasks.judge.registry import GateFailed, load_by_alias, promote
from tasks.judge.release import evaluate_and_register
from tasks.tracking import mlflow_client
from tasks.train.launch import train
from tests.helpers.project import make_settings

pytestmark = pytest.mark.slow
FAST = ["model.block_size=64", "train.micro_batch=8", "train.world_size=1", "train.zero_stage=0",
        "train.warmup_steps=5", "train.eval_every=10", "eval.reply_samples=12", "eval.max_new_tokens=16",
        "eval.perplexity_windows=16"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    s = make_settings(root)
    synth(s, days=1, start="2026-11-01", records=200, faults=False, chatterbot=False)
    ingest("2026-11-01", s)
    snapshot(s)
    shard(s)
    return root


def test_register_promote_load_and_refuse_a_worse_model(root):
    s = make_settings(root, *FAST, "train.max_steps=60")
    good = train(s, resume=False)
    out = evaluate_and_register(s, Path(good["weights"]).parent)
    assert out["evaluation"]["gate"]["passed"] and "no champion" in json.dumps(out["evaluation"]["gate"])
    reg = out["registered"]
    assert (reg["version"], reg["alias"]) == (1, "challenger")
    # what chat_train's check_inputs asks before training: is this run's identity registered already?
    from tasks.data.shard import latest_manifest
    from tasks.judge.registry import registered_run
    from tasks.train.launch import run_identity

    assert good["run_id"] == run_identity(s, latest_manifest(s))
    assert registered_run(s, good["run_id"]) == 1
    assert registered_run(make_settings(root, *FAST, "train.max_steps=61"), run_identity(
        make_settings(root, *FAST, "train.max_steps=61"), latest_manifest(s))) is None

    client = mlflow_client(s)
    v = client.get_model_version("chat-gpt", "1")
    for tag in ("seed", "snapshot_hash", "tokenizer.version", "tokenizer.sha256", "config_hash",
                "code_version", "parent", "mlflow_run_id", "eval_report", "eval.perplexity"):
        assert v.tags.get(tag), tag
    run = client.get_run(good["mlflow_run_id"])
    assert "eval.fp32.rouge_l" in run.data.metrics
    assert {a.path for a in client.list_artifacts(good["mlflow_run_id"], "eval/fp32")} >= \
        {"eval/fp32/report.html"}
    html = Path(out["evaluation"]["report"]).read_text()
    assert "Loss curve" in html and "data:image/png;base64," in html and "Per slice" in html

    # the int8 variant: evaluated by the same suite, gated against its parent, registered as a variant
    q = out["int8"]
    assert q["int8"]["int8_bytes"] < 0.6 * q["int8"]["fp32_bytes"]
    assert q["int8"]["speedup_b1"] > 0 and q["int8"]["speedup_b8"] > 0  # measured in this run
    assert "rouge_l" in q["int8"]["deltas"]
    assert "int8 vs fp32" in Path(q["report"]).read_text()
    if q["gate"]["passed"]:
        assert (q["registered"]["version"], q["registered"]["alias"]) == (2, "challenger-int8")
        v2 = client.get_model_version("chat-gpt", "2")
        assert v2.tags["variant"] == "int8" and v2.tags["parent_version"] == "1"
        assert v2.tags["snapshot_hash"] == v.tags["snapshot_hash"]  # its parent's lineage
        qmodel, _, _ = load_by_alias(s, "challenger-int8")
        assert "quantized" in type(qmodel.blocks[0].attn.qkv).__module__
    else:
        assert q["registered"] is None and "worse than champion" in q["gate"]["reason"]

    # the int4 variant: the same suite, its own gate against the same parent, a recipe with its group size
    q4 = q["int4"]
    assert math.isfinite(q4["metrics"]["perplexity"]) and q4["metrics"]["tokens_per_s_b1"] > 0
    assert q4["metrics"]["tokens_per_s_b8"] > 0 and q4["int4_bytes"] < 0.6 * q4["fp32_bytes"]
    assert q4["recipe"] == {"variant": "int4", "group_size": s.eval.int4_group_size}
    assert "int4 vs fp32" in Path(q4["report"]).read_text()
    if q4["gate"]["passed"]:
        assert q4["registered"]["alias"] == "challenger-int4"
        v4 = client.get_model_version("chat-gpt", str(q4["registered"]["version"]))
        assert v4.tags["variant"] == "int4" and v4.tags["variant.group_size"] == str(s.eval.int4_group_size)
        from tasks.judge.quantize import Int4Linear

        qmodel4, _, _ = load_by_alias(s, "challenger-int4")
        assert {m.group_size for m in qmodel4.modules() if isinstance(m, Int4Linear)} == \
            {s.eval.int4_group_size}
    else:
        assert q4["registered"] is None and "worse than champion" in q4["gate"]["reason"]

    p = promote(s, 1, reason="first model", who="tester")
    assert p["champion"] == 1 and p["previous"] is None
    assert client.get_model_version("chat-gpt", "1").tags["promoted_by"] == "tester"

    # round trip: the champion, loaded from MLflow's artifacts, generates what the trained weights do
    from tasks.judge.evaluate import load_chat_model

    model, tok, version = load_by_alias(s, "champion")
    ref_model, _, _ = load_chat_model(Path(good["weights"]).parent)
    prompt = tok.encode("<|im_start|>user\nHi, I need help with my invoice.<|im_end|>\n"
                        "<|im_start|>assistant\n").ids
    assert str(version.version) == "1"
    assert model.generate(prompt, 20, temperature=0.0) == ref_model.generate(prompt, 20, temperature=0.0)

    # a far shorter training fails the gate against the champion and is not registered
    before = len(client.search_model_versions("name='chat-gpt'"))
    worse = train(make_settings(root, *FAST, "train.max_steps=3"), resume=False)
    with pytest.raises(GateFailed) as e:
        evaluate_and_register(make_settings(root, *FAST, "train.max_steps=3"), Path(worse["weights"]).parent)
    assert "worse than champion" in str(e.value) and "perplexity" in str(e.value)
    assert len(client.search_model_versions("name='chat-gpt'")) == before
    # its latency was judged against the champion's timed in the same run, interleaved, not the stored figure
    report = Path(str(e.value).rsplit("(report ", 1)[1].rstrip(")"))
    judged = json.loads(report.with_name("metrics.json").read_text())
    stored = float(client.get_model_version("chat-gpt", "1").tags["eval.latency_p99_ms_b1"])
    assert judged["champion"]["latency_p99_ms_b1"] != stored and judged["champion"]["latency_p99_ms_b1"] > 0
    assert judged["champion"]["perplexity"] == pytest.approx(float(
        client.get_model_version("chat-gpt", "1").tags["eval.perplexity"]), rel=1e-5)

    # what chat_train's check_inputs now says about that short run: trained and refused, so a second asset
    # event for the same shards skips it instead of training it again; and the snapshot adds nothing to the
    # champion's
    from tasks.judge.registry import RegistrationRefused
    from tasks.judge.release import check_inputs, identical_weights, register_evaluated

    again = check_inputs(make_settings(root, *FAST, "train.max_steps=3"))
    assert again["registered"] is None and "worse than champion" in again["refused"], again
    assert again["data"]["has_new"] is False and again["data"]["summary"].startswith("nothing new"), \
        again["data"]
    # the champion's own weights offered again (a retrain of unchanged inputs makes the same bytes): no new
    # version, and the reason names the version it equals
    same = identical_weights(s, Path(good["weights"]).parent)
    assert same["version"] == 1 and "champion" in same["aliases"] and "byte for byte" in same["reason"]
    assert identical_weights(s, Path(worse["weights"]).parent) is None
    before = len(client.search_model_versions("name='chat-gpt'"))
    # the same run registered again (an Airflow retry of `register`): its own version back, no second one
    retried = register_evaluated(s, {"weights_dir": str(Path(good["weights"]).parent),
                                     "metrics_path": "unused"})
    assert retried["version"] == 1 and retried["already_registered"] is True
    # the same bytes from another run (a retrain of unchanged inputs): refused, naming the version
    other = root / "other-run"
    shutil.copytree(Path(good["weights"]).parent, other)
    result = json.loads((other / "result.json").read_text())
    (other / "result.json").write_text(json.dumps({**result, "mlflow_run_id": "another-run"}))
    with pytest.raises(RegistrationRefused, match="byte for byte"):
        register_evaluated(s, {"weights_dir": str(other), "metrics_path": "unused"})
    assert len(client.search_model_versions("name='chat-gpt'")) == before


def test_the_monitor_alerts_without_new_data_and_ingests_served_days_first(root):
    """chat_monitor's decide on a firing verdict, against the champion the test above promoted: nothing new
    to learn from -> an alert (no training); drifted traffic served today -> ingest that day first; once
    ingested and snapshotted, the snapshot's new day -> train, and the data it adds is named by source."""
    import datetime as dt

    from tasks.data.snapshot import load_snapshot, new_data
    from tasks.loop.drift import plan_retrain
    from tasks.loop.traffic import traffic

    guards = ["monitor.guard.min_new_rows=0", "monitor.guard.cooldown_hours=0",
              "monitor.guard.max_per_week=50"]
    s = make_settings(root, *guards)
    assert str(mlflow_client(s).get_model_version_by_alias("chat-gpt", "champion").version) == "1", \
        "needs the champion the test above promotes"
    fired = {"fire": True, "verdict": "drift", "reason": "token unigram KL 2.100 > 0.5", "report": "r.html"}
    assert plan_retrain(s, {**fired, "fire": False, "reason": "no drift"}, 0, "tiny")["action"] == "none"
    assert plan_retrain(s, fired, 1, "tiny") == {
        "action": "none", "reason": "chat_train already has 1 run(s) running or queued"}

    plan = plan_retrain(s, fired, 0, "tiny")
    assert plan["action"] == "alert" and "no new data to learn from" in plan["reason"], plan
    record = json.loads(Path(plan["record"]).read_text())
    assert record["kind"] == "drift-no-new-data" and record["drift_report"] == "r.html"

    traffic(s, 120, drifted=True, hours=0.2)  # what users asked today, in the gateway's log format
    off = make_settings(root, *guards, "ingest.sources.requests.enabled=false")
    plan = plan_retrain(off, fired, 0, "tiny")
    assert plan["action"] == "alert" and "ingest.sources.requests.enabled is off" in plan["reason"]

    today = dt.datetime.now(dt.UTC).date().isoformat()
    plan = plan_retrain(s, fired, 0, "tiny")
    assert plan["action"] == "ingest" and plan["days"] == [today], plan
    assert plan["conf"] == {"day": today, "profile": "tiny", "reason": "chat_monitor: " + fired["reason"],
                            "drift_report": "r.html"}

    # what chat_ingest does with that conf; then the snapshot holds the served day and training follows
    assert ingest(today, s)["served"]["kept"] == 120
    snapshot(s)
    data = new_data(s, load_snapshot(s)["snapshot_hash"],
                    mlflow_client(s).get_model_version("chat-gpt", "1").tags["snapshot_hash"])
    assert data["added_days"] == [today] and set(data["rows_by_source"]) == {"requests"}, data
    plan = plan_retrain(s, fired, 0, "tiny")
    assert plan["action"] == "train" and plan["data"]["added_days"] == [today], plan
    assert plan["conf"]["reason"].startswith("chat_monitor: ") and "force" not in plan["conf"]
