"""chat_ingest as a whole DAG (dag.test in-process): a 3-day backfill run twice gives identical hashes."""

import hashlib
import json
import sys

import pendulum
import pytest

from tasks.data.synth import synth
from tests.helpers.project import REPO, make_settings

pytestmark = pytest.mark.slow
DAYS = ["2026-11-01", "2026-11-02", "2026-11-03"]


@pytest.fixture(scope="module")
def chat_ingest(airflow_home):
    if str(REPO / "dags") not in sys.path:
        sys.path.insert(0, str(REPO / "dags"))  # as the dag-processor does for the dags bundle
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags" / "chat_ingest.py"))
    assert bag.import_errors == {}
    return bag.get_dag("chat_ingest")


def _fingerprint(settings) -> dict:
    """sha256 of every output file that must not change across re-runs."""
    root = settings.paths.data_dir
    out = {}
    for sub in ("clean", "quarantine", "shards", "tokenizers"):
        for p in sorted((root / sub).rglob("*")):
            if p.is_file():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _backfill(dag, settings, monkeypatch) -> list[dict]:
    monkeypatch.setenv("LLMOPS_ROOT", str(settings.paths.root))
    states = []
    for day in DAYS:
        # a run at D+1 00:00 covers the data interval [D, D+1): it must ingest dt=D
        run = dag.test(logical_date=pendulum.parse(day).add(days=1))
        states.append({ti.task_id: ti.state for ti in run.get_task_instances()})
        assert run.state == "success", states[-1]
    return states


def test_backfill_three_days_twice_is_identical(chat_ingest, tmp_path, monkeypatch):
    s = make_settings(tmp_path)
    synth(s, days=3, start=DAYS[0], records=80, faults=True, chatterbot=False)
    _backfill(chat_ingest, s, monkeypatch)
    # partitions are keyed by the data interval: one per logical date
    assert sorted(p.name for p in s.paths.clean.iterdir()) == [f"dt={d}" for d in DAYS]
    first = _fingerprint(s)
    latest = json.loads((s.paths.snapshots / "latest.json").read_text())

    _backfill(chat_ingest, s, monkeypatch)
    assert _fingerprint(s) == first  # byte-identical outputs
    # same snapshot, no new version
    assert json.loads((s.paths.snapshots / "latest.json").read_text()) == latest
    assert len(list(s.paths.snapshots.glob("*.json"))) == 1 + len(DAYS)  # latest.json + one version per day
    manifests = [json.loads(p.read_text()) for p in s.paths.shards.glob("*/manifest.json")]
    assert {m["snapshot_hash"] for m in manifests} == {
        json.loads(p.read_text())["snapshot_hash"] for p in s.paths.snapshots.glob("*.json")
        if p.name != "latest.json"}


def test_a_day_without_raw_input_fails_on_its_first_try_with_the_reason(chat_ingest, tmp_path, monkeypatch):
    """Missing raw files are the input's verdict, the same on a retry: ingest fails at once (what the daily
    schedule's run does for a day whose logs never landed) and does not hold the DAG through its retries."""
    s = make_settings(tmp_path)
    monkeypatch.setenv("LLMOPS_ROOT", str(s.paths.root))
    run = chat_ingest.test(run_conf={"day": "2026-11-09"})
    states = {ti.task_id: (ti.state, ti.try_number) for ti in run.get_task_instances()}
    assert run.state == "failed" and states["ingest"] == ("failed", 1), states
    assert {states[t][0] for t in ("validate", "snapshot", "shard")} == {"upstream_failed"}, states
