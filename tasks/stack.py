"""The embedded stack: Airflow (api-server, scheduler, dag-processor, triggerer) and MLflow.

    llmops stack up        # start what is not running, wait until healthy, print URLs
    llmops stack status
    llmops stack down

Airflow's components are started one by one rather than through `airflow standalone`, because
standalone's scheduler and triggerer start log servers bound to every interface; with the
LocalExecutor on one machine the api-server reads task logs from disk, so they are skipped
(`--skip-serve-logs`) and every port this stack opens is bound to `stack.host` (127.0.0.1).
Each process runs in its own session; its process-group id is kept in var/run/<name>.pid and
`down` sends SIGTERM to the group (then SIGKILL after a grace period).

The production topology is the same code with other settings (the `prod-local` profile): the
metadata DB on PostgreSQL, the CeleryExecutor with a Redis broker and one more process, a Celery
worker; MLflow's tracking server on PostgreSQL with its basic-auth app. The Postgres databases and
their roles are created idempotently on `up` through `stack.postgres_admin_url`. Secrets come only
from the environment: $LLMOPS_MLFLOW_ADMIN_PASSWORD, and in the stack's URLs `${NAME}` stands for
the environment variable NAME (postgresql+psycopg://airflow:${AIRFLOW_DB_PASSWORD}@db/airflow), read
when the processes start. An AIRFLOW__* variable already in the caller's environment never changes
which database the stack uses: the URLs come from the config alone.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tasks.config import PROJECT_DIR, Settings

SQLITE_CONNECT_ARGS = {"timeout": 60}  # sqlite3.connect(timeout=...): seconds to wait for a lock


class StackError(RuntimeError):
    pass


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def airflow_home(settings: Settings) -> Path:
    return settings.paths.var_dir / "airflow"


def airflow_env(settings: Settings) -> dict[str, str]:
    """Environment for every Airflow process (and for `airflow` CLI calls against this stack)."""
    home = airflow_home(settings)
    home.mkdir(parents=True, exist_ok=True)
    st = settings.stack
    base = f"http://{st.host}:{st.airflow_port}"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_DIR / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": st.executor,
        "AIRFLOW__CORE__PARALLELISM": str(st.airflow_parallelism),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base}/execution/",
        "AIRFLOW__API__HOST": st.host,
        "AIRFLOW__API__PORT": str(st.airflow_port),
        "AIRFLOW__API__BASE_URL": base,
        "AIRFLOW__API_AUTH__JWT_SECRET": _secret(home / "jwt_secret"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": expand_env(st.airflow_db_url, "stack.airflow_db_url")
        or f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        "LLMOPS_ROOT": str(settings.paths.root),
        "LLMOPS_PROFILE": settings.profile,
        "GX_ANALYTICS_ENABLED": "false",
        "MLFLOW_TRACKING_URI": f"http://{st.host}:{st.mlflow_port}",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    if env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("sqlite"):
        # every process waits up to a minute for SQLite's write lock instead of 5 s: an `airflow backfill create`
        # from a shell otherwise fails with "database is locked" while the scheduler writes
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS"] = "tasks.stack.SQLITE_CONNECT_ARGS"
    if st.executor == "CeleryExecutor":
        if not st.celery_broker_url:
            raise StackError("stack.executor is CeleryExecutor but stack.celery_broker_url is empty (redis://host:6379/N)")
        env["AIRFLOW__CELERY__BROKER_URL"] = expand_env(st.celery_broker_url, "stack.celery_broker_url")
        env["AIRFLOW__CELERY__RESULT_BACKEND"] = (expand_env(st.celery_result_backend, "stack.celery_result_backend")
                                                  or "db+" + env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
        env["AIRFLOW__CELERY__WORKER_CONCURRENCY"] = str(st.celery_concurrency)
    if st.mlflow_auth:
        env |= mlflow_credentials()
    return env


def expand_env(url: str, key: str) -> str:
    """`${NAME}` in a configured URL -> the environment variable NAME (a secret stays out of configs/)."""
    def value(m: re.Match) -> str:
        if m.group(1) not in os.environ:
            raise StackError(f"{key} refers to ${{{m.group(1)}}}, which is not set in the environment")
        return os.environ[m.group(1)]

    return re.sub(r"\$\{([A-Z_][A-Z0-9_]*)\}", value, url)


def mlflow_credentials() -> dict[str, str]:
    """The MLflow client's basic-auth credentials: the admin, password from $LLMOPS_MLFLOW_ADMIN_PASSWORD."""
    password = os.environ.get("LLMOPS_MLFLOW_ADMIN_PASSWORD", "")
    if len(password) < 12 or password == "password1234":
        raise StackError("stack.mlflow_auth is on: set LLMOPS_MLFLOW_ADMIN_PASSWORD to the MLflow admin password "
                         "(12 characters or more, not MLflow's default)")
    return {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}


def _mlflow_auth_config(settings: Settings) -> Path:
    """MLflow's basic-auth ini (var/mlflow/basic_auth.ini, mode 0600): the admin and its password
    from the environment, new users read-only, users in their own SQLite DB beside it."""
    d = settings.paths.var_dir / "mlflow"
    d.mkdir(parents=True, exist_ok=True)
    path = d / "basic_auth.ini"
    body = ("[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{d / 'basic_auth.db'}\n"
            "admin_username = admin\n"
            f"admin_password = {mlflow_credentials()['MLFLOW_TRACKING_PASSWORD']}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(body)
    path.chmod(0o600)
    return path


def _secret(path: Path) -> str:
    """A random secret generated once per install, kept in `path` with mode 0600, never committed."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


def provision_postgres(settings: Settings) -> list[str]:
    """Create the roles and databases the Postgres URLs of `stack` name, if missing (idempotent)."""
    from urllib.parse import urlsplit

    import psycopg
    from psycopg import sql

    st = settings.stack
    wanted = {}
    for key in ("airflow_db_url", "mlflow_backend_uri"):
        url = getattr(st, key)
        if not url.startswith("postgresql"):
            continue
        u = urlsplit(url)
        role, db = u.username, u.path.lstrip("/")
        for what, name in (("role", role), ("database", db)):
            if not name or not name.replace("_", "").isalnum():
                raise StackError(f"stack.{key}: {what} {name!r} must be letters, digits and _ only")
        wanted[db] = role
    created = []
    if not wanted:
        return created
    admin = expand_env(st.postgres_admin_url, "stack.postgres_admin_url").replace("postgresql+psycopg://", "postgresql://")
    try:
        conn = psycopg.connect(admin, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as e:
        raise StackError(f"cannot reach PostgreSQL at stack.postgres_admin_url={admin}: {e}") from None
    with conn:
        for db, role in wanted.items():
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
                created.append(f"role {role}")
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db), sql.Identifier(role)))
                created.append(f"database {db}")
    return created


def _components(settings: Settings) -> dict[str, list[str]]:
    st = settings.stack
    af = _bin("airflow")
    mlflow_dir = settings.paths.var_dir / "mlflow"
    out = {
        "airflow-api-server": [af, "api-server", "--host", st.host, "--port", str(st.airflow_port)],
        "airflow-scheduler": [af, "scheduler", "--skip-serve-logs"],
        "airflow-dag-processor": [af, "dag-processor"],
        "airflow-triggerer": [af, "triggerer", "--skip-serve-logs"],
        "mlflow": [_bin("mlflow"), "server", "--host", st.host, "--port", str(st.mlflow_port), "--workers", "1",
                   "--backend-store-uri", expand_env(st.mlflow_backend_uri, "stack.mlflow_backend_uri")
                   or f"sqlite:///{mlflow_dir / 'mlflow.db'}",
                   "--artifacts-destination", str(mlflow_dir / "artifacts"),
                   *(["--app-name", "basic-auth"] if st.mlflow_auth else [])],
    }
    if st.executor == "CeleryExecutor":  # task logs are read from disk on this machine: no log server
        out["airflow-celery-worker"] = [af, "celery", "worker", "--concurrency", str(st.celery_concurrency),
                                        "--skip-serve-logs", "--without-gossip", "--without-mingle"]
    return out


def pidfile(settings: Settings, name: str) -> Path:
    return settings.paths.var_dir / "run" / f"{name}.pid"


def alive(settings: Settings, name: str) -> int | None:
    pf = pidfile(settings, name)
    if not pf.is_file():
        return None
    pgid = int(pf.read_text())
    try:
        os.killpg(pgid, 0)
        return pgid
    except ProcessLookupError:
        pf.unlink(missing_ok=True)
        return None


def urls(settings: Settings) -> dict[str, str]:
    st = settings.stack
    return {"airflow": f"http://{st.host}:{st.airflow_port}", "mlflow": f"http://{st.host}:{st.mlflow_port}",
            "airflow_password_file": str(airflow_home(settings) / "simple_auth_manager_passwords.json.generated")}


def wait_http(url: str, timeout: float, name: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise StackError(f"{name} did not answer {url} within {timeout:.0f}s; last log lines ({log}):\n{tail}")


def up(settings: Settings, timeout: float = 180.0) -> dict[str, Any]:
    env = airflow_env(settings)
    logs = settings.paths.var_dir / "log"
    logs.mkdir(parents=True, exist_ok=True)
    (settings.paths.var_dir / "run").mkdir(parents=True, exist_ok=True)
    (settings.paths.var_dir / "mlflow" / "artifacts").mkdir(parents=True, exist_ok=True)
    if settings.stack.mlflow_auth:
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(_mlflow_auth_config(settings))
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = _secret(settings.paths.var_dir / "mlflow" / "flask_secret")  # CSRF
    provision_postgres(settings)
    if not any(alive(settings, n) for n in _components(settings) if n.startswith("airflow")):
        r = subprocess.run([_bin("airflow"), "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
        if r.returncode:
            where = re.sub(r"//[^@/]*@", "//***@", env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])  # no password in logs
            raise StackError(f"airflow db migrate failed ({where}):\n{r.stderr[-2000:]}")
        # one training at a time on this machine (chat_train's `train` task runs in this pool)
        subprocess.run([_bin("airflow"), "pools", "set", "training", "1", "DeepSpeed training runs"], env=env,
                       check=True, capture_output=True, timeout=120)
    started = []
    for name, cmd in _components(settings).items():
        if alive(settings, name):
            continue
        with open(logs / f"{name}.log", "ab") as out:
            # umask 077: what the servers write (the generated admin password above all) is the owner's alone
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=settings.paths.root, umask=0o077)
        pidfile(settings, name).write_text(str(proc.pid))
        started.append(name)
    u = urls(settings)
    wait_http(f"{u['airflow']}/api/v2/monitor/health", timeout, "Airflow api-server", logs / "airflow-api-server.log")
    pw = Path(u["airflow_password_file"])
    if pw.exists():  # written by an api-server started before the umask above
        pw.chmod(0o600)
    wait_http(f"{u['mlflow']}/health", timeout, "MLflow", logs / "mlflow.log")
    return {"started": started, **u}


def down(settings: Settings, grace: float = 20.0) -> dict[str, Any]:
    return {"stopped": stop_groups(settings, list(_components(settings)), grace)}


def reap(pgid: int) -> None:
    """Collect our exited children in process group `pgid` (a zombie still counts as a group member)."""
    try:
        while os.waitpid(-pgid, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def stop_groups(settings: Settings, names: list[str], grace: float = 20.0) -> list[str]:
    """SIGTERM the process groups of the named components, SIGKILL what is left after `grace` s."""
    stopped = []
    groups = {n: g for n in names if (g := alive(settings, n))}
    for g in groups.values():
        os.killpg(g, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for name, g in groups.items():
        while time.monotonic() < deadline:
            reap(g)
            try:
                os.killpg(g, 0)
                time.sleep(0.2)
            except ProcessLookupError:
                break
        else:
            try:
                os.killpg(g, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pidfile(settings, name).unlink(missing_ok=True)
        stopped.append(name)
    return stopped


def status(settings: Settings) -> dict[str, Any]:
    return {"running": {n: bool(alive(settings, n)) for n in _components(settings)}, **urls(settings)}


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

    def _ok(self, r: httpx.Response) -> Any:
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
        self._ok(self.http.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False}))

    def pause(self, dag_id: str) -> None:
        self._ok(self.http.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": True}))

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        run = self._ok(self.http.post(f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}}))
        return run["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self._ok(self.http.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}"))["state"]

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 900.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run_state(dag_id, run_id)
            if state in ("success", "failed"):
                return state
            time.sleep(2.0)
        raise StackError(f"{dag_id} run {run_id} still running after {timeout:.0f}s")

    def runs(self, dag_id: str, **params: Any) -> list[dict[str, Any]]:
        """The DAG's runs, newest first (filters as the REST API takes them, e.g. run_type="asset_triggered")."""
        return self._ok(self.http.get(f"/api/v2/dags/{dag_id}/dagRuns",
                                      params={"order_by": "-run_after", "limit": 100, **params}))["dag_runs"]

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        """What a task returned (its XCom), as JSON."""
        return self._ok(self.http.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}",
                                      params={"deserialize": True, "stringify": False}))["value"]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        tis = self._ok(self.http.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances"))["task_instances"]
        return {t["task_id"]: t["state"] for t in tis}

    def backfill(self, dag_id: str, start: str, end: str, reprocess: str = "completed") -> int:
        """Create a backfill over [start, end] (dates); returns its id. `reprocess`: none|failed|completed."""
        body = {"dag_id": dag_id, "from_date": f"{start}T00:00:00Z", "to_date": f"{end}T00:00:00Z",
                "run_backwards": False, "dag_run_conf": {}, "reprocess_behavior": reprocess, "max_active_runs": 1}
        # On SQLite, creating a backfill while the scheduler writes can meet a lock that SQLite reports at once
        # (a read transaction upgrading to write); the API answers 503 and nothing was created: try again.
        for _ in range(30):
            r = self.http.post("/api/v2/backfills", json=body)
            if r.status_code != 503 or "locked" not in r.text:
                break
            time.sleep(2.0)
        return self._ok(r)["id"]

    def wait_backfill(self, dag_id: str, backfill_id: int, timeout: float = 1800.0) -> dict[str, str]:
        """Wait until the backfill completes; return {logical_date: state} of its runs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            bf = self._ok(self.http.get(f"/api/v2/backfills/{backfill_id}"))
            runs = self._ok(self.http.get(f"/api/v2/dags/{dag_id}/dagRuns",
                                          params={"run_type": "backfill", "limit": 100}))["dag_runs"]
            states = {r["logical_date"][:10]: r["state"] for r in runs}
            if bf.get("completed_at") and all(s in ("success", "failed") for s in states.values()):
                return states
            time.sleep(2.0)
        raise StackError(f"backfill {backfill_id} of {dag_id} not done after {timeout:.0f}s")
