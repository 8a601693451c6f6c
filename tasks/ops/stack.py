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
the environment variable NAME, or the file $NAME_FILE names
(postgresql+psycopg://airflow:${AIRFLOW_DB_PASSWORD}@db/airflow), read when the processes start.
An AIRFLOW__* variable already in the caller's environment never changes which database the stack
uses: the URLs come from the config alone.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from tasks import credentials
from tasks.config import PROJECT_DIR, Settings
from tasks.credentials import install_secret
from tasks.errors import ConfigError, ServiceError
from tasks.procs import (
    Component,
    alive,
    ensure_supervisor,
    spawn,
    stop_groups,
    supervision,
    supervision_lock,
    unsupervised,
    venv_bin,
    wait_http,
    watch,
)

SQLITE_CONNECT_ARGS = {"timeout": 60}  # sqlite3.connect(timeout=...): seconds to wait for a lock


class StackError(ServiceError):
    """The stack could not start, stop or be reached."""


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
        "AIRFLOW__API_AUTH__JWT_SECRET": install_secret(home / "jwt_secret"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": expand_env(st.airflow_db_url, "stack.airflow_db_url")
        or f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        # a task that died with its scheduler (its LocalExecutor worker is in the scheduler's process group,
        # which the supervisor clears before the restart) is failed, and so retried, after 90 s without a
        # heartbeat instead of 300
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "90",
        "LLMOPS_ROOT": str(settings.paths.root),
        "LLMOPS_PROFILE": settings.profile,
        "GX_ANALYTICS_ENABLED": "false",
        "MLFLOW_TRACKING_URI": f"http://{st.host}:{st.mlflow_port}",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    if env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("sqlite"):
        # every process waits up to a minute for SQLite's write lock instead of 5 s: an `airflow backfill
        # create` from a shell otherwise fails with "database is locked" while the scheduler writes
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS"] = "tasks.ops.stack.SQLITE_CONNECT_ARGS"
    if st.executor == "CeleryExecutor":
        if not st.celery_broker_url:
            raise StackError("stack.executor is CeleryExecutor but stack.celery_broker_url is empty (redis://host:6379/N)")
        env["AIRFLOW__CELERY__BROKER_URL"] = expand_env(st.celery_broker_url, "stack.celery_broker_url")
        env["AIRFLOW__CELERY__RESULT_BACKEND"] = (expand_env(st.celery_result_backend,
                                                             "stack.celery_result_backend")
                                                  or "db+" + env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
        env["AIRFLOW__CELERY__WORKER_CONCURRENCY"] = str(st.celery_concurrency)
    if st.mlflow_auth:
        env |= mlflow_credentials()
    return env


def expand_env(url: str, key: str) -> str:
    """`${NAME}` in a configured URL -> the secret NAME, from $NAME or the file $NAME_FILE names
    (tasks/credentials.py; a secret stays out of configs/)."""
    try:
        return credentials.expand_env(url, key)
    except ConfigError as e:
        raise StackError(str(e)) from None


def mlflow_credentials() -> dict[str, str]:
    """The MLflow client's basic-auth credentials: the admin, password from $LLMOPS_MLFLOW_ADMIN_PASSWORD."""
    password = credentials.secret_env("LLMOPS_MLFLOW_ADMIN_PASSWORD", "stack.mlflow_auth") or ""
    if len(password) < 12 or password == "password1234":
        raise StackError("stack.mlflow_auth is on: set LLMOPS_MLFLOW_ADMIN_PASSWORD to the MLflow admin "
                         "password (12 characters or more, not MLflow's default)")
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
                conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db),
                                                                           sql.Identifier(role)))
                created.append(f"database {db}")
    return created


def names(settings: Settings) -> list[str]:
    """The stack's processes (what `up` starts and `down` stops)."""
    extra = ["airflow-celery-worker"] if settings.stack.executor == "CeleryExecutor" else []
    return ["airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "mlflow",
            *extra]


def components(settings: Settings) -> dict[str, Component]:
    """How to start each of the stack's processes: what `up` starts and the supervisor restarts."""
    st = settings.stack
    env = airflow_env(settings)
    if st.mlflow_auth:
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(_mlflow_auth_config(settings))
        # CSRF
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = install_secret(settings.paths.var_dir / "mlflow"
                                                               / "flask_secret")
    af = venv_bin("airflow")
    mlflow_dir = settings.paths.var_dir / "mlflow"
    u = urls(settings)
    cmds = {
        "airflow-api-server": [af, "api-server", "--host", st.host, "--port", str(st.airflow_port)],
        "airflow-scheduler": [af, "scheduler", "--skip-serve-logs"],
        "airflow-dag-processor": [af, "dag-processor"],
        "airflow-triggerer": [af, "triggerer", "--skip-serve-logs"],
        "mlflow": [venv_bin("mlflow"), "server", "--host", st.host, "--port", str(st.mlflow_port),
                   "--workers", "1",
                   "--backend-store-uri", expand_env(st.mlflow_backend_uri, "stack.mlflow_backend_uri")
                   or f"sqlite:///{mlflow_dir / 'mlflow.db'}",
                   "--artifacts-destination", str(mlflow_dir / "artifacts"),
                   *(["--app-name", "basic-auth"] if st.mlflow_auth else [])],
    }
    if st.executor == "CeleryExecutor":  # task logs are read from disk on this machine: no log server
        cmds["airflow-celery-worker"] = [af, "celery", "worker", "--concurrency", str(st.celery_concurrency),
                                         "--skip-serve-logs", "--without-gossip", "--without-mingle"]
    health = {"airflow-api-server": (f"{u['airflow']}/api/v2/monitor/health",),
              "mlflow": (f"{u['mlflow']}/health",)}
    logs = settings.paths.var_dir / "log"
    # umask 077: what the servers write (the generated admin password above all) is the owner's alone
    return {n: Component(n, cmd, env, logs / f"{n}.log", settings.paths.root, health.get(n, ()), umask=0o077)
            for n, cmd in cmds.items()}


def urls(settings: Settings) -> dict[str, str]:
    st = settings.stack
    return {"airflow": f"http://{st.host}:{st.airflow_port}", "mlflow": f"http://{st.host}:{st.mlflow_port}",
            "airflow_password_file": str(airflow_home(settings)
                                         / "simple_auth_manager_passwords.json.generated")}


def up(settings: Settings, timeout: float = 180.0) -> dict[str, Any]:
    """Start what is not running, wait until Airflow and MLflow answer, and leave the supervisor watching
    (it restarts any of them that dies)."""
    logs = settings.paths.var_dir / "log"
    logs.mkdir(parents=True, exist_ok=True)
    (settings.paths.var_dir / "run").mkdir(parents=True, exist_ok=True)
    (settings.paths.var_dir / "mlflow" / "artifacts").mkdir(parents=True, exist_ok=True)
    comps = components(settings)
    env = comps["airflow-scheduler"].env
    provision_postgres(settings)
    started = []
    with supervision_lock(settings):  # the supervisor restarts nothing meanwhile
        if not any(alive(settings, n) for n in comps if n.startswith("airflow")):
            r = subprocess.run([venv_bin("airflow"), "db", "migrate"], env=env, capture_output=True,
                               text=True, timeout=300)
            if r.returncode:
                # no password in logs
                where = re.sub(r"//[^@/]*@", "//***@", env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
                raise StackError(f"airflow db migrate failed ({where}):\n{r.stderr[-2000:]}")
            # one training at a time on this machine (chat_train's `train` task runs in this pool)
            subprocess.run([venv_bin("airflow"), "pools", "set", "training", "1", "DeepSpeed training runs"],
                           env=env, check=True, capture_output=True, timeout=120)
        for name, c in comps.items():
            watch(settings, name)
            if not alive(settings, name):
                spawn(settings, c)
                started.append(name)
    ensure_supervisor(settings)
    u = urls(settings)
    wait_http(f"{u['airflow']}/api/v2/monitor/health", timeout, "Airflow api-server",
              logs / "airflow-api-server.log")
    pw = Path(u["airflow_password_file"])
    if pw.exists():  # written by an api-server started before the umask above
        pw.chmod(0o600)
    wait_http(f"{u['mlflow']}/health", timeout, "MLflow", logs / "mlflow.log")
    return {"started": started, **u}


def down(settings: Settings, grace: float = 20.0) -> dict[str, Any]:
    """Stop the stack's processes; the supervisor first, so that it does not start them again."""
    with unsupervised(settings, names(settings)):
        return {"stopped": stop_groups(settings, names(settings), grace)}


def status(settings: Settings) -> dict[str, Any]:
    return {"running": {n: bool(alive(settings, n)) for n in names(settings)}, **urls(settings),
            "supervisor": supervision(settings, names(settings))}
