"""The code hash by rule: what decides a stage's outputs (a training run id, whether a day is ingested
again) is hashed by package, from the layering, never from a hand-kept list of modules."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tasks import lineage
from tasks.data.ingest import ingest
from tasks.data.synth import synth_day
from tasks.train.launch import run_identity
from tests.helpers.project import REPO, make_settings

BASE = {"__init__", "__main__", "errors", "profiles", "config", "atomic", "credentials", "procs",
        "tracking", "names", "lineage", "progress"}


def _copy(tmp_path: Path, name: str, edit: str | None = None) -> Path:
    """A copy of tasks/ with one module edited (a comment appended: the behaviour is the same, the bytes
    are not)."""
    root = tmp_path / name / "tasks"
    shutil.copytree(REPO / "tasks", root, ignore=shutil.ignore_patterns("__pycache__"))
    if edit:
        target = root / edit
        target.write_text(target.read_text() + "\n# edited\n")
    return root


def _hashes(root: Path) -> dict[str, str]:
    return {scope: lineage.code_hash(scope, root) for scope in lineage.SCOPES}


SERVING_AND_ABOVE = ["serve/gateway/app.py", "serve/tune.py", "serve/loadgen.py", "serve/triton_model.py",
                     "ops/lifecycle.py", "ops/stack.py", "loop/rollout.py", "judge/evaluate.py",
                     "judge/tiers.py", "procs.py"]


def test_editing_serve_ops_loop_or_judge_changes_no_scope(tmp_path):
    before = _hashes(_copy(tmp_path, "before"))
    for i, rel in enumerate(SERVING_AND_ABOVE):
        assert (REPO / "tasks" / rel).is_file(), rel
        assert _hashes(_copy(tmp_path, f"e{i}", rel)) == before, f"editing {rel} changed a code hash"


def test_editing_the_model_changes_the_training_run_and_the_shards_but_not_ingest(tmp_path):
    before = _hashes(_copy(tmp_path, "before"))
    after = _hashes(_copy(tmp_path, "after", "model/gpt.py"))
    assert after["model"] != before["model"] and after["shards"] != before["shards"]
    assert after["data"] == before["data"]
    data_edit = _hashes(_copy(tmp_path, "data", "data/text.py"))
    assert all(data_edit[s] != before[s] for s in lineage.SCOPES)
    train_edit = _hashes(_copy(tmp_path, "train", "train/rank.py"))
    assert train_edit["model"] != before["model"] and train_edit["data"] == before["data"]


def test_run_ids_and_ingest_skips_follow_the_scopes(tmp_path, monkeypatch):
    """The real stages: a training run id and a re-ingest of the same raw bytes, with the tree edited."""
    s = make_settings(tmp_path / "root")
    synth_day(s, "2026-11-01", 20, False)
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"shards": []}')
    trees = {name: _copy(tmp_path, name, edit) for name, edit in
             (("base", None), ("serve", "serve/gateway/app.py"), ("ops", "ops/lifecycle.py"),
              ("gpt", "model/gpt.py"), ("ingest", "data/ingest.py"))}

    monkeypatch.setattr(lineage, "TASKS_DIR", trees["base"])
    run_id = run_identity(s, manifest)
    first = ingest("2026-11-01", s)
    assert "skipped" not in first

    for name in ("serve", "ops"):
        monkeypatch.setattr(lineage, "TASKS_DIR", trees[name])
        assert run_identity(s, manifest) == run_id, f"editing {name}/ changed the training run id"
        assert "skipped" in ingest("2026-11-01", s), f"editing {name}/ re-ingested the day"

    monkeypatch.setattr(lineage, "TASKS_DIR", trees["gpt"])
    assert run_identity(s, manifest) != run_id
    assert "skipped" in ingest("2026-11-01", s)

    monkeypatch.setattr(lineage, "TASKS_DIR", trees["ingest"])
    again = ingest("2026-11-01", s)
    assert "skipped" not in again and again["content_hash"] == first["content_hash"]


# the modules that make each scope's artifacts
MAKERS = {"tasks.data.ingest": "data", "tasks.data.validate": "data", "tasks.data.snapshot": "data",
          "tasks.data.shard": "shards", "tasks.train.launch": "model", "tasks.train.rank": "model",
          "tasks.train.distill": "model"}


@pytest.mark.parametrize("module", sorted(MAKERS))
def test_each_scope_covers_what_its_makers_import(module):
    """Everything a maker imports, directly or not, lies in its scope's packages or the base modules: a new
    import across the layers that the scope misses fails here (and `make lint` keeps the layers
    themselves)."""
    import grimp

    graph = _graph(grimp)
    scope = set(lineage.SCOPES[MAKERS[module]])
    outside = sorted(m for m in graph.find_upstream_modules(module)
                     if (m.split(".")[1] if "." in m else "__init__") not in scope | BASE)
    assert outside == [], f"{module} imports {outside}, outside its code-hash scope {sorted(scope)}"


_GRAPH = []


def _graph(grimp):
    if not _GRAPH:
        _GRAPH.append(grimp.build_graph("tasks"))
    return _GRAPH[0]


def test_every_lineage_kind_has_a_scope_and_the_base_list_is_the_base():
    assert set(lineage.KIND_SCOPE.values()) <= set(lineage.SCOPES)
    on_disk = {p.stem for p in (REPO / "tasks").glob("*.py")}
    # safety.py is a layer of its own above train (serve and judge both use the filter), not a base module
    assert on_disk == BASE | {"safety"}, \
        "a new base module: add it to BASE here and to the base layers in pyproject.toml"
    packages = {p.name for p in (REPO / "tasks").iterdir() if (p / "__init__.py").is_file()}
    assert packages == {"model", "data", "train", "judge", "serve", "loop", "ops"}
    with pytest.raises(KeyError, match="unknown scope"):
        lineage.code_hash("serve")
