"""The embedded stack for real: Airflow's scheduler runs chat_ingest triggered and backfilled over REST."""

import json

import psutil
import pytest

from tasks import stack
from tasks.synth import synth
from tests.conftest import make_settings

pytestmark = [pytest.mark.slow, pytest.mark.services]


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    # other ports than the defaults, so a developer's `make run` stack can stay up meanwhile
    s = make_settings(root, "stack.airflow_port=18080", "stack.mlflow_port=15000")
    synth(s, days=3, start="2026-11-01", records=60, faults=True, chatterbot=False)
    try:
        info = stack.up(s, timeout=240)
        yield s, info
    finally:
        stack.down(s)


def _listening(settings) -> set[tuple[str, int]]:
    pids = set()
    for name in ("airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "mlflow"):
        pgid = stack.alive(settings, name)
        assert pgid, f"{name} is not running"
        pids |= {p.pid for p in psutil.process_iter() if _pgid(p.pid) == pgid}
    return {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids}


def _pgid(pid: int) -> int | None:
    try:
        import os

        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_every_server_binds_loopback_only(running):
    s, info = running
    addrs = _listening(s)
    assert ("127.0.0.1", 18080) in addrs and ("127.0.0.1", 15000) in addrs
    assert all(ip == "127.0.0.1" for ip, _ in addrs), addrs  # no 0.0.0.0 / [::] log servers


def test_trigger_and_backfill_through_scheduler(running):
    s, _ = running
    client = stack.AirflowClient(s)
    client.wait_for_dag("chat_ingest", timeout=180)
    client.unpause("chat_ingest")
    # the UI's Trigger form: a manual run with the `day` param
    run_id = client.trigger("chat_ingest", {"day": "2026-11-01"})
    assert client.wait_run("chat_ingest", run_id, timeout=600) == "success", client.task_states("chat_ingest", run_id)
    assert client.task_states("chat_ingest", run_id) == dict.fromkeys(("ingest", "validate", "snapshot", "shard"), "success")

    # chat_train through the scheduler: DeepSpeed ranks under the Airflow worker, the run in MLflow's server
    client.wait_for_dag("chat_train", timeout=120)
    client.unpause("chat_train")
    train_run = client.trigger("chat_train", {"max_steps": 30, "world_size": 2, "zero_stage": 2, "resume": False})
    assert client.wait_run("chat_train", train_run, timeout=600) == "success", client.task_states("chat_train", train_run)
    client.pause("chat_train")  # no asset-triggered trainings during the backfill below
    import mlflow

    mlc = mlflow.MlflowClient(tracking_uri=f"http://127.0.0.1:{s.stack.mlflow_port}")
    runs = mlc.search_runs([mlc.get_experiment_by_name("chat-gpt").experiment_id])
    assert any(r.info.status == "FINISHED" and r.data.params.get("train.max_steps") == "30" for r in runs)
    assert mlc.get_model_version_by_alias("chat-gpt", "challenger").tags["gate"] == "passed"

    # a bad conf is refused by the Param schema, as the form would
    r = client.http.post("/api/v2/dags/chat_ingest/dagRuns", json={"logical_date": None, "conf": {"day": "yesterday"}})
    assert r.status_code == 400, r.text

    # backfill two past days through Airflow's backfill API
    bf = client.backfill("chat_ingest", "2026-11-02", "2026-11-03")
    runs = client.wait_backfill("chat_ingest", bf, timeout=900)
    assert runs == {"2026-11-02": "success", "2026-11-03": "success"}
    assert sorted(p.name for p in s.paths.clean.iterdir() if p.name.startswith("dt=")) == [
        "dt=2026-11-01", "dt=2026-11-02", "dt=2026-11-03"]
    latest = json.loads((s.paths.snapshots / "latest.json").read_text())
    snap = json.loads((s.paths.snapshots / f"{latest['snapshot_hash']}.json").read_text())
    assert sorted(snap["partitions"]) == ["2026-11-01", "2026-11-02", "2026-11-03"]
    assert any(s.paths.shards.glob("*/manifest.json"))
