"""The Airflow REST client: the calls the UI's Trigger form and backfill dialog make (Airflow 3 /api/v2,
a JWT from /auth/token with the embedded stack's generated admin password)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tasks.config import Settings
from tasks.ops.stack import StackError, urls


class AirflowClient:
    """The REST calls the UI's Trigger form makes (Airflow 3 /api/v2, JWT from /auth/token)."""

    def __init__(self, settings: Settings, username: str = "admin"):
        u = urls(settings)
        pw_file = Path(u["airflow_password_file"])
        if not pw_file.is_file():
            raise StackError(f"{pw_file} not found: is the stack up? (`llmops stack up`)")
        password = json.loads(pw_file.read_text())[username]
        self.http = httpx.Client(base_url=u["airflow"], timeout=30.0)
        r = self.http.post("/auth/token", json={"username": username, "password": password})
        if r.status_code >= 300:
            raise StackError(f"Airflow login failed: {r.status_code} {r.text[:300]}")
        self.http.headers["Authorization"] = f"Bearer {r.json()['access_token']}"

    def ok(self, r: httpx.Response) -> Any:
        if r.status_code >= 300:
            raise StackError(f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text[:500]}")
        return r.json() if r.content else None

    def wait_for_dag(self, dag_id: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.http.get(f"/api/v2/dags/{dag_id}").status_code == 200:
                return
            time.sleep(2.0)
        errors = self.http.get("/api/v2/importErrors").text[:1500]
        raise StackError(f"DAG {dag_id} not parsed within {timeout:.0f}s; import errors: {errors}")

    def unpause(self, dag_id: str) -> None:
        self.ok(self.http.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False}))

    def pause(self, dag_id: str) -> None:
        self.ok(self.http.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": True}))

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        run = self.ok(self.http.post(f"/api/v2/dags/{dag_id}/dagRuns",
                                     json={"logical_date": None, "conf": conf or {}}))
        return run["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.ok(self.http.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}"))["state"]

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 900.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run_state(dag_id, run_id)
            if state in ("success", "failed"):
                return state
            time.sleep(2.0)
        raise StackError(f"{dag_id} run {run_id} still running after {timeout:.0f}s")

    def runs(self, dag_id: str, **params: Any) -> list[dict[str, Any]]:
        """The DAG's runs, newest first (filters as the REST API takes them, e.g.
        run_type="asset_triggered")."""
        return self.ok(self.http.get(f"/api/v2/dags/{dag_id}/dagRuns",
                                      params={"order_by": "-run_after", "limit": 100, **params}))["dag_runs"]

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        """What a task returned (its XCom), as JSON."""
        return self.ok(self.http.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"
                                     f"/xcomEntries/{key}",
                                     params={"deserialize": True, "stringify": False}))["value"]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        tis = self.ok(self.http.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}"
                                    "/taskInstances"))["task_instances"]
        return {t["task_id"]: t["state"] for t in tis}

    def backfill(self, dag_id: str, start: str, end: str, reprocess: str = "completed") -> int:
        """Create a backfill over [start, end] (dates); returns its id. `reprocess`: none|failed|completed."""
        body = {"dag_id": dag_id, "from_date": f"{start}T00:00:00Z", "to_date": f"{end}T00:00:00Z",
                "run_backwards": False, "dag_run_conf": {}, "reprocess_behavior": reprocess,
                "max_active_runs": 1}
        # On SQLite, creating a backfill while the scheduler writes can meet a lock that SQLite reports at
        # once (a read transaction upgrading to write); the API answers 503 and nothing was created: try
        # again.
        for _ in range(30):
            r = self.http.post("/api/v2/backfills", json=body)
            if r.status_code != 503 or "locked" not in r.text:
                break
            time.sleep(2.0)
        return self.ok(r)["id"]

    def wait_backfill(self, dag_id: str, backfill_id: int, timeout: float = 1800.0, expect: int | None = None,
                      on_progress: Callable[[dict[str, str]], None] | None = None) -> dict[str, str]:
        """Wait until the backfill completes; return {logical_date: state} of its runs. A reprocessed day
        re-runs its existing DagRun, so this backfill's runs are those queued since it was created.
        `expect`: the number of runs it must have (days); `on_progress` sees the states at every poll.
        Stops early on a failed run."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            bf = self.ok(self.http.get(f"/api/v2/backfills/{backfill_id}"))
            runs = self.runs(dag_id, run_type="backfill")
            states = {r["logical_date"][:10]: r["state"] for r in runs
                      if (r["queued_at"] or "") >= bf["created_at"]}
            if on_progress:
                on_progress(states)
            if any(v == "failed" for v in states.values()):
                return states
            if (bf.get("completed_at") and all(v in ("success", "failed") for v in states.values())
                    and (expect is None or len(states) >= expect)):
                return states
            time.sleep(2.0)
        raise StackError(f"backfill {backfill_id} of {dag_id} not done after {timeout:.0f}s")
