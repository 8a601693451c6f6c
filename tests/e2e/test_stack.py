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

from tasks.loop.traffic import Load
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
        **dict.fromkeys(("wait_for_ingest", "check_inputs", "train", "evaluate", "gate", "register",
                         "quantize"), "success"), "distill": "skipped"}
    # ... a run of the schedule, not a manual one: the weekly tick, Monday 03:00 UTC
    run = next(r for r in client.runs("chat_train") if r["dag_run_id"] == train_run)
    tick = dt.datetime.fromisoformat(run["logical_date"])
    assert run["run_type"] == "scheduled" and (tick.weekday(), tick.hour, tick.minute) == (0, 3, 0), run
    # the Trigger button again, nothing changed: check_inputs finds the run registered and skips the rest
    again = client.trigger("chat_train", {"profile": "tiny"})
    assert client.wait_run("chat_train", again, timeout=300) == "success"
    assert client.task_states("chat_train", again) == {"wait_for_ingest": "success", **dict.fromkeys(
        ("check_inputs", "train", "evaluate", "gate", "register", "quantize", "distill"), "skipped")}
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

    # backfill two past days as a user does: `llmops backfill` (a thin wrapper over Airflow's backfill API),
    # with chat_train unpaused: each day's chat_shards event asks for a training, and the backfill trains once
    import subprocess
    import sys

    assert client.wait_run("chat_deploy", client.runs("chat_deploy")[-1]["dag_run_id"], timeout=300) == \
        "success"  # version 1's first deploy, before anything else is registered
    trains_before = {r["dag_run_id"] for r in client.runs("chat_train")}
    deploys_before = {r["dag_run_id"] for r in client.runs("chat_deploy")}
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

    # the backfill's events started chat_train; the runs waited for the backfill to end (wait_for_ingest) and
    # exactly one trained, on the corpus the backfill left; any other skipped at check_inputs as unchanged
    first = _wait_for_run(client, "chat_train", trains_before, timeout=120)
    _wait_idle(client, "chat_train", timeout=900)
    runs = [r for r in client.runs("chat_train") if r["dag_run_id"] not in trains_before]
    assert all(r["state"] == "success" and r["run_type"] == "asset_triggered" for r in runs), runs
    trained = [r["dag_run_id"] for r in runs if client.task_states("chat_train", r["dag_run_id"])["train"]
               == "success"]
    assert len(trained) == 1, \
        {r["dag_run_id"]: client.task_states("chat_train", r["dag_run_id"]) for r in runs}
    inputs = client.xcom("chat_train", trained[0], "check_inputs")
    assert inputs["snapshot_hash"] == latest["snapshot_hash"], (inputs, latest)
    assert {"2026-11-02", "2026-11-03"} <= set(inputs["data"]["added_days"]), inputs["data"]
    assert first in {r["dag_run_id"] for r in runs}
    v2 = client.xcom("chat_train", trained[0], "register")["version"]

    # its registration started chat_deploy; nobody sends traffic, so the shadow waits for mirrored pairs (a
    # sensor in reschedule mode) until rollout.deadline_s, then the run fails as inconclusive and the
    # challenger leaves the routes: no decision is never a green run
    deploy = _wait_for_run(client, "chat_deploy", deploys_before, timeout=120)
    assert client.wait_run("chat_deploy", deploy, timeout=600) == "failed", \
        client.task_states("chat_deploy", deploy)
    states = client.task_states("chat_deploy", deploy)
    assert states["shadow"] == "failed" and states["canary"] == "upstream_failed", states
    record = json.loads(sorted((s.paths.reports_dir / "rollout").glob(f"*-v{v2}-inconclusive.json"))[-1]
                        .read_text())
    assert "no decision by the deadline" in record["reason"] and "mirrored pairs" in record["reason"], record
    from tasks.serve.repository import read_aliases

    assert read_aliases(s.paths.triton_repository, "chat-gpt") == {"champion": 1, "inconclusive": v2}
    assert mlc.get_model_version("chat-gpt", str(v2)).tags["rollout.action"] == "inconclusive"


def _wait_idle(client, dag_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(r["state"] in ("queued", "running") for r in client.runs(dag_id)):
        if time.monotonic() > deadline:
            raise AssertionError(f"{dag_id} still busy after {timeout:.0f}s: {client.runs(dag_id)}")
        time.sleep(3.0)


def _wait_for_run(client, dag_id: str, known: set[str], timeout: float = 300.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [r["dag_run_id"] for r in client.runs(dag_id) if r["dag_run_id"] not in known]
        if new:
            return new[0]
        time.sleep(2.0)
    raise AssertionError(f"no new {dag_id} run within {timeout:.0f}s; runs: {client.runs(dag_id)}")


def _drifted_prompts(n: int = 60) -> list[str]:
    import random

    from tasks.loop.traffic import DRIFTED, THINGS

    rng = random.Random(7)
    return [rng.choice(DRIFTED).format(thing=rng.choice(THINGS)) for _ in range(n)]


def _served_rows(s) -> int:
    from tasks.loop.rollout import read_requests

    now = dt.datetime.now(dt.UTC)
    return sum(1 for r in read_requests(s, now - dt.timedelta(hours=1), now) if r.get("status") == 200)


def _monitor(client) -> str:
    run = client.trigger("chat_monitor", {})
    assert client.wait_run("chat_monitor", run, timeout=600) == "success", \
        client.task_states("chat_monitor", run)
    return run


def test_closed_loop_acts_on_evidence(running):
    """Users ask other things, at the OpenAI default temperature (sampled replies). Without consent to train
    on served traffic there is nothing new to learn: the monitor alerts and trains nothing. With it, the
    monitor ingests the served day first; the training its shards start learns from that day, and the
    rollout promotes or rolls back on the evidence. A challenger with the champion's very weights passes the
    shadow under sampled traffic (each mirrored pair shares one seed); a deliberately slow one is rolled back.
    Live traffic throughout never sees a failed request."""
    import mlflow

    from tasks.serve import server
    from tasks.serve.repository import read_aliases
    from tests.e2e.conftest import set_profile

    s, _ = running
    client = AirflowClient(s)
    mlc = mlflow.MlflowClient(tracking_uri=f"http://127.0.0.1:{s.stack.mlflow_port}")
    base = server.urls(s)["gateway"].removesuffix("/v1")

    # 1. version 1 is served as the first champion (test above: its registration started chat_deploy)
    first = min((r for r in client.runs("chat_deploy") if r["run_type"] == "asset_triggered"),
                key=lambda r: r["start_date"])["dag_run_id"]
    assert client.xcom("chat_deploy", first, "smoke")["usage"]["completion_tokens"] > 0
    assert client.xcom("chat_deploy", first, "canary")["reason"].startswith("first champion")
    assert read_aliases(s.paths.triton_repository, "chat-gpt")["champion"] == 1
    assert (s.paths.triton_repository / "chat-gpt" / "1" / "_lineage.json").is_file()
    assert {m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]} >= \
        {"chat-gpt", "chat-gpt:champion"}
    versions_before = len(mlc.search_model_versions("name='chat-gpt'"))

    # 2. drifted questions, sampled replies (no temperature sent: the API's default 1.0)
    with Load(base, clients=2, prompts=_drifted_prompts(), temperature=None, max_tokens=8) as load:
        deadline = time.monotonic() + 240
        while _served_rows(s) < 160 and time.monotonic() < deadline:
            time.sleep(2.0)
    # the longest drifted questions do not fit the tiny model's 128-token window: a 400 that says so
    assert set(load.statuses) <= {200, 400} and _served_rows(s) >= 160, \
        (sorted(set(load.statuses)), _served_rows(s))
    client.wait_for_dag("chat_monitor", timeout=120)

    # 3. no consent to train on served traffic: nothing new to learn from -> an alert, no training
    set_profile("ingest", {"sources": {"requests": {"enabled": False}}})
    trains = {r["dag_run_id"] for r in client.runs("chat_train")}
    monitors = {r["dag_run_id"] for r in client.runs("chat_monitor")}
    client.unpause("chat_monitor")  # the hourly schedule; if its next run is not due yet, the Trigger button
    try:
        run = _wait_for_run(client, "chat_monitor", monitors, timeout=20)
        assert client.wait_run("chat_monitor", run, timeout=600) == "success", \
            client.task_states("chat_monitor", run)
    except AssertionError:
        run = _monitor(client)
    assert client.xcom("chat_monitor", run, "drift")["fire"]
    states = client.task_states("chat_monitor", run)
    assert [states[t] for t in ("alert", "retrain", "ingest_served")] == ["success", "skipped", "skipped"], \
        states
    raised = client.xcom("chat_monitor", run, "alert")
    assert raised["kind"] == "drift-no-new-data" and "no new data to learn from" in raised["reason"], raised
    assert Path(raised["record"]).is_file()
    time.sleep(5.0)
    assert {r["dag_run_id"] for r in client.runs("chat_train")} == trains  # nothing trained
    assert len(mlc.search_model_versions("name='chat-gpt'")) == versions_before

    # 4. consent on: the monitor ingests the served day first; its chat_shards event starts the training
    set_profile("ingest", {"sources": {"requests": {"enabled": True}}})
    ingests = {r["dag_run_id"] for r in client.runs("chat_ingest")}
    deploys = {r["dag_run_id"] for r in client.runs("chat_deploy")}
    run = _monitor(client)
    assert client.task_states("chat_monitor", run)["ingest_served"] == "success", \
        client.task_states("chat_monitor", run)
    today = dt.datetime.now(dt.UTC).date().isoformat()
    ingest_run = _wait_for_run(client, "chat_ingest", ingests, timeout=60)
    conf = next(r for r in client.runs("chat_ingest") if r["dag_run_id"] == ingest_run)["conf"]
    assert conf["day"] == today and conf["reason"].startswith("chat_monitor: "), conf
    assert client.wait_run("chat_ingest", ingest_run, timeout=600) == "success", \
        client.task_states("chat_ingest", ingest_run)
    served = client.xcom("chat_ingest", ingest_run, "ingest")["served"]
    assert served["enabled"] and served["kept"] > 0, served
    retrain = _wait_for_run(client, "chat_train", trains, timeout=120)
    # a second fire meanwhile triggers nothing (a training is going, and the cooldown holds)
    again = _monitor(client)
    acts = ("retrain", "ingest_served", "alert")
    states = client.task_states("chat_monitor", again)
    assert [states[t] for t in acts] == ["skipped"] * 3, states
    assert client.wait_run("chat_train", retrain, timeout=900) == "success", \
        client.task_states("chat_train", retrain)
    inputs = client.xcom("chat_train", retrain, "check_inputs")
    data = inputs["data"]
    assert today in data["added_days"] and data["rows_by_source"].get("requests", 0) > 0, data
    assert inputs["trigger"]["reason"].startswith("chat_monitor: ")  # carried on the chat_shards event
    snap = json.loads((s.paths.snapshots / f"{inputs['snapshot_hash']}.json").read_text())
    assert today in snap["partitions"]  # the new snapshot holds the served day
    new = client.xcom("chat_train", retrain, "register")["version"]
    run_tags = mlc.get_run(mlc.get_model_version("chat-gpt", str(new)).run_id).data.tags
    assert run_tags["llmops.trigger_reason"].startswith("chat_monitor: ") and today in \
        run_tags["llmops.trigger_new_data"], run_tags

    with Load(base, clients=2, temperature=None) as load:
        # 5. the retrained version's rollout under sampled traffic: decided on the evidence
        deploy = _wait_for_run(client, "chat_deploy", deploys, timeout=120)
        assert client.wait_run("chat_deploy", deploy, timeout=600) == "success", \
            client.task_states("chat_deploy", deploy)
        decision = client.xcom("chat_deploy", deploy, "canary")
        assert decision["action"] in ("promote", "rollback") and decision["challenger"] == new, decision
        record = json.loads(Path(decision["record"]).read_text())
        assert today in record["training_data"]["new_data"], record["training_data"]
        champion = read_aliases(s.paths.triton_repository, "chat-gpt")["champion"]
        assert champion == (new if decision["action"] == "promote" else 1)

        # 6. the champion's own weights as a challenger: identical replies under sampled traffic, so the
        # shadow passes it (it is registered by hand: chat_train never registers equal weights twice)
        cv = mlc.get_model_version("chat-gpt", str(champion))
        twin = mlc.create_model_version("chat-gpt", source=cv.source, run_id=cv.run_id, tags={
            k: v for k, v in cv.tags.items() if not k.startswith(("rollout.", "promoted_"))})
        mlc.set_registered_model_alias("chat-gpt", "challenger", twin.version)
        same = client.trigger("chat_deploy", {"alias": "challenger"})
        assert client.wait_run("chat_deploy", same, timeout=600) == "success", \
            client.task_states("chat_deploy", same)
        shadow = client.xcom("chat_deploy", same, "shadow")
        assert shadow["verdict"] == "pass", shadow
        report = json.loads(Path(shadow["report"]).with_name("shadow.json").read_text())
        assert report["replies"]["similarity_mean"] > 0.9, report["replies"]
        assert client.xcom("chat_deploy", same, "canary")["action"] == "promote"
        champion = int(twin.version)

        # 7. a deliberately slow challenger (version 1 with a roll-back drill): the shadow rolls it back
        mlc.set_registered_model_alias("chat-gpt", "challenger", "1")
        drill = client.trigger("chat_deploy", {"alias": "challenger", "drill_delay_ms": 60})
        assert client.wait_run("chat_deploy", drill, timeout=600) == "success", \
            client.task_states("chat_deploy", drill)
    shadow = client.xcom("chat_deploy", drill, "shadow")
    assert shadow["action"] == "rollback" and "p99 latency" in shadow["reason"], shadow
    assert client.xcom("chat_deploy", drill, "canary")["action"] == "rollback"
    assert read_aliases(s.paths.triton_repository, "chat-gpt")["champion"] == champion
    assert read_aliases(s.paths.triton_repository, "chat-gpt")["rejected"] == 1
    assert mlc.get_model_version("chat-gpt", "1").tags["rollout.reason"].startswith("shadow: p99 latency")
    record = json.loads(Path(shadow["record"]).read_text())
    assert record["action"] == "rollback" and record["evidence"]["steps"][0]["phase"] == "shadow"
    # live traffic throughout every switch: every request answered, only ever by a champion
    assert load.statuses and set(load.statuses) == {200}, sorted(set(load.statuses))
    assert httpx.post(f"{base}/v1/chat/completions", json={"model": "chat-gpt", "max_tokens": 4, "messages": [
        {"role": "user", "content": "hi"}]}, timeout=60).headers["x-model-version"] == str(champion)
    client.pause("chat_monitor")


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
    # for each training: why it ran, the data it saw that the champion's did not, and what became of it
    today = dt.datetime.now(dt.UTC).date().isoformat()
    retrain = next(t for t in info["trainings"] if t["reason"].startswith("chat_monitor: "))
    assert today in retrain["new_data"] and retrain["outcome"].startswith(f"v{retrain['version']}: "), retrain
    # the last five rollouts: the backfill's version ended inconclusive (no traffic by the deadline)
    assert {"inconclusive", "rollback"} <= {r["action"] for r in info["rollouts"]}, info["rollouts"]
    assert any(a["kind"] == "drift-no-new-data" for a in info["alerts"]), info["alerts"]
    index = Path(info["reports"]["index"])
    assert index.is_file() and "shadow.html" in index.read_text() and "data_docs" in index.read_text()
