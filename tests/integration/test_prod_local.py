"""The production topology on this machine, by configuration alone (the prod-local profile): Airflow's
metadata DB on the machine's PostgreSQL, the CeleryExecutor with Redis as broker and a Celery worker,
MLflow's server on PostgreSQL with basic auth. chat_ingest and a short chat_train run through the
Celery worker; MLflow answers 401 without credentials. The test's own databases, roles and Redis DB
are removed afterwards; Postgres or Redis not running is started as ../shared/FACTS.md says, or fails."""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
import subprocess
import time
import uuid

import httpx
import pytest
import yaml

from tasks.data.synth import synth
from tasks.ops import stack
from tasks.ops.airflow_client import AirflowClient
from tasks.procs import alive, free_port, venv_bin
from tests.helpers.project import REPO, make_settings
from tests.helpers.services import postgres_up, redis_up

pytestmark = [pytest.mark.slow, pytest.mark.services]
BROKER_DB = 13  # the Celery broker's Redis database, emptied afterwards


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _drop(databases: list[str], roles: list[str]) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect("postgresql://127.0.0.1:5432/postgres", autocommit=True) as conn:
        for db in databases:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (db,))
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(db)))
        for role in roles:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@pytest.fixture(scope="module")
def prod(tmp_path_factory):
    postgres_up()
    redis_up()
    import redis

    tag = uuid.uuid4().hex[:8]
    af_db, ml_db, role = f"llmops_t{tag}_airflow", f"llmops_t{tag}_mlflow", f"llmops_t{tag}"
    root = tmp_path_factory.mktemp("prod")
    saved = {k: os.environ.get(k) for k in ("LLMOPS_MLFLOW_ADMIN_PASSWORD", "LLMOPS_CONFIG_DIR")}
    # never a default, never in the repo
    os.environ["LLMOPS_MLFLOW_ADMIN_PASSWORD"] = secrets.token_urlsafe(18)
    configs = root / "configs"  # the prod-local profile with a 20-step training, for every Airflow process
    shutil.copytree(REPO / "configs", configs)
    profile = yaml.safe_load((configs / "profiles" / "prod-local.yaml").read_text())
    profile["train"]["max_steps"] = 20
    (configs / "profiles" / "prod-local.yaml").write_text(yaml.safe_dump(profile))
    # this run is about the topology; its training evaluates three tiers, each on fewer, shorter replies
    ev = yaml.safe_load((configs / "eval.yaml").read_text())
    ev.update(reply_samples=16, max_new_tokens=16, perplexity_windows=16, latency_requests=8)
    (configs / "eval.yaml").write_text(yaml.safe_dump(ev))
    os.environ["LLMOPS_CONFIG_DIR"] = str(configs)
    s = make_settings(root, f"stack.airflow_port={free_port()}", f"stack.mlflow_port={free_port()}",
                      f"stack.airflow_db_url=postgresql+psycopg://{role}@127.0.0.1:5432/{af_db}",
                      f"stack.mlflow_backend_uri=postgresql+psycopg://{role}@127.0.0.1:5432/{ml_db}",
                      f"stack.celery_broker_url=redis://127.0.0.1:6379/{BROKER_DB}",
                      f"stack.celery_result_backend=db+postgresql+psycopg://{role}@127.0.0.1:5432/{af_db}",
                      profile="prod-local")
    synth(s, days=1, start="2026-11-01", records=60, faults=True, chatterbot=False)
    try:
        t0 = time.monotonic()
        info = stack.up(s, timeout=240)
        info["up_s"] = time.monotonic() - t0
        yield s, info
    finally:
        stack.down(s)
        _drop([af_db, ml_db], [role])
        redis.Redis.from_url(f"redis://127.0.0.1:6379/{BROKER_DB}").flushdb()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _latencies(client: AirflowClient, dag_id: str, run_id: str) -> list[float]:
    """Seconds from a task instance being queued to its start on the worker."""
    tis = client.ok(client.http.get(
        f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances"))["task_instances"]
    return [(dt.datetime.fromisoformat(t["start_date"])
             - dt.datetime.fromisoformat(t["queued_when"])).total_seconds()
            for t in tis if t.get("queued_when") and t.get("start_date")]


def test_airflow_runs_on_postgres_and_celery_and_mlflow_needs_credentials(prod):
    import mlflow
    import psycopg

    s, info = prod
    assert set(info["started"]) >= {"airflow-celery-worker", "mlflow", "airflow-scheduler"}
    # every socket the stack listens on, the Celery worker's included, is on 127.0.0.1
    import psutil

    groups = {alive(s, n) for n in info["started"]}
    pids = {p.pid for p in psutil.process_iter() if _pgid(p.pid) in groups}
    listening = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in pids}
    assert ("127.0.0.1", s.stack.airflow_port) in listening and \
        ("127.0.0.1", s.stack.mlflow_port) in listening
    assert all(ip == "127.0.0.1" for ip, _ in listening), listening
    # the metadata really is in Postgres: the DAGs the dag-processor parsed are rows there
    client = AirflowClient(s)
    client.wait_for_dag("chat_ingest", timeout=180)
    db = s.stack.airflow_db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(db) as conn:
        assert {r[0] for r in conn.execute("SELECT dag_id FROM dag")} >= {"chat_ingest", "chat_train"}

    # chat_ingest through the Celery worker (the Trigger form's REST call)
    client.unpause("chat_ingest")
    t0 = time.monotonic()
    run_id = client.trigger("chat_ingest", {"day": "2026-11-01", "profile": "prod-local"})
    assert client.wait_run("chat_ingest", run_id, timeout=600) == "success", \
        client.task_states("chat_ingest", run_id)
    ingest_s = time.monotonic() - t0
    lat = _latencies(client, "chat_ingest", run_id)
    worker_log = (s.paths.var_dir / "log" / "airflow-celery-worker.log").read_text(errors="replace")
    assert "chat_ingest" in worker_log or "execute_workload" in worker_log, worker_log[-2000:]

    # MLflow: 401 without credentials, the admin (password from the environment) gets in
    base = f"http://127.0.0.1:{s.stack.mlflow_port}"
    search = f"{base}/api/2.0/mlflow/experiments/search?max_results=5"
    assert httpx.get(search).status_code == 401
    assert httpx.get(search, auth=("admin", "password1234")).status_code == 401  # MLflow's default is not it
    assert httpx.get(search, auth=("admin", os.environ["LLMOPS_MLFLOW_ADMIN_PASSWORD"])).status_code == 200
    cfg = (s.paths.var_dir / "mlflow" / "basic_auth.ini")
    assert oct(cfg.stat().st_mode & 0o777) == "0o600"
    creds = stack.mlflow_credentials()
    os.environ.update(creds)
    try:
        exp = mlflow.MlflowClient(tracking_uri=base).create_experiment(f"prod-local-{uuid.uuid4().hex[:6]}")
        assert exp
    finally:
        for k in creds:
            os.environ.pop(k, None)
    run = next(r for r in client.runs("chat_ingest") if r["dag_run_id"] == run_id)
    run_s = (dt.datetime.fromisoformat(run["end_date"])
             - dt.datetime.fromisoformat(run["start_date"])).total_seconds()
    print(json.dumps({"prod_local": {"stack_up_s": round(info["up_s"], 1),
                                     "chat_ingest_trigger_to_done_s": round(ingest_s, 1),
                                     "chat_ingest_run_s": round(run_s, 1),
                                     "queued_to_running_s": [round(x, 3) for x in lat]}}))

    # a short chat_train through the Celery worker: DeepSpeed ranks under it, the run on the MLflow server
    client.unpause("chat_train")  # the weekly schedule's latest run starts at once: the short training
    runs = []
    deadline = time.monotonic() + 60
    while not runs and time.monotonic() < deadline:
        runs = client.runs("chat_train")
        time.sleep(2)
    train_run = runs[0]["dag_run_id"] if runs else client.trigger("chat_train", {"profile": "prod-local"})
    assert client.wait_run("chat_train", train_run, timeout=900) == "success", \
        client.task_states("chat_train", train_run)
    client.pause("chat_train")  # the backfill below publishes shards: no asset-triggered trainings
    os.environ.update(creds)
    try:
        mlc = mlflow.MlflowClient(tracking_uri=base)
        assert mlc.get_model_version("chat-gpt", "1").tags["gate"] == "passed"
    finally:
        for k in creds:
            os.environ.pop(k, None)


def test_days_backfilled_with_the_airflow_cli_then_reprocessed_give_identical_hashes(prod):
    s, _ = prod
    client = AirflowClient(s)
    synth(s, days=3, start="2026-11-02", records=60, faults=True, chatterbot=False)

    def backfill_with_the_cli() -> dict[str, str]:
        r = subprocess.run([venv_bin("airflow"), "backfill", "create", "--dag-id", "chat_ingest",
                            "--from-date", "2026-11-02", "--to-date", "2026-11-04", "--max-active-runs", "2",
                            "--reprocess-behavior", "completed"], env=stack.airflow_env(s),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        bf = client.ok(client.http.get("/api/v2/backfills", params={"dag_id": "chat_ingest"}))["backfills"]
        states = client.wait_backfill("chat_ingest", max(b["id"] for b in bf), timeout=900)
        assert states == {f"2026-11-{d:02d}": "success" for d in range(2, 5)}, states
        runs = [r for r in client.runs("chat_ingest", run_type="backfill")]
        spans = [(dt.datetime.fromisoformat(r["start_date"]), dt.datetime.fromisoformat(r["end_date"]))
                 for r in runs]
        most = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
        assert most <= 2, f"{most} backfill runs at once; --max-active-runs 2"
        return {r["logical_date"][:10]:
                (client.xcom("chat_ingest", r["dag_run_id"], "ingest")["content_hash"], r["end_date"])
                for r in runs}

    first = backfill_with_the_cli()
    again = backfill_with_the_cli()  # reprocessing the completed days
    assert len(first) == 3 and {d: h for d, (h, _) in first.items()} == {d: h for d, (h, _) in again.items()}
    assert all(again[d][1] > first[d][1] for d in first), "the second backfill did not run the days again"
