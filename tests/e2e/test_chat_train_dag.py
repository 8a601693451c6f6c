"""chat_train as a whole DAG (dag.test in-process) on real shards: 2 DeepSpeed ranks, an MLflow run,
evaluation, the gate, and a registered `challenger` version."""

import sys

import pytest

from tasks.ingest import ingest
from tasks.shard import shard
from tasks.snapshot import snapshot
from tasks.synth import synth
from tests.conftest import REPO, make_settings

pytestmark = pytest.mark.slow


def test_chat_train_dag_trains_and_tracks(airflow_home, tmp_path, monkeypatch):
    if str(REPO / "dags") not in sys.path:
        sys.path.insert(0, str(REPO / "dags"))
    from airflow.dag_processing.dagbag import DagBag

    s = make_settings(tmp_path)
    synth(s, days=1, start="2026-11-01", records=150, faults=False, chatterbot=False)
    ingest("2026-11-01", s)
    snapshot(s)
    shard(s)
    monkeypatch.setenv("LLMOPS_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    dag = DagBag(dag_folder=str(REPO / "dags" / "chat_train.py")).get_dag("chat_train")
    run = dag.test(run_conf={"max_steps": 30, "zero_stage": 1, "world_size": 2, "resume": False})
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert run.state == "success", states

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("chat-gpt").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["train.zero_stage"] == "1" and runs[0].data.params["train.max_steps"] == "30"
    assert "model/model.safetensors" in {a.path for a in client.list_artifacts(runs[0].info.run_id, "model")}
    assert len(client.get_metric_history(runs[0].info.run_id, "loss")) == 30
    # evaluate -> gate (no champion: absolute bounds) -> register
    assert states == dict.fromkeys(("check_inputs", "train", "evaluate", "gate", "register", "quantize"), "success")
    assert "eval/fp32/report.html" in {a.path for a in client.list_artifacts(runs[0].info.run_id, "eval/fp32")}
    v = client.get_model_version_by_alias("chat-gpt", "challenger")
    assert v.run_id == runs[0].info.run_id and v.tags["snapshot_hash"] == runs[0].data.tags["snapshot_hash"]
