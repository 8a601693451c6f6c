"""The embedded stack for real, through Airflow's scheduler and REST API: chat_ingest triggered and
backfilled; chat_train with DeepSpeed ranks; chat_deploy on the chat_challenger Asset against a
running tritonserver and gateway; and the closed loop: drifted traffic -> chat_monitor fires ->
chat_train -> chat_deploy (shadow, canary) -> promoted, then a drilled slow challenger rolled back,
with live gateway traffic that never sees a failed request."""

import datetime as dt
import json
import os
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tasks.loop.traffic import Load, traffic
from tasks.ops import stack
from tasks.ops.airflow_client import AirflowClient
from tasks.procs import alive
from tests.helpers.project import REPO

pytestmark = [pytest.mark.slow, pytest.mark.services]


def _listening(settings) -> set[tuple[str, int]]:
    pids = set()
    for name in ("airflow-api-server", "airflow-scheduler", "airflow-dag-processor",
                 "airflow-triggerer", "mlflow"):
        pgid = alive(settings, name)
        assert pgid, f"{name} is not running"
        pids |= {p.pid for p in psutil.process_iter() if _pgid(p.pid) == pgid}
    return {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids}


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_every_server_binds_loopback_only(running):
    s, info = running
    addrs = _listening(s)
    assert ("127.0.0.1", 18080) in addrs and ("127.0.0.1", 15000) in addrs
    assert all(ip == "127.0.0.1" for ip, _ in addrs), addrs  # no 0.0.0.0 / [::] log servers
    # the generated Airflow admin password and the JWT secret are the owner's alone
    home = stack.airflow_home(s)
    for f in (home / "simple_auth_manager_passwords.json.generated", home / "jwt_secret"):
        assert f.stat().st_mode & 0o777 == 0o600, (f, oct(f.stat().st_mode))


def test_trigger_and_backfill_through_scheduler(running):
    s, _ = running
    client = AirflowClient(s)
    client.wait_for_dag("chat_ingest", timeout=180)
    client.unpause("chat_ingest")
    # the UI's Trigger form: a manual run with the `day` param
    run_id = client.trigger("chat_ingest", {"day": "2026-11-01"})
    assert client.wait_run("chat_ingest", run_id, timeout=600) == "success", \
        client.task_states("chat_ingest", run_id)
    assert client.task_states("chat_ingest", run_id) == \
        dict.fromkeys(("ingest", "validate", "snapshot", "shard"), "success")

    # chat_train through the scheduler: DeepSpeed ranks under the Airflow worker, the run in MLflow's server;
    # its registration (the chat_challenger Asset) starts chat_deploy, which makes it the first champion
    client.wait_for_dag("chat_train", timeout=120)
    client.wait_for_dag("chat_deploy", timeout=120)
    client.unpause("chat_deploy")
    # unpaused, the weekly schedule runs the latest missed Monday at once (catchup off): that is the training
    client.unpause("chat_train")
    train_run = _wait_for_run(client, "chat_train", set(), timeout=60)
    assert client.wait_run("chat_train", train_run, timeout=600) == "success", \
        client.task_states("chat_train", train_run)
    assert client.task_states("chat_train", train_run) == {
        **dict.fromkeys(("check_inputs", "train", "evaluate", "gate", "register", "quantize"), "success"),
        "distill": "skipped"}
    # ... a run of the schedule, not a manual one: the weekly tick, Monday 03:00 UTC
    run = next(r for r in client.runs("chat_train") if r["dag_run_id"] == train_run)
    tick = dt.datetime.fromisoformat(run["logical_date"])
    assert run["run_type"] == "scheduled" and (tick.weekday(), tick.hour, tick.minute) == (0, 3, 0), run
    # the Trigger button again, nothing changed: check_inputs finds the run registered and skips the rest
    again = client.trigger("chat_train", {"profile": "tiny"})
    assert client.wait_run("chat_train", again, timeout=300) == "success"
    assert client.task_states("chat_train", again) == dict.fromkeys(
        ("check_inputs", "train", "evaluate", "gate", "register", "quantize", "distill"), "skipped")
    client.pause("chat_train")  # no asset-triggered trainings during the backfill below
    import mlflow

    mlc = mlflow.MlflowClient(tracking_uri=f"http://127.0.0.1:{s.stack.mlflow_port}")
    runs = mlc.search_runs([mlc.get_experiment_by_name("chat-gpt").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", runs
    run = runs[0]
    assert run.data.params["train.max_steps"] == "30" and run.data.params["train.world_size"] == "2"
    assert len(mlc.get_metric_history(run.info.run_id, "loss")) == 30
    assert "model/model.safetensors" in {a.path for a in mlc.list_artifacts(run.info.run_id, "model")}
    assert "eval/fp32/report.html" in {a.path for a in mlc.list_artifacts(run.info.run_id, "eval/fp32")}
    v1 = mlc.get_model_version("chat-gpt", "1")
    assert v1.tags["gate"] == "passed" and v1.run_id == run.info.run_id
    assert v1.tags["snapshot_hash"] == run.data.tags["snapshot_hash"]

    # a bad conf is refused by the Param schema, as the form would
    r = client.http.post("/api/v2/dags/chat_ingest/dagRuns",
                         json={"logical_date": None, "conf": {"day": "yesterday"}})
    assert r.status_code == 400, r.text

    # backfill two past days as a user does: `llmops backfill` (a thin wrapper over Airflow's backfill API)
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "tasks", "backfill",
                          "--from", "2026-11-02", "--to", "2026-11-03", "--set", f"paths.root={s.paths.root}",
                          "--set", f"stack.airflow_port={s.stack.airflow_port}",
                          "--set", f"stack.mlflow_port={s.stack.mlflow_port}"],
                         capture_output=True, text=True, timeout=900, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["runs"] == {"2026-11-02": "success", "2026-11-03": "success"}
    assert sorted(p.name for p in s.paths.clean.iterdir() if p.name.startswith("dt=")) == [
        "dt=2026-11-01", "dt=2026-11-02", "dt=2026-11-03"]
    latest = json.loads((s.paths.snapshots / "latest.json").read_text())
    snap = json.loads((s.paths.snapshots / f"{latest['snapshot_hash']}.json").read_text())
    assert sorted(snap["partitions"]) == ["2026-11-01", "2026-11-02", "2026-11-03"]
    assert any(s.paths.shards.glob("*/manifest.json"))


def _wait_for_run(client, dag_id: str, known: set[str], timeout: float = 300.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [r["dag_run_id"] for r in client.runs(dag_id) if r["dag_run_id"] not in known]
        if new:
            return new[0]
        time.sleep(2.0)
    raise AssertionError(f"no new {dag_id} run within {timeout:.0f}s; runs: {client.runs(dag_id)}")


def test_closed_loop_drift_retrains_and_promotes_then_a_slow_challenger_is_rolled_back(running):
    import mlflow

    from tasks.serve import server
    from tasks.serve.repository import read_aliases

    s, _ = running
    client = AirflowClient(s)
    mlc = mlflow.MlflowClient(tracking_uri=f"http://127.0.0.1:{s.stack.mlflow_port}")
    base = server.urls(s)["gateway"].removesuffix("/v1")

    # 1. chat_train's registration started chat_deploy (Asset): version 1 is served as the first champion
    first_deploy = client.runs("chat_deploy")
    assert first_deploy and first_deploy[-1]["run_type"] == "asset_triggered", first_deploy
    first = first_deploy[-1]["dag_run_id"]
    assert client.wait_run("chat_deploy", first, timeout=300) == "success", \
        client.task_states("chat_deploy", first)
    smoke = client.xcom("chat_deploy", first, "smoke")
    assert smoke["version"] == "1" and smoke["usage"]["completion_tokens"] > 0, smoke
    assert client.xcom("chat_deploy", first, "canary")["reason"].startswith("first champion")
    assert read_aliases(s.paths.triton_repository, "chat-gpt") == {"champion": 1}
    assert (s.paths.triton_repository / "chat-gpt" / "1" / "_lineage.json").is_file()
    assert {m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]} >= \
        {"chat-gpt", "chat-gpt:champion"}
    assert httpx.post(f"{base}/v1/chat/completions", json={"model": "chat-gpt", "max_tokens": 4, "messages": [
        {"role": "user", "content": "hi"}]}, timeout=60).headers["x-model-version"] == "1"

    # 2. users start asking other things: drifted traffic in the request logs; the hourly monitor fires
    traffic(s, 400, drifted=True, hours=0.5)
    client.wait_for_dag("chat_monitor", timeout=120)
    train_runs = {r["dag_run_id"] for r in client.runs("chat_train")}
    client.unpause("chat_train")
    client.unpause("chat_monitor")  # the hourly schedule; if its next run is not due yet, the Trigger button
    try:
        monitor_run = _wait_for_run(client, "chat_monitor", set(), timeout=20)
    except AssertionError:
        monitor_run = client.trigger("chat_monitor", {})
    assert client.wait_run("chat_monitor", monitor_run, timeout=600) == "success", \
        client.task_states("chat_monitor", monitor_run)
    assert client.task_states("chat_monitor", monitor_run) == dict.fromkeys(
        ("drift", "decide", "retrain", "autoscale", "cost"), "success")
    # live signals of the running Triton + gateway
    advice = client.xcom("chat_monitor", monitor_run, "autoscale")
    assert advice["action"] in ("scale_out", "scale_in", "hold") and advice["reason"], advice
    assert Path(client.xcom("chat_monitor", monitor_run, "cost")["report"]).is_file()
    verdict = client.xcom("chat_monitor", monitor_run, "drift")
    assert verdict["fire"] and verdict["verdict"] == "drift", verdict
    retrain = _wait_for_run(client, "chat_train", train_runs, timeout=60)
    conf = next(r for r in client.runs("chat_train") if r["dag_run_id"] == retrain)["conf"]
    assert conf["reason"].startswith("chat_monitor: ") and conf["drift_report"], conf

    # 3. the guard: a second fire while that retrain runs (and inside the cooldown) triggers nothing
    again = client.trigger("chat_monitor", {})
    assert client.wait_run("chat_monitor", again, timeout=600) == "success"
    assert client.task_states("chat_monitor", again)["retrain"] == "skipped"
    assert len({r["dag_run_id"] for r in client.runs("chat_train")} - train_runs) == 1

    # 4. the retrain registers a new version -> chat_deploy (Asset): shadow, canary 50 % -> 100 %, promoted
    deploys = {r["dag_run_id"] for r in client.runs("chat_deploy")}
    assert client.wait_run("chat_train", retrain, timeout=900) == "success", \
        client.task_states("chat_train", retrain)
    new = client.xcom("chat_train", retrain, "register")["version"]
    with Load(base) as load:
        deploy = _wait_for_run(client, "chat_deploy", deploys, timeout=120)
        assert client.wait_run("chat_deploy", deploy, timeout=600) == "success", \
            client.task_states("chat_deploy", deploy)
        shadow = client.xcom("chat_deploy", deploy, "shadow")
        decision = client.xcom("chat_deploy", deploy, "canary")
        assert shadow["action"] == "continue" and shadow["verdict"] == "pass", (shadow.get("reason"), shadow)
        assert Path(shadow["report"]).is_file()
        assert decision["action"] == "promote" and \
            (decision["champion"], decision["challenger"]) == (1, new), decision
        assert read_aliases(s.paths.triton_repository, "chat-gpt") == {"champion": new, "previous": 1}
        assert int(mlc.get_model_version_by_alias("chat-gpt", "champion").version) == new
        v2_run = mlc.get_run(mlc.get_model_version("chat-gpt", str(new)).run_id)
        assert v2_run.data.tags["llmops.trigger_reason"].startswith("chat_monitor: "), v2_run.data.tags

        # 5. a deliberately slow challenger (version 1 with a roll-back drill): the shadow rolls it back
        mlc.set_registered_model_alias("chat-gpt", "challenger", "1")
        drill = client.trigger("chat_deploy", {"alias": "challenger", "drill_delay_ms": 60})
        assert client.wait_run("chat_deploy", drill, timeout=600) == "success", \
            client.task_states("chat_deploy", drill)
    shadow = client.xcom("chat_deploy", drill, "shadow")
    assert shadow["action"] == "rollback" and "p99 latency" in shadow["reason"], shadow
    assert client.xcom("chat_deploy", drill, "canary")["action"] == "rollback"
    assert read_aliases(s.paths.triton_repository, "chat-gpt") == {"champion": new, "rejected": 1}
    assert mlc.get_model_version("chat-gpt", "1").tags["rollout.reason"].startswith("shadow: p99 latency")
    record = json.loads(Path(shadow["record"]).read_text())
    assert record["action"] == "rollback" and record["evidence"]["steps"][0]["phase"] == "shadow"
    # live traffic throughout both switches: every request answered, only ever by a champion
    assert load.statuses and set(load.statuses) == {200}, sorted(set(load.statuses))
    assert set(load.versions) <= {"1", str(new)}
    assert httpx.post(f"{base}/v1/chat/completions", json={"model": "chat-gpt", "max_tokens": 4, "messages": [
        {"role": "user", "content": "hi"}]}, timeout=60).headers["x-model-version"] == str(new)


def test_a_chat_shards_event_starts_chat_train_and_status_shows_the_system(running):
    """The Asset trigger: an event on chat_shards (what chat_ingest's shard task emits) starts chat_train
    with the event's manifest; those shards are trained and registered already, so it skips the rest.
    Then `llmops status` sees it all through the same REST API and MLflow."""
    from tasks.ops import status

    s, _ = running
    client = AirflowClient(s)
    manifest = sorted(s.paths.shards.glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)[-1]
    asset = client.http.get("/api/v2/assets", params={"name_pattern": "chat_shards"}).json()["assets"][0]
    client.unpause("chat_train")
    known = {r["dag_run_id"] for r in client.runs("chat_train")}
    r = client.http.post("/api/v2/assets/events",
                         json={"asset_id": asset["id"], "extra": {"manifest": str(manifest)}})
    assert r.status_code == 200, r.text
    run = _wait_for_run(client, "chat_train", known, timeout=120)
    assert next(x for x in client.runs("chat_train") if x["dag_run_id"] == run)["run_type"] == \
        "asset_triggered"
    assert client.wait_run("chat_train", run, timeout=300) == "success"
    assert client.task_states("chat_train", run)["check_inputs"] == "skipped"  # those shards are registered
    # the run gets every chat_shards event since the last asset-triggered run; ours is the newest, whose
    # manifest check_inputs takes (chat_ingest's earlier events name older shards)
    events = client.http.get(
        f"/api/v2/dags/chat_train/dagRuns/{run}/upstreamAssetEvents").json()["asset_events"]
    assert max(events, key=lambda e: e["timestamp"])["extra"]["manifest"] == str(manifest), events
    client.pause("chat_train")

    info = status.collect(s)
    assert all(x["up"] for x in info["services"].values()), info["services"]
    assert {d: x["runs"][0]["state"] for d, x in info["dags"].items()} == dict.fromkeys(
        ("chat_ingest", "chat_train", "chat_deploy", "chat_monitor"), "success")
    champion = info["models"]["champion"]
    assert champion["version"] == info["served"]["aliases"]["champion"]
    assert champion["metrics"]["perplexity"] > 1 and champion["lineage"]["snapshot_hash"]
    assert info["drift"]["verdict"] in ("drift", "ok") and Path(info["drift"]["report"]).is_file()
    index = Path(info["reports"]["index"])
    assert index.is_file() and "shadow.html" in index.read_text() and "data_docs" in index.read_text()
