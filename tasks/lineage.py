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
            ["git", "-C", str(PROJECT_DIR), "status", "--porcelain", "--untracked-files=no", "--", "tasks",
             "dags", "configs"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return f"git:{sha}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return f"pkg:{__version__}"


TASKS_DIR = Path(__file__).resolve().parent

# What can shape an artifact, by package. A package imports only from the packages below it (the layers
# contract in pyproject.toml, checked by `make lint`), so an artifact depends on the code of the package
# that makes it and of the packages it imports, and on nothing above: serve/, judge/, loop/ and ops/ never
# enter a run id or a partition's skip check. The base modules (config, atomic, lineage, ...) shape nothing
# by their code: what a config says is in the config hash, and how a file is written does not change its
# bytes. tests/unit/test_code_hash.py checks each scope against the import graph.
SCOPES: dict[str, tuple[str, ...]] = {
    "data": ("data",),                       # an ingested partition, its validation, the snapshot
    "shards": ("data", "model"),             # the tokenizer and shards (rendered with model/chat_template)
    "model": ("data", "model", "train"),     # a training run's id and its weights
}
# the scope each lineage kind is hashed with
KIND_SCOPE = {"clean_partition": "data", "snapshot": "data", "tokenizer": "shards", "shards": "shards",
              "model": "model"}


def code_hash(scope: str = "model", root: Path | None = None) -> str:
    """sha256 over the source of the packages in SCOPES[scope] (every .py by path relative to `root`, in
    order): what an artifact of that scope can depend on. A commit that changes only docs, tests, DAG wiring,
    the CLI, serving, judging or the loop keeps it, so the content-hash skips survive it; `code_version`
    still says which commit made an artifact."""
    return _tree_hash(scope, root or TASKS_DIR)


@functools.cache
def _tree_hash(scope: str, root: Path) -> str:
    if scope not in SCOPES:
        raise KeyError(f"code_hash: unknown scope {scope!r}; one of {sorted(SCOPES)}")
    h = hashlib.sha256()
    for package in SCOPES[scope]:
        for f in sorted((root / package).rglob("*.py")):
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
        "code_hash": code_hash(KIND_SCOPE[kind]),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **(extra or {}),
    }


def write_lineage(directory: Path, record: dict[str, Any]) -> Path:
    return write_json(Path(directory) / LINEAGE_FILE, record)


def read_lineage(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / LINEAGE_FILE).read_text())
