"""docker-compose.yml, parsed (there is no Docker engine on these machines): every service, volume,
file and variable it refers to exists, secrets come only from .env, host ports are on 127.0.0.1, and
the ports and stores agree with configs/."""

from __future__ import annotations

import re

import pytest
import yaml

from tasks.config import load_settings
from tests.helpers.project import REPO


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _env_names() -> set[str]:
    lines = (REPO / ".env.example").read_text().splitlines()
    return {ln.split("=", 1)[0] for ln in lines if ln and not ln.startswith("#")}


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


def test_secrets_only_from_the_environment_and_ports_only_on_loopback(compose):
    text = (REPO / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
    assert used <= _env_names(), f"variables missing from .env.example: {used - _env_names()}"
    assert all(not ln.split("=", 1)[1] for ln in (REPO / ".env.example").read_text().splitlines()
               if "PASSWORD" in ln or "SECRET" in ln or "KEYS" in ln), ".env.example must not hold secrets"
    for name in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "AIRFLOW_JWT_SECRET", "LLMOPS_MLFLOW_ADMIN_PASSWORD"):
        assert re.search(r"\$\{" + name + r":\?", text), f"{name} must be required (${{{name}:?...}})"
    assert ".env" in (REPO / ".gitignore").read_text().split()
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), \
                f"{name} publishes {port} beyond the loopback interface"


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
        env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg://")
    assert env["MLFLOW_TRACKING_URI"] == f"http://mlflow:{s.stack.mlflow_port}"
    assert env["LLMOPS_PROFILE"].split(":-")[-1].rstrip("}") in \
        {p.stem for p in (REPO / "configs" / "profiles").glob("*.yaml")}
    prom = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"tritonserver:{t.metrics_port}", f"gateway:{s.serve.gateway.port}"}
    assert "--app-name basic-auth" in (REPO / "deploy" / "mlflow-server.sh").read_text()
    assert any(r["devices"][0]["capabilities"] == ["gpu"] for r in
               [svc["tritonserver"]["deploy"]["resources"]["reservations"]])
