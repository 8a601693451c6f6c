"""Shared fixtures: every test gets its own project root under tmp_path (never the repo's data/)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks.config import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("LLMOPS_ROOT", "LLMOPS_PROFILE", "LLMOPS_CONFIG_DIR"):
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
