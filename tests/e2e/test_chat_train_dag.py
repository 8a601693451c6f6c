"""chat_train as a whole DAG (dag.test in-process) on real shards: 2 DeepSpeed ranks, an MLflow run,
evaluation, the gate, and a registered `challenger` version; then chat_deploy exports that version
and loads it into a running tritonserver, its smoke task chats with it through the gateway, and its canary task promotes it (the first champion)."""

import shutil
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from tasks.ingest import ingest
from tasks.shard import shard
from tasks.snapshot import snapshot
from tasks.synth import synth
from tasks.train import free_port
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

    # chat_deploy against a real tritonserver + gateway on free ports (a config dir with those ports)
    from tasks.serve import triton
    from tasks.stack import pidfile

    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs)
    serve_cfg = yaml.safe_load((configs / "serve.yaml").read_text())
    for key in ("http_port", "grpc_port", "metrics_port"):
        serve_cfg["triton"][key] = free_port()
    serve_cfg["gateway"]["port"] = free_port()
    (configs / "serve.yaml").write_text(yaml.safe_dump(serve_cfg))
    monkeypatch.setenv("LLMOPS_CONFIG_DIR", str(configs))
    s = make_settings(tmp_path)
    tp = triton.start(s)  # an empty repository: chat_deploy puts the model in and loads it
    pidfile(s, "tritonserver").parent.mkdir(parents=True, exist_ok=True)
    pidfile(s, "tritonserver").write_text(str(tp.proc.pid))
    gw = subprocess.Popen([sys.executable, "-m", "tasks.serve.gateway"], cwd=REPO, start_new_session=True,
                          env={**__import__("os").environ, "NO_PROXY": "127.0.0.1"})
    try:
        base = f"http://127.0.0.1:{s.serve.gateway.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{base}/v1/models", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        deploy = DagBag(dag_folder=str(REPO / "dags" / "chat_deploy.py")).get_dag("chat_deploy")
        run = deploy.test(run_conf={"alias": "challenger"})
        states = {ti.task_id: ti.state for ti in run.get_task_instances()}
        assert run.state == "success", states
        smoke = next(ti for ti in run.get_task_instances() if ti.task_id == "smoke").xcom_pull(task_ids="smoke")
        assert smoke["version"] == str(v.version) and smoke["usage"]["completion_tokens"] > 0
        assert tp.http().is_model_ready("chat-gpt", str(v.version)) and tp.http().is_model_ready("chat-gpt-stream", str(v.version))
        assert (tmp_path / "models" / "triton" / "chat-gpt" / str(v.version) / "_lineage.json").is_file()
        models = httpx.get(f"{base}/v1/models").json()["data"]
        # the first model has no champion to be compared with: the canary task promotes it directly
        assert {"chat-gpt", "chat-gpt:champion"} <= {m["id"] for m in models}
        assert client.get_model_version_by_alias("chat-gpt", "champion").version == v.version
        records = list((tmp_path / "reports" / "rollout").glob(f"*-v{v.version}-promote.json"))
        assert len(records) == 1 and "first champion" in records[0].read_text()
    finally:
        triton.stop_group(gw.pid)
        tp.stop()
