"""The rollout as chat_deploy's sensors drive it: poll() starts a phase, waits while evidence is missing,
judges once it is there, and ends a step that gets no traffic by its deadline as `inconclusive`, never as a
promotion. Against a real MLflow store (the decisions are tags and aliases there) and the gateway's log
format, with the clock given, so a 24-hour deadline takes no time."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest

from tasks.loop.rollout import poll
from tasks.serve.repository import read_aliases, write_aliases
from tasks.tracking import mlflow_client
from tests.helpers.project import make_settings

T0 = dt.datetime(2026, 12, 1, 12, tzinfo=dt.UTC)
STEPS = ["rollout.steps=[50,100]", "rollout.window_s=60", "rollout.shadow_window_s=60",
         "rollout.min_samples=20",
         "rollout.shadow_min_pairs=20", "rollout.deadline_s=3600"]


def _registry(s) -> None:
    """Versions 1 (champion) and 2 (challenger) in MLflow and in the repository's aliases."""
    client = mlflow_client(s)
    client.create_registered_model("chat-gpt")
    for _ in (1, 2):
        client.create_model_version("chat-gpt", source=str(s.paths.root / "weights"))
    client.set_registered_model_alias("chat-gpt", "champion", "1")
    client.set_registered_model_alias("chat-gpt", "challenger", "2")
    write_aliases(s.paths.triton_repository, "chat-gpt", {"champion": 1, "challenger": 2})


def _traffic(s) -> dict:
    return json.loads((s.paths.triton_repository / "chat-gpt" / "traffic.json").read_text())


def _served(s, start: dt.datetime, n: int, versions=(1, 2), ms=100.0, seed=0) -> None:
    """n gateway log lines per version, spread over the 50 s after start."""
    rng = np.random.default_rng(seed)
    d = s.paths.requests / f"dt={start.date().isoformat()}"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "gateway-1.jsonl", "a") as f:
        for i in range(n):
            for v in versions:
                f.write(json.dumps({"ts": (start + dt.timedelta(seconds=1 + 49 * i / n)).isoformat(),
                                    "model": "chat-gpt", "version": v, "status": 200,
                                    "latency_ms": float(rng.normal(ms, 5)), "prompt": "hi",
                                    "response": "hello"}) + "\n")


@pytest.mark.parametrize("keep", [False, True])
def test_a_phase_without_traffic_waits_then_ends_inconclusive_at_its_deadline(tmp_path, keep):
    s = make_settings(tmp_path, *STEPS, f"rollout.on_inconclusive={'keep' if keep else 'unload'}")
    _registry(s)
    assert poll(s, "run-1", "shadow", now=T0) is None  # started: every champion request mirrored
    assert _traffic(s) == {"challenger": 0.0, "shadow": 100.0}
    assert poll(s, "run-1", "shadow", now=T0 + dt.timedelta(seconds=30)) is None  # inside its window
    assert poll(s, "run-1", "shadow", now=T0 + dt.timedelta(seconds=120)) is None  # no pairs: it waits
    out = poll(s, "run-1", "shadow", now=T0 + dt.timedelta(seconds=3601))
    assert out["action"] == "inconclusive" and "no decision by the deadline" in out["reason"]
    assert "0 mirrored pairs so far; 20 needed" in out["reason"]
    assert _traffic(s) == {"challenger": 0.0}  # nobody mirrored or served by the challenger any more
    record = json.loads(open(out["record"]).read())
    assert record["action"] == "inconclusive" and record["steps"][0]["verdict"] == "wait"
    client = mlflow_client(s)
    assert client.get_model_version("chat-gpt", "2").tags["rollout.action"] == "inconclusive"
    if keep:  # rollout.on_inconclusive: keep -- a later chat_deploy run may judge it again
        assert read_aliases(s.paths.triton_repository, "chat-gpt") == {"champion": 1, "challenger": 2}
        assert str(client.get_model_version_by_alias("chat-gpt", "challenger").version) == "2"
    else:
        assert read_aliases(s.paths.triton_repository, "chat-gpt") == {"champion": 1, "inconclusive": 2}
        with pytest.raises(Exception, match="alias"):
            client.get_model_version_by_alias("chat-gpt", "challenger")
    assert str(client.get_model_version_by_alias("chat-gpt", "champion").version) == "1"  # never promoted
    assert not (s.paths.var_dir / "rollout" / "chat-gpt.json").exists()  # the run's state is gone


def test_canary_steps_wait_for_samples_then_promote_and_a_slow_step_rolls_back(tmp_path):
    s = make_settings(tmp_path, *STEPS)
    _registry(s)
    assert poll(s, "run-2", "canary", now=T0) is None
    assert _traffic(s) == {"challenger": 50.0}
    _served(s, T0, 5)  # too few: the step waits past its window, then judges when enough came in
    assert poll(s, "run-2", "canary", now=T0 + dt.timedelta(seconds=61)) is None
    _served(s, T0 + dt.timedelta(seconds=61), 30, seed=1)
    assert poll(s, "run-2", "canary", now=T0 + dt.timedelta(seconds=122)) is None  # passed: next share
    assert _traffic(s) == {"challenger": 100.0}
    # the last step: only challenger requests; the champion's from the earlier step stand in
    t1 = T0 + dt.timedelta(seconds=122)
    _served(s, t1, 30, versions=(2,), seed=2)
    decision = poll(s, "run-2", "canary", now=t1 + dt.timedelta(seconds=61))
    assert decision["action"] == "promote", decision
    assert [st["share"] for st in decision["evidence"]["steps"]] == [50.0, 100.0]
    assert decision["evidence"]["steps"][1]["champion_sample"] == "earlier canary windows"
    assert read_aliases(s.paths.triton_repository, "chat-gpt") == {"champion": 2, "previous": 1}

    # a challenger 300 ms slower per request: the first step with enough samples rolls it back
    client = mlflow_client(s)
    client.create_model_version("chat-gpt", source=str(s.paths.root / "weights"))
    client.set_registered_model_alias("chat-gpt", "challenger", "3")
    write_aliases(s.paths.triton_repository, "chat-gpt", {"champion": 2, "challenger": 3})
    t2 = T0 + dt.timedelta(hours=1)
    assert poll(s, "run-3", "canary", now=t2) is None
    _served(s, t2, 30, versions=(2,), seed=3)
    _served(s, t2, 30, versions=(3,), ms=400.0, seed=4)
    decision = poll(s, "run-3", "canary", now=t2 + dt.timedelta(seconds=61))
    assert decision["action"] == "rollback" and "canary at 50.0%: p99 latency" in decision["reason"], decision
    assert read_aliases(s.paths.triton_repository, "chat-gpt") == {"champion": 2, "rejected": 3}
    assert _traffic(s) == {"challenger": 0.0}
