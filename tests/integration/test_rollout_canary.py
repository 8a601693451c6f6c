"""Shadow and canary through a real tritonserver and gateway, with real traffic and the real MLflow
registry: a comparable challenger is mirrored (users see only the champion), scored, then promoted
step by step; a deliberately slow one (a rollout drill) is rolled back at the first canary step with
the reason recorded; no request fails during either switch."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import httpx
import pytest

from tasks.data.ingest import ingest
from tasks.data.shard import shard
from tasks.data.snapshot import snapshot
from tasks.data.synth import synth
from tasks.judge.evaluate import evaluate
from tasks.judge.registry import promote, register
from tasks.judge.release import evaluate_and_register
from tasks.loop import rollout
from tasks.loop.traffic import Load
from tasks.procs import free_port
from tasks.serve import triton
from tasks.serve.export import export
from tasks.serve.repository import read_aliases
from tasks.tracking import mlflow_client
from tasks.train.launch import train
from tests.helpers.project import make_settings
from tests.helpers.serving import FAST, start_gateway

pytestmark = [pytest.mark.slow, pytest.mark.services]
CANARY = ["rollout.steps=[50,100]", "rollout.window_s=4", "rollout.min_samples=8",
          "rollout.max_p99_regression_ms=50", "rollout.shadow_percent=100", "rollout.shadow_window_s=4",
          "rollout.shadow_min_pairs=8"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("canary")
    track = f"tracking.uri=sqlite:///{root / 'mlflow.db'}"  # settings, not the environment: tests reset it
    ports = [f"serve.triton.http_port={free_port()}", f"serve.triton.grpc_port={free_port()}",
             f"serve.triton.metrics_port={free_port()}", f"serve.gateway.port={free_port()}"]
    s = make_settings(root, *FAST, *ports, *CANARY, track)
    synth(s, days=1, start="2026-11-01", records=200, faults=False, chatterbot=False)
    ingest("2026-11-01", s)
    snapshot(s)
    shard(s)
    first = train(make_settings(root, *FAST, "train.max_steps=60", track), resume=False)
    evaluate_and_register(s, Path(first["weights"]).parent, int8=False)
    promote(s, 1, reason="test setup", who="test")
    export(s, alias="champion")
    second = train(make_settings(root, *FAST, "train.max_steps=61", track), resume=False)
    weights = Path(second["weights"]).parent
    ev = evaluate(s, weights)
    # registered whatever the gate says: this test is about the canary, and the gate's latency check
    # is at the mercy of a busy CI machine (the gate has its own tests)
    register(s, weights, ev, {"passed": True, "reason": "canary test setup"})
    export(s, alias="challenger")
    tp = triton.start(s, models=("chat-gpt",))
    (s.paths.var_dir / "run").mkdir(parents=True, exist_ok=True)
    proc, base = start_gateway(s, *CANARY)
    yield s, tp, base
    triton.stop_group(proc.pid)
    tp.stop()


def test_canary_promotes_a_comparable_challenger_then_rolls_back_a_slow_one(stack):
    s, tp, base = stack
    assert read_aliases(s.paths.triton_repository, "chat-gpt") == {"champion": 1, "challenger": 2}
    steps = []
    shadow_seen: list[str] = []

    def on_step(step):
        if step["share"] == 0.0:  # the shadow phase just ended: what did users get meanwhile?
            shadow_seen.extend(load.versions)
        steps.append(step)

    with Load(base) as load:
        decision = rollout.canary(s, on_step=on_step)
    assert decision["action"] == "promote", decision
    assert [st["share"] for st in steps] == [0.0, 50.0, 100.0] and \
        all(st["verdict"] == "pass" for st in steps)
    shadow = steps[0]
    assert shadow["phase"] == "shadow" and shadow["pairs"] >= 8 and shadow["replies"]["similarity_mean"] > 0.2
    assert set(shadow_seen) == {"1"}  # during the shadow only the champion answered users
    pairs = rollout.read_requests(s, dt.datetime.fromisoformat(shadow["window"][0]), kind="shadow")
    assert {(p["champion"]["version"], p["challenger"]["version"]) for p in pairs} == {(1, 2)}
    assert Path(shadow["report"]).is_file()
    assert all(st["requests"]["challenger"] >= 8 for st in steps)
    assert load.statuses and set(load.statuses) == {200}, sorted(set(load.statuses))
    client = mlflow_client(s)
    assert str(client.get_model_version_by_alias("chat-gpt", "champion").version) == "2"
    assert read_aliases(s.paths.triton_repository, "chat-gpt") == {"champion": 2, "previous": 1}
    record = json.loads(Path(decision["record"]).read_text())
    assert record["action"] == "promote" and \
        [st["share"] for st in record["evidence"]["steps"]] == [0.0, 50.0, 100.0]
    assert client.get_model_version("chat-gpt", "2").tags["rollout.action"] == "promote"
    assert "challenger" not in client.get_registered_model("chat-gpt").aliases

    # a slow challenger: version 1 again, with a rollout drill adding 40 ms per token
    rollout.drill(s, 1, 40.0)
    client.set_registered_model_alias("chat-gpt", "challenger", "1")
    from tasks.serve.repository import write_aliases

    write_aliases(s.paths.triton_repository, "chat-gpt", {"champion": 2, "challenger": 1})
    steps.clear()
    no_shadow = s.model_copy(update={"rollout": s.rollout.model_copy(update={"shadow_percent": 0.0})})
    with Load(base) as load:
        decision = rollout.canary(no_shadow, on_step=steps.append)
    assert decision["action"] == "rollback", decision
    assert len(steps) == 1 and steps[0]["verdict"] == "fail" and "p99 latency" in decision["reason"]
    assert "Mann-Whitney" in decision["reason"]
    assert set(load.statuses) == {200}, sorted(set(load.statuses))
    assert read_aliases(s.paths.triton_repository, "chat-gpt") == {"champion": 2, "rejected": 1}
    assert str(client.get_model_version_by_alias("chat-gpt", "rejected").version) == "1"
    assert client.get_model_version("chat-gpt", "1").tags["rollout.action"] == "rollback"
    assert json.loads((s.paths.triton_repository / "chat-gpt" / "traffic.json").read_text()) == \
        {"challenger": 0.0}
    # after the roll-back every routed request goes to the champion
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": "chat-gpt", "max_tokens": 4,
                                                       "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.headers["x-model-version"] == "2"
