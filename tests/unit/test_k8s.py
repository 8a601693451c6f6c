"""train.backend kubernetes: the training pod rendered from config, validated by the Kubernetes
client's models and by Airflow's KubernetesPodOperator building its request (no cluster needed)."""

from __future__ import annotations

import json
import re

import yaml

from tasks.train.k8s import as_dict, pod_name, train_pod
from tests.helpers.project import make_settings


def test_the_training_pod_asks_for_gpus_mounts_the_data_and_holds_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    s = make_settings(tmp_path, "train.backend=kubernetes", "train.kubernetes.gpus=4",
                      'train.kubernetes.node_selector={"nvidia.com/gpu.product": "H100"}',
                      'train.kubernetes.tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", '
                      '"effect": "NoSchedule"}]',
                      profile="gpt2-124m")
    pod = as_dict(train_pod(s, "/opt/llmops/data/shards/abc/manifest.json",
                            "manual__2026-11-28T06:00:00+00:00", ("train.max_steps=100",)))
    spec, c = pod["spec"], pod["spec"]["containers"][0]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", pod["metadata"]["name"]) and \
        len(pod["metadata"]["name"]) <= 63
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == "4"
    assert c["command"] == ["llmops"] and c["args"][:3] == ["train", "--profile", "gpt2-124m"]
    # the run's override wins
    assert c["args"][-4:] == ["--set", "train.world_size=4", "--set", "train.max_steps=100"]
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"} in c["env"]
    assert c["envFrom"] == [{"secretRef": {"name": "llmops-secrets"}}]
    assert spec["restartPolicy"] == "Never" and spec["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {v["name"] for v in spec["volumes"]} == {"data", "shm"}
    assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == "llmops-data"
    assert not re.search(r"(?i)password|secret_key|token", json.dumps(c["env"]))
    assert pod_name("x" * 200).startswith("chat-train-") and len(pod_name("x" * 200)) <= 63


def test_airflow_kubernetes_pod_operator_accepts_the_spec(tmp_path):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    s = make_settings(tmp_path, "train.backend=kubernetes")
    pod = train_pod(s, "m.json", "run-1")
    kubeconfig = tmp_path / "kubeconfig"  # the operator reads one to build a request; nothing is contacted
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "ctx",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u", "namespace": "llmops"}}]}))
    launch = KubernetesPodOperator(task_id="launch", namespace="llmops", full_pod_spec=pod, get_logs=True,
                                   config_file=str(kubeconfig), in_cluster=False)
    request = launch.build_pod_request_obj()
    body = as_dict(request)
    assert body["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert body["metadata"]["namespace"] == "llmops" and body["spec"]["restartPolicy"] == "Never"
