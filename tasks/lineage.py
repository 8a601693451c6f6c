"""Lineage: every artifact carries a manifest saying where it came from.

`_lineage.json` beside (or inside) an artifact holds the seed, the data snapshot hash, the
tokenizer version and hash, the config hash, the code version, the parent artifact id and
when it was made. From a served model one follows `parent` back to the raw data.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from tasks import __version__
from tasks.atomic import write_json
from tasks.config import PROJECT_DIR

LINEAGE_FILE = "_lineage.json"


@functools.cache
def code_version() -> str:
    """`git:<sha>[-dirty]` when run from a checkout, else the package version."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(PROJECT_DIR), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(PROJECT_DIR), "status", "--porcelain", "--untracked-files=no", "--", "tasks", "dags", "configs"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return f"git:{sha}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return f"pkg:{__version__}"


# Modules that drive, serve, watch or report, and never shape a partition, a tokenizer, shards or weights
NOT_IN_OUTPUTS = frozenset({"cli.py", "lifecycle.py", "status.py", "reports.py", "traffic.py", "stack.py", "k8s.py",
                            "autoscale.py", "cost.py", "drift.py", "rollout.py", "progress.py", "export.py"})


@functools.cache
def code_hash() -> str:
    """sha256 over the source of the `tasks` modules that make data and models (every .py by relative
    path, but NOT_IN_OUTPUTS and serve/): what a stage's output can depend on. A commit that changes
    only docs, tests, DAG wiring, the CLI or serving keeps it, so the content-hash skips survive it;
    `code_version` still says which commit made an artifact."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if rel.as_posix() in NOT_IN_OUTPUTS or rel.parts[0] == "serve":
            continue
        h.update(f"{f.relative_to(root).as_posix()}\0".encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def make_lineage(
    kind: str,
    artifact_id: str,
    *,
    config_hash: str,
    seed: int | None = None,
    parent: str | None = None,
    snapshot_hash: str | None = None,
    tokenizer: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "kind": kind,
        "id": artifact_id,
        "parent": parent,
        "seed": seed,
        "snapshot_hash": snapshot_hash,
        "tokenizer": tokenizer,
        "config_hash": config_hash,
        "code_version": code_version(),
        "code_hash": code_hash(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **(extra or {}),
    }


def write_lineage(directory: Path, record: dict[str, Any]) -> Path:
    return write_json(Path(directory) / LINEAGE_FILE, record)


def read_lineage(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / LINEAGE_FILE).read_text())
