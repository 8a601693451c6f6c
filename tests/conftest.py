"""Shared fixtures and hooks: every test gets its own project root under tmp_path (never the repo's data/).
The helpers test modules share are in tests/helpers/."""

from __future__ import annotations

import os

import pytest

from tasks.config import Settings

# used below; tests/unit/test_code_hash.py and tests/unit/test_dags.py still import these two from here,
# every other module from tests.helpers.project
from tests.helpers.project import REPO, make_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("LLMOPS_ROOT", "LLMOPS_PROFILE", "LLMOPS_CONFIG_DIR", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GX_ANALYTICS_ENABLED", "false")


@pytest.fixture
def settings(tmp_path) -> Settings:
    return make_settings(tmp_path)


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
