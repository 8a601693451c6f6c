"""Distillation: a smaller student GPT trained with DeepSpeed on the teacher's shards against its logits.

    llmops distill                                   # teacher chat-gpt@champion -> student chat-gpt-small
    llmops distill --teacher-version 3 --set distill.alpha=0.7 --set distill.temperature=4
    llmops distill --teacher models/checkpoints/<run>/final --no-register

The student is the `distill` section's shape (fewer layers, a narrower residual stream) with the
teacher's tokenizer, block size and position kind. Its ranks are the training's own (tasks/train/launch.py,
tasks/train/rank.py: same launcher, ZeRO stage, sampler, checkpoints and resume); each step adds
the frozen teacher's forward pass on the same windows and minimises

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

(Hinton et al. 2015). The teacher's logits are computed on the fly rather than cached: a (B, T, V)
float tensor per window would be ~V/8 times the shards' size on disk, and the teacher is a few
times the student's size, so recomputing costs less than reading it back. The validation loss of
the teacher on the student's own validation windows is logged beside the student's, so the gap
between them is read off one curve.

The student is evaluated by the same suite and gate (against the small tier's own champion) and
registered as `distill.registered_model` (`chat-gpt-small`) with its lineage naming the teacher:
registered model, version, model id and weights sha256.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tasks.atomic import atomic_dir, is_complete, sha256_file
from tasks.config import Settings
from tasks.data.shard import latest_manifest
from tasks.errors import InputError
from tasks.tracking import mlflow_client
from tasks.train.launch import train

log = logging.getLogger(__name__)


class DistillError(InputError):
    """No teacher to distill from, or one that does not fit the shards."""


def resolve_teacher(settings: Settings, weights_dir: Path | str | None = None, version: int | None = None,
                    alias: str | None = None) -> dict[str, Any]:
    """Who teaches: a weights directory, or a registered fp32 version of `tracking.registered_model`
    (by number, else by `alias`, else `distill.teacher_alias`), downloaded once into var/teachers/."""
    if weights_dir is not None:
        d = Path(weights_dir)
        if not (d / "model.safetensors").is_file() or not (d / "_lineage.json").is_file():
            raise DistillError(f"teacher {d}: expected a trained model directory (model.safetensors, "
                               "config.json, _lineage.json), e.g. models/checkpoints/<run>/final")
        lineage = json.loads((d / "_lineage.json").read_text())
        return {"weights_dir": str(d), "weights_sha256": sha256_file(d / "model.safetensors"),
                "model_id": lineage["id"], "registered_model": None, "version": None, "alias": None}

    import mlflow

    from tasks.names import check_name, check_version

    client = mlflow_client(settings)
    name = check_name(settings.tracking.registered_model)
    if version is not None:
        v = client.get_model_version(name, str(check_version(version)))
    else:
        alias = check_name(alias or settings.distill.teacher_alias, "alias")
        try:
            v = client.get_model_version_by_alias(name, alias)
        except Exception as e:  # MLflow raises a bare RestException for a missing alias
            raise DistillError(f"no teacher: {name} has no version with the alias '{alias}' ({e}); "
                               "give --teacher-version or --teacher DIR") from None
    if v.tags.get("variant", "fp32") != "fp32":
        raise DistillError(f"teacher {name} version {v.version} is the {v.tags['variant']} variant; "
                           "distill from an fp32 version")
    dest = settings.paths.var_dir / "teachers" / f"{name}-v{int(v.version)}"
    if not is_complete(dest):
        with atomic_dir(dest) as tmp:
            mlflow.artifacts.download_artifacts(artifact_uri=v.source, dst_path=str(tmp),
                                                tracking_uri=client._tracking_client.tracking_uri)
            for f in (tmp / Path(v.source).name).iterdir():  # flatten <source basename>/ into the directory
                f.rename(tmp / f.name)
    weights_sha = sha256_file(dest / "model.safetensors")
    if v.tags.get("weights_sha256") and v.tags["weights_sha256"] != weights_sha:
        raise DistillError(f"teacher {name} version {v.version}: downloaded weights sha256 "
                           f"{weights_sha[:12]} differ from the registered {v.tags['weights_sha256'][:12]}")
    return {"weights_dir": str(dest), "weights_sha256": weights_sha, "model_id": v.tags.get("model_id"),
            "registered_model": name, "version": int(v.version), "alias": alias if version is None else None}


def student_settings(settings: Settings, teacher_dir: Path | str) -> Settings:
    """The settings the student trains, evaluates and registers with: the student's shape, the teacher's
    block size and positions, `distill.max_steps` and `distill.lr`, and `distill.registered_model` as the
    registered model."""
    d = settings.distill
    teacher_model = json.loads((Path(teacher_dir) / "config.json").read_text())["model"]
    resolved = settings.resolved()
    resolved["model"] = {**resolved["model"], "n_layer": d.n_layer, "n_head": d.n_head, "d_model": d.d_model,
                         "block_size": teacher_model["block_size"], "pos": teacher_model["pos"]}
    if d.max_steps is not None:
        resolved["train"]["max_steps"] = d.max_steps
    if d.lr is not None:
        resolved["train"]["lr"] = d.lr
    resolved["tracking"]["registered_model"] = d.registered_model
    return Settings.model_validate(resolved)


def distill(settings: Settings, teacher: dict[str, Any] | None = None, manifest: Path | str | None = None,
            resume: bool = True) -> dict[str, Any]:
    """Train the student against `teacher` (resolve_teacher's dict; default: distill.teacher_alias) on the
    teacher's own shards when they are still here, else the latest snapshot's. Returns train()'s result."""
    teacher = teacher or resolve_teacher(settings)
    t_lineage = json.loads((Path(teacher["weights_dir"]) / "_lineage.json").read_text())
    if manifest is None:
        own = Path(t_lineage.get("shards_manifest", ""))
        manifest = own if own.is_file() else latest_manifest(settings)
    man = json.loads(Path(manifest).read_text())
    if man["tokenizer"]["sha256"] != t_lineage["tokenizer"]["sha256"]:
        raise DistillError(f"shards {manifest} use tokenizer {man['tokenizer']['version']}, the teacher "
                           f"{teacher['model_id']} was trained with {t_lineage['tokenizer']['version']}: "
                           "distill on shards of the teacher's tokenizer")
    student = student_settings(settings, teacher["weights_dir"])
    d = settings.distill
    log.info("distilling %s (%d layers, d=%d) from teacher %s (%s version %s), T=%.2g, alpha=%.2g",
             d.registered_model, d.n_layer, d.d_model, teacher["model_id"], teacher["registered_model"],
             teacher["version"], d.temperature, d.alpha)
    return train(student, manifest, resume,
                 teacher={**teacher, "temperature": d.temperature, "alpha": d.alpha})
