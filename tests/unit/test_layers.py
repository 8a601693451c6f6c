"""The layering is a contract checked by import-linter (`make lint`): these run it for real, on the tree as it
is and on a copy with one deliberate upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers.project import REPO

LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT_IMPORTS, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    shutil.copytree(REPO / "tasks", root / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def test_the_tree_keeps_every_contract(tmp_path):
    r = _lint(_copy(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:]
    assert "0 broken" in r.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    root = _copy(tmp_path)
    _append(root / "tasks" / "data" / "ingest.py", "from tasks.serve.repository import read_aliases  # noqa")
    r = _lint(root)
    assert r.returncode != 0
    assert "tasks.data is not allowed to import tasks.serve" in r.stdout, r.stdout[-3000:]


def test_the_model_may_not_import_the_base_and_serve_may_not_import_judge(tmp_path):
    root = _copy(tmp_path)
    _append(root / "tasks" / "model" / "gpt.py", "from tasks.config import Settings  # noqa")
    _append(root / "tasks" / "serve" / "admission.py", "from tasks.judge.metrics import bleu  # noqa")
    r = _lint(root)
    assert r.returncode != 0
    assert "tasks.model is not allowed to import tasks.config" in r.stdout, r.stdout[-3000:]
    assert "- tasks.model.gpt -> tasks.config" in " ".join(r.stdout.split()), r.stdout[-3000:]
    assert "tasks.serve is not allowed to import tasks.judge" in r.stdout, r.stdout[-3000:]


def test_an_import_circle_inside_a_package_is_refused(tmp_path):
    root = _copy(tmp_path)
    # data.partition is imported by data.ingest; importing ingest back closes a circle between siblings
    _append(root / "tasks" / "data" / "partition.py", "from tasks.data.ingest import IngestError  # noqa")
    r = _lint(root)
    assert r.returncode != 0
    assert "No import circle" in r.stdout and "BROKEN" in r.stdout, r.stdout[-3000:]
