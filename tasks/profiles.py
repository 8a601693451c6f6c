"""Where the configs are and which profiles exist: cheap enough for a DAG file to ask at parse time
(no pydantic, no YAML: a directory listing)."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG_DIR = PROJECT_DIR / "configs"


def config_dir() -> Path:
    """$LLMOPS_CONFIG_DIR, else the project's configs/."""
    return Path(os.environ.get("LLMOPS_CONFIG_DIR") or DEFAULT_CONFIG_DIR)


def profile_names(directory: Path | None = None) -> list[str]:
    """The profiles a run may name: configs/profiles/<name>.yaml, tiny first."""
    names = sorted(p.stem for p in ((directory or config_dir()) / "profiles").glob("*.yaml"))
    return sorted(names, key=lambda n: n != "tiny")
