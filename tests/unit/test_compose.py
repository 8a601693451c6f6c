"""docker-compose.yml, parsed (there is no Docker engine on these machines, so `docker compose config`
cannot run): every service, volume, file and variable it refers to exists, host ports are on 127.0.0.1,
the ports and stores agree with configs/, and the hardening holds: secrets reach a service only as
files it was granted (never in an environment value or an argv), each service gets only what it
needs, one role per database, read-only mounts where a service only reads, MLflow's allowed hosts,
and one secret key, JWT secret and Fernet key for every Airflow container."""

from __future__ import annotations

import re
import subprocess
from urllib.parse import urlsplit

import pytest
import yaml

from tasks.config import load_settings
from tests.helpers.project import REPO


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _env_example() -> dict[str, str]:
    lines = (REPO / ".env.example").read_text().splitlines()
    return dict(ln.split("=", 1) for ln in lines if ln.strip() and not ln.startswith("#"))


def _env_names() -> set[str]:
    return set(_env_example())


AIRFLOW = ("airflow-init", "airflow-api-server", "airflow-scheduler", "airflow-dag-processor",
           "airflow-triggerer", "airflow-worker")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|KEYS?$|TOKEN|FERNET")
# a value that names a secret file, or a literal ${NAME} the process expands itself, is not a secret
SECRET_FILE = re.compile(r"/run/secrets/([a-z0-9_]+)")


def _granted(svc: dict) -> set[str]:
    return {g if isinstance(g, str) else g["source"] for g in svc.get("secrets", [])}


def _env(svc: dict) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        return dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def test_every_reference_is_defined(compose):
    services, volumes = compose["services"], set(compose["volumes"])
    expected = {"postgres", "redis", "airflow-init", "airflow-api-server", "airflow-scheduler",
                "airflow-dag-processor", "airflow-triggerer", "airflow-worker", "mlflow", "tritonserver",
                "gateway", "prometheus"}
    assert expected <= set(services), expected - set(services)
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        for dep, cond in (deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps)):
            assert dep in services, f"{name} depends on undefined service {dep}"
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], \
                    f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck"
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("./"):
                assert (REPO / src).exists(), f"{name} mounts missing {src}"
            else:
                assert src in volumes, f"{name} uses undeclared volume {src}"
        build = svc.get("build")
        if build:
            assert (REPO / build["context"] / build["dockerfile"]).is_file(), \
                f"{name}: no {build['dockerfile']}"
    for name in ("postgres", "redis", "airflow-api-server", "mlflow", "tritonserver", "gateway"):
        assert "healthcheck" in services[name], name


def test_secrets_only_from_env_file_and_ports_only_on_loopback(compose):
    text = "\n".join(ln for ln in (REPO / "docker-compose.yml").read_text().splitlines()
                     if not ln.lstrip().startswith("#"))
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))
    assert used <= _env_names(), f"variables missing from .env.example: {used - _env_names()}"
    example = _env_example()
    assert all(not v for k, v in example.items() if SECRET_NAME.search(k)), \
        ".env.example must not hold secrets"
    # every secret comes from a .env variable; compose interpolates no secret variable anywhere
    sources = {name: sec["environment"] for name, sec in compose["secrets"].items()}
    assert set(sources.values()) <= _env_names(), set(sources.values()) - _env_names()
    leaked = sorted(used & set(sources.values()))
    assert not leaked, \
        f"secret variables interpolated into docker-compose.yml (grant them as `secrets:` files): {leaked}"
    for name in ("POSTGRES_PASSWORD", "AIRFLOW_DB_PASSWORD", "MLFLOW_DB_PASSWORD", "MEMORY_DB_PASSWORD",
                 "REDIS_PASSWORD", "AIRFLOW_JWT_SECRET", "AIRFLOW_SECRET_KEY", "AIRFLOW_FERNET_KEY",
                 "LLMOPS_MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "LLMOPS_GATEWAY_API_KEYS"):
        assert name in sources.values(), f"{name} is not the source of any secret in docker-compose.yml"
    assert ".env" in (REPO / ".gitignore").read_text().split()
    for name, svc in compose["services"].items():
        assert "env_file" not in svc, f"{name}: env_file hands the service every variable of .env"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), \
                f"{name} publishes {port} beyond the loopback interface"


def test_no_secret_in_an_argv_or_an_environment_value(compose):
    secret_vars = {sec["environment"] for sec in compose["secrets"].values()}
    for name, svc in compose["services"].items():
        granted = _granted(svc)
        undeclared = granted - set(compose["secrets"])
        assert not undeclared, f"{name}: undeclared secrets {undeclared}"
        argv = svc.get("command", [])
        argv = " ".join(argv) if isinstance(argv, list) else str(argv)
        health = " ".join(svc.get("healthcheck", {}).get("test", []))
        for where, text in (("command", argv), ("healthcheck", health)):
            # `$${NAME}` reaches the process as the literal `${NAME}`, expanded by tasks/credentials.py
            bare = re.findall(r"(?<!\$)\$\{?([A-Z_][A-Z0-9_]*)", text)
            assert not set(bare) & secret_vars, f"{name}: {where} interpolates a secret: {bare}"
            assert not re.search(r"--requirepass|-a\s|--password|PASSWORD=\S", text), \
                f"{name}: {where} passes a password on a command line: {text}"
            for ref in re.findall(r"\$\$\{([A-Z_][A-Z0-9_]*)\}", text):
                assert f"{ref}_FILE" in _env(svc), \
                    f"{name}: {where} refers to ${{{ref}}}, but {ref}_FILE is not set"
        for key, value in _env(svc).items():
            assert not re.search(r"\$\{(" + "|".join(secret_vars) + r")\b", value), \
                f"{name}: environment {key} holds the value of a secret; grant it as a file"
            for file in SECRET_FILE.findall(value):
                assert file in granted, f"{name}: {key} reads /run/secrets/{file}, which is not granted to it"
        for file in SECRET_FILE.findall(argv + health):
            assert file in granted, f"{name}: reads /run/secrets/{file}, which is not granted to it"


def test_each_service_gets_only_its_own_secrets(compose):
    svc = compose["services"]
    # the gateway: its keys, Redis, the memory role and the log pseudonyms' key (the same for every
    # replica and restart); not Triton's admin key (it asks which versions are ready over the open
    # health API)
    assert _granted(svc["gateway"]) == {"gateway_api_keys", "redis_password", "memory_db_password",
                                        "log_pseudonym_key"}
    assert _granted(svc["memory-worker"]) == {"redis_password", "memory_db_password"}
    for name in ("gateway", "memory-worker"):
        env = _env(svc[name])
        assert not [k for k in env if k.startswith(("AIRFLOW__", "MLFLOW_", "POSTGRES_"))], (name, env)
        assert set(env) <= {"LLMOPS_ROOT", "LLMOPS_PROFILE", "LLMOPS_GATEWAY_API_KEYS_FILE",
                            "REDIS_PASSWORD_FILE", "MEMORY_DB_PASSWORD_FILE",
                            "LLMOPS_LOG_PSEUDONYM_KEY_FILE"}, (name, env)
        argv = " ".join(svc[name]["command"])
        assert "postgresql://memory:" in argv and "postgresql://airflow" not in argv, \
            f"{name} must reach the memory DB as its own role"
    assert _granted(svc["mlflow"]) == {"mlflow_db_password", "mlflow_admin_password", "mlflow_flask_secret"}
    assert not [k for k in _env(svc["mlflow"]) if k.startswith("AIRFLOW__")]
    airflow_base = {"airflow_db_password", "redis_password", "airflow_fernet_key", "airflow_secret_key",
                    "airflow_jwt_secret"}
    for name in AIRFLOW:
        # the worker runs the tasks: MLflow, and Triton's admin key for deploys (load, unload)
        extra = {"mlflow_admin_password", "triton_admin_key"} if name == "airflow-worker" else set()
        assert _granted(svc[name]) == airflow_base | extra, name
        assert not [k for k in _env(svc[name]) if k.startswith("MLFLOW_TRACKING_PASSWORD")] or extra, name
    assert _granted(svc["postgres"]) == {"postgres_password", "airflow_db_password", "mlflow_db_password",
                                         "memory_db_password"}
    assert _granted(svc["redis"]) == {"redis_password"}
    assert _granted(svc["tritonserver"]) == {"triton_admin_key"}
    assert "$$(cat /run/secrets/triton_admin_key)" in " ".join(svc["tritonserver"]["command"]) or \
        "$(cat /run/secrets/triton_admin_key)" in " ".join(svc["tritonserver"]["command"])
    assert not _granted(svc["prometheus"]), "prometheus needs no secret"
    for name, s in svc.items():   # a non-root reader needs the file to be its own
        for g in s.get("secrets", []):
            assert isinstance(g, dict) and g.get("uid") and g.get("mode") in ("0o400", 0o400, 256), (name, g)


def test_one_secret_key_jwt_secret_and_fernet_key_for_every_airflow_container(compose):
    svc = compose["services"]
    keys = ("AIRFLOW__API__SECRET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__BROKER_URL")
    seen: dict[str, set[str]] = {k: set() for k in keys}
    for name in AIRFLOW:
        env = _env(svc[name])
        for k in keys:
            assert k not in env, f"{name}: {k} as a value; Airflow reads it from a secret file via {k}_CMD"
            cmd = env.get(f"{k}_CMD")
            assert cmd and SECRET_FILE.search(cmd), f"{name}: {k}_CMD is not set to read a secret file"
            seen[k].add(cmd)
    assert all(len(v) == 1 for v in seen.values()), f"Airflow containers disagree: {seen}"
    assert "airflow_secret_key" in next(iter(seen["AIRFLOW__API__SECRET_KEY"]))
    assert "airflow_jwt_secret" in next(iter(seen["AIRFLOW__API_AUTH__JWT_SECRET"]))
    assert "airflow_fernet_key" in next(iter(seen["AIRFLOW__CORE__FERNET_KEY"]))
    assert "postgresql+psycopg://airflow:{}@postgres:5432/airflow" in next(iter(seen[
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]))


def test_secret_sh_prints_the_secret_as_airflow_needs_it(tmp_path):
    script = REPO / "deploy" / "secret.sh"
    (tmp_path / "pw").write_text("s3cr3t-hex\n")
    run = lambda *a: subprocess.run(["sh", str(script), *a], capture_output=True, text=True)  # noqa: E731
    assert run(str(tmp_path / "pw")).stdout == "s3cr3t-hex"   # no newline: Airflow uses _CMD output as it is
    assert run(str(tmp_path / "pw"), "redis://:{}@redis:6379/0").stdout == "redis://:s3cr3t-hex@redis:6379/0"
    (tmp_path / "empty").write_text("")
    for args, msg in (((str(tmp_path / "empty"),), "is empty"), ((str(tmp_path / "nope"),), "cannot read"),
                      ((str(tmp_path / "pw"), "redis://x"), "has no {}")):
        r = run(*args)
        assert r.returncode != 0 and msg in r.stderr and r.stdout == "", (args, r)


def test_one_low_privilege_role_per_database(compose):
    init = (REPO / "deploy" / "postgres-init.sh").read_text()
    for db, var in (("airflow", "af_pw"), ("mlflow", "ml_pw"), ("memory", "mem_pw")):
        role = re.search(rf"CREATE ROLE {db} (.*);", init)
        assert role, f"deploy/postgres-init.sh: no role {db}"
        assert "NOSUPERUSER" in role[1] and "NOCREATEDB" in role[1] and "NOCREATEROLE" in role[1], role[0]
        assert f":'{var}'" in role[1] and f"\\set {var} `cat /run/secrets/{db}_db_password`" in init
        assert f"CREATE DATABASE {db} OWNER {db};" in init
    assert re.search(r"REVOKE ALL ON DATABASE airflow, mlflow, memory FROM PUBLIC", init)
    assert "-v pw=" not in init and "$POSTGRES_PASSWORD" not in init   # no password in psql's argv
    pg = compose["services"]["postgres"]
    assert _env(pg).get("POSTGRES_PASSWORD_FILE") == "/run/secrets/postgres_password"
    assert "POSTGRES_USER" not in _env(pg), "the superuser is the image's postgres, used by no service"
    assert any(v.startswith("./deploy/postgres-init.sh:/docker-entrypoint-initdb.d/") and v.endswith(":ro")
               for v in pg["volumes"])
    urls = [_env(compose["services"]["airflow-scheduler"])["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD"],
            (REPO / "deploy" / "mlflow-server.sh").read_text()]
    assert "airflow:{}@postgres:5432/airflow" in urls[0]
    assert "mlflow:${db_password}@postgres:5432/mlflow" in urls[1]
    for text in str(compose), (REPO / "deploy" / "mlflow-server.sh").read_text():   # nobody as superuser
        assert "//postgres:" not in text and "postgres@postgres" not in text


def test_read_only_mounts_where_a_service_only_reads(compose):
    svc = compose["services"]

    def mounts(name: str) -> dict[str, str]:
        return {v.split(":")[0]: ("ro" if v.endswith(":ro") else "rw") for v in svc[name].get("volumes", [])}

    assert mounts("tritonserver")["llmops-models"] == "ro"
    assert mounts("gateway") == {"llmops-models": "ro", "llmops-data": "rw"}   # it writes data/requests/ only
    assert mounts("airflow-api-server") == {"airflow-logs": "ro"}
    assert mounts("airflow-worker") == {"llmops-data": "rw", "llmops-models": "rw", "llmops-reports": "rw",
                                        "airflow-logs": "rw"}
    for name in ("airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"):
        assert mounts(name) == {"airflow-logs": "rw"}, name   # no data, models or reports
    assert not mounts("memory-worker") and not mounts("airflow-init")
    for name, s in svc.items():   # files of the repository are configuration: never writable
        for v in s.get("volumes", []):
            if v.startswith("./"):
                assert v.endswith(":ro"), f"{name} mounts {v} writable"


def test_mlflow_answers_the_names_it_is_called_by(compose):
    hosts = _env(compose["services"]["mlflow"])["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    port = load_settings("tiny").stack.mlflow_port
    # MLflow compares the whole Host header, port included (mlflow/server/security_utils.py)
    uris = {_env(s).get("MLFLOW_TRACKING_URI", "") for s in compose["services"].values()} - {""}
    callers = {urlsplit(u).netloc for u in uris}
    assert callers == {f"mlflow:{port}"}
    assert callers <= set(hosts) and "mlflow" in hosts
    assert {f"localhost:{port}", f"127.0.0.1:{port}"} <= set(hosts)   # the published port, from the host
    assert "*" not in hosts


def test_ports_and_stores_agree_with_configs(compose):
    s = load_settings("tiny")
    svc = compose["services"]
    published = {name: {int(p.split(":")[-1]) for p in v.get("ports", [])} for name, v in svc.items()}
    assert s.stack.airflow_port in published["airflow-api-server"]
    assert s.stack.mlflow_port in published["mlflow"]
    assert s.serve.gateway.port in published["gateway"]
    t = s.serve.triton
    assert {t.http_port, t.grpc_port, t.metrics_port} <= published["tritonserver"]
    cmd = " ".join(svc["tritonserver"]["command"])
    assert "--model-control-mode=explicit" in cmd and f"--grpc-port={t.grpc_port}" in cmd
    assert f"tritonserver:{t.grpc_port}" in svc["gateway"]["command"]
    env = svc["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor" and \
        " redis://:{}@redis:6379/" in env["AIRFLOW__CELERY__BROKER_URL_CMD"]
    assert " postgresql+psycopg://" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD"]
    assert svc["airflow-worker"]["environment"]["MLFLOW_TRACKING_URI"] == f"http://mlflow:{s.stack.mlflow_port}"
    assert env["LLMOPS_PROFILE"].split(":-")[-1].rstrip("}") in \
        {p.stem for p in (REPO / "configs" / "profiles").glob("*.yaml")}
    prom = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"tritonserver:{t.metrics_port}", f"gateway:{s.serve.gateway.port}"}
    assert "--app-name basic-auth" in (REPO / "deploy" / "mlflow-server.sh").read_text()
    assert any(r["devices"][0]["capabilities"] == ["gpu"] for r in
               [svc["tritonserver"]["deploy"]["resources"]["reservations"]])
