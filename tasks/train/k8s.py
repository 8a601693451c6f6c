"""Training on a GPU node of a Kubernetes cluster: the pod that runs `llmops train` there.

    llmops train-pod --profile gpt2-124m          # print the pod spec (YAML) chat_train would start

With `train.backend: kubernetes`, chat_train's `train` task starts this pod with Airflow's
KubernetesPodOperator and streams its log; inside the pod the same `llmops train` runs its ranks
over the node's GPUs (NCCL). The pod asks for `train.kubernetes.gpus` nvidia.com/gpu (requests =
limits), mounts the project's data and models from a PersistentVolumeClaim, and takes its secrets
(MLflow credentials, S3 keys for the DVC remote) from a Kubernetes Secret by reference: nothing
secret is in the spec.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from tasks.config import Settings

ROOT = "/opt/llmops"


def pod_name(run_id: str) -> str:
    """A DNS-1123 pod name for a training run (at most 63 characters)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")[:40] or "run"
    return f"chat-train-{slug}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"


def tracking_uri(settings: Settings) -> str:
    """The MLflow server the pod logs to: the configured one, else this worker's (an http URI only)."""
    import os

    uri = settings.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri if uri.startswith(("http://", "https://")) else ""


def train_pod(settings: Settings, manifest: str, run_id: str, overrides: tuple[str, ...] = ()):
    """The V1Pod that trains `manifest`'s shards with this profile (overrides as `--set` key=value)."""
    from kubernetes.client import models as k

    kc = settings.train.kubernetes
    args = ["train", "--profile", settings.profile, "--manifest", manifest, "--set", "train.backend=local"]
    if kc.gpus:  # one rank per GPU of the node, unless the run says otherwise
        args += ["--set", f"train.world_size={kc.gpus}"]
    for o in overrides:
        args += ["--set", o]
    resources = {"cpu": kc.cpu, "memory": kc.memory, **({"nvidia.com/gpu": str(kc.gpus)} if kc.gpus else {})}
    container = k.V1Container(
        name="train", image=kc.image, command=["llmops"], args=args, working_dir=ROOT,
        env=[k.V1EnvVar(name="LLMOPS_ROOT", value=ROOT),
             k.V1EnvVar(name="LLMOPS_PROFILE", value=settings.profile),
             k.V1EnvVar(name="PYTHONUNBUFFERED", value="1"),
             *([k.V1EnvVar(name="MLFLOW_TRACKING_URI", value=uri)]
               if (uri := tracking_uri(settings)) else [])],
        env_from=[k.V1EnvFromSource(secret_ref=k.V1SecretEnvSource(name=kc.secrets))],
        resources=k.V1ResourceRequirements(requests=resources, limits=resources),
        volume_mounts=[k.V1VolumeMount(name="data", mount_path=f"{ROOT}/data", sub_path="data"),
                       k.V1VolumeMount(name="data", mount_path=f"{ROOT}/models", sub_path="models"),
                       k.V1VolumeMount(name="shm", mount_path="/dev/shm")],  # NCCL wants a large /dev/shm
        security_context=k.V1SecurityContext(allow_privilege_escalation=False, run_as_non_root=True))
    return k.V1Pod(
        api_version="v1", kind="Pod",
        metadata=k.V1ObjectMeta(name=pod_name(run_id), namespace=kc.namespace,
                                labels={"app.kubernetes.io/name": "llmops-chat",
                                        "app.kubernetes.io/component": "train"}),
        spec=k.V1PodSpec(
            containers=[container], restart_policy="Never", node_selector=dict(kc.node_selector) or None,
            tolerations=[k.V1Toleration(**t) for t in kc.tolerations] or None,
            service_account_name=kc.service_account or None,
            volumes=[k.V1Volume(name="data", persistent_volume_claim=k.V1PersistentVolumeClaimVolumeSource(
                         claim_name=kc.data_pvc)),
                     k.V1Volume(name="shm", empty_dir=k.V1EmptyDirVolumeSource(medium="Memory"))]))


def as_dict(pod) -> dict[str, Any]:
    """The pod as the JSON the API server receives."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(pod)
