"""Shared fixtures: every test gets its own project root under tmp_path (never the repo's data/)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks.config import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("LLMOPS_ROOT", "LLMOPS_PROFILE", "LLMOPS_CONFIG_DIR", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GX_ANALYTICS_ENABLED", "false")


def make_settings(root: Path, *overrides: str, profile: str = "tiny") -> Settings:
    return load_settings(profile, [f"paths.root={root}", *overrides])


@pytest.fixture
def settings(tmp_path) -> Settings:
    return make_settings(tmp_path)


def write_raw(settings: Settings, day: str, lines: list[bytes | str], source: str = "app", name: str = "chats.jsonl") -> Path:
    path = settings.paths.raw / source / f"dt={day}" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return path


def pytest_collection_modifyitems(config, items):
    if os.environ.get("LLMOPS_SKIP_SLOW"):
        skip = pytest.mark.skip(reason="LLMOPS_SKIP_SLOW is set")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory):
    """A private AIRFLOW_HOME with a migrated SQLite DB, set before airflow is first imported."""
    import subprocess
    import sys

    home = tmp_path_factory.mktemp("airflow_home")
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
    }
    if "airflow.configuration" in sys.modules:
        raise RuntimeError("airflow was imported before the airflow_home fixture ran")
    os.environ.update(env)
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True,
                   env={**os.environ, **env})
    return home
