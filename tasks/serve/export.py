"""Export a registered model version to the Triton model repository.

    llmops export --alias challenger        # or --version 3

writes, atomically, for the registered model `chat-gpt` version N:

    models/triton/chat-gpt/config.pbtxt          Python backend, decoupled, the engine's settings
                                                 (configs/serve.yaml: serve.triton, serve.engine)
    models/triton/chat-gpt/N/                    model.py + gpt.py + chat_template.py (the training code)
                                                 + engine.py + prefix_cache.py,
                                                 model.safetensors, config.json, tokenizer.json,
                                                 _lineage.json, export.json
    models/triton/chat-gpt/aliases.json          {"champion": M, "challenger": N}: what the gateway routes to

A version is one Triton model version: the decoupled engine answers streaming requests (a response
per token) and, with the input `stream` false, non-streaming ones (one final response).

Versions sit side by side, so champion and challenger are served at once; versions that no alias
names any more are removed from the repository (they stay in MLflow). Triton runs with explicit
model control: `load` (re)loads a model and every version on disk through the repository API.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tasks.atomic import atomic_dir, sha256_file, write_json
from tasks.config import PROJECT_DIR, Settings
from tasks.errors import InputError
from tasks.names import check_name, check_version
from tasks.serve.repository import LEGACY_STREAM_SUFFIX, read_aliases, served_versions, write_aliases

log = logging.getLogger(__name__)

CODE = {"model.py": "tasks/serve/triton_model.py", "gpt.py": "tasks/model/gpt.py",
        "engine.py": "tasks/model/engine.py",
        "chat_template.py": "tasks/model/chat_template.py", "prefix_cache.py": "tasks/model/prefix_cache.py"}
ARTIFACTS = ("model.safetensors", "config.json", "tokenizer.json", "_lineage.json")


class ExportError(InputError):
    """The version cannot be exported as asked (no such alias, missing artifacts, not fp32)."""


def _dims(d: tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(x) for x in d) + " ]"


def config_pbtxt(settings: Settings, name: str, decoupled: bool = True) -> str:
    """The model configuration Triton reads (protobuf text format)."""
    t = settings.serve.triton
    inputs = [("messages", "TYPE_STRING", (1,), False), ("max_tokens", "TYPE_INT32", (1,), True),
              ("temperature", "TYPE_FP32", (1,), True), ("top_p", "TYPE_FP32", (1,), True),
              ("seed", "TYPE_INT64", (1,), True), ("presence_penalty", "TYPE_FP32", (1,), True),
              ("frequency_penalty", "TYPE_FP32", (1,), True), ("logit_bias", "TYPE_STRING", (1,), True),
              ("stream", "TYPE_BOOL", (1,), True), ("priority", "TYPE_INT32", (1,), True)]
    outputs = [("text", "TYPE_STRING", (1,)), ("token_ids", "TYPE_INT64", (-1,)),
               ("prompt_tokens", "TYPE_INT32", (1,)), ("completion_tokens", "TYPE_INT32", (1,)),
               ("finish_reason", "TYPE_STRING", (1,)),
               ("batch_size", "TYPE_INT32", (1,)), ("cached_tokens", "TYPE_INT32", (1,)),
               ("queue_ms", "TYPE_FP32", (1,)), ("prefill_ms", "TYPE_FP32", (1,)),
               ("decode_ms", "TYPE_FP32", (1,)),
               ("steps", "TYPE_INT32", (1,)), ("joined", "TYPE_INT32", (1,))]
    lines = [f'name: "{name}"', 'backend: "python"', f"max_batch_size: {t.max_batch_size}",
             "version_policy: { all { } }", "input ["]
    lines.append(",\n".join(f'  {{ name: "{n}" data_type: {ty} dims: {_dims(d)}'
                            f'{" optional: true" if opt else ""} }}'
                            for n, ty, d, opt in inputs))
    lines += ["]", "output ["]
    lines.append(",\n".join(f'  {{ name: "{n}" data_type: {ty} dims: {_dims(d)} }}' for n, ty, d in outputs))
    lines.append("]")
    e = settings.serve.engine
    continuous = decoupled and e.scheduler == "continuous"
    if continuous:  # the engine batches; Triton hands each request over at once
        lines.append("dynamic_batching { max_queue_delay_microseconds: 0 }")
    elif t.dynamic_batching:
        lines.append(f"dynamic_batching {{ preferred_batch_size: {_dims(t.preferred_batch_sizes)} "
                     f"max_queue_delay_microseconds: {t.max_queue_delay_us} }}")
    kind = "KIND_GPU" if t.device == "gpu" and t.gpu_instance_kind else "KIND_CPU"
    lines.append(f"instance_group [ {{ count: {t.instances} kind: {kind} }} ]")
    if decoupled:
        lines.append("model_transaction_policy { decoupled: true }")
    for key, value in (("dtype", t.dtype), ("threads_per_instance", str(t.threads_per_instance)),
                       ("device", t.device), ("prefix_cache_mb", str(t.prefix_cache_mb)),
                       ("prefix_cache_min_tokens", str(t.prefix_cache_min_tokens)),
                       ("scheduler", e.scheduler), ("max_seqs", str(e.max_seqs)),
                       ("max_batch_tokens", str(e.max_batch_tokens)),
                       ("cancel_check_ms", str(e.cancel_check_ms))):
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


def _write_config(settings: Settings, model_dir: Path, name: str) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    text = config_pbtxt(settings, name)
    target = model_dir / "config.pbtxt"
    if not target.exists() or target.read_text() != text:
        with tempfile.NamedTemporaryFile("w", dir=model_dir, delete=False, prefix=".config.") as f:
            f.write(text)
        os.replace(f.name, target)


def export_dir(settings: Settings, weights_dir: Path, name: str, version: int,
               aliases: dict[str, int] | None = None, source: dict[str, Any] | None = None,
               expected_sha256: str | None = None) -> dict[str, Any]:
    """Write version `version` of `name` from a weights directory. `expected_sha256`: the weights must
    hash to it (the registered version's `weights_sha256` tag), or nothing is written."""
    name, version = check_name(name), check_version(version)
    weights_dir = Path(weights_dir)
    sources = {f: weights_dir / f for f in ARTIFACTS}
    if not sources["tokenizer.json"].is_file() and (weights_dir / "_lineage.json").is_file():
        # a training run's final/ names its tokenizer in the lineage; a registered version carries a copy.
        # The path is data: it must lie inside the project's data directory, or it is not copied
        named = Path(json.loads((weights_dir / "_lineage.json").read_text())["tokenizer"]["path"])
        data = settings.paths.data_dir.resolve()
        if not named.resolve().is_relative_to(data):
            raise ExportError(f"{weights_dir / '_lineage.json'}: tokenizer.path {str(named)!r} lies outside "
                              f"the data directory {data}; refusing to copy it")
        sources["tokenizer.json"] = named
    for f, src in sources.items():
        if not src.is_file():
            raise ExportError(f"{weights_dir}: {f} missing ({src}); "
                              "expected trained or registered model artifacts")
    variant_file = weights_dir / "variant.json"
    if variant_file.is_file() and json.loads(variant_file.read_text()).get("variant", "fp32") != "fp32":
        raise ExportError(f"{weights_dir}: only fp32 versions are exported to Triton (this one is "
                          f"{json.loads(variant_file.read_text())['variant']}); export its parent version")
    repo = settings.paths.triton_repository
    lineage = json.loads((weights_dir / "_lineage.json").read_text())
    weights_sha = sha256_file(weights_dir / "model.safetensors")
    if expected_sha256 and weights_sha != expected_sha256:
        raise ExportError(f"{weights_dir / 'model.safetensors'}: sha256 {weights_sha[:12]} differs from the "
                          f"registered weights_sha256 {expected_sha256[:12]}; not exported")
    record = {"model": name, "version": version, "source": source or {"weights_dir": str(weights_dir)},
              "weights_sha256": weights_sha,
              "tokenizer_sha256": sha256_file(sources["tokenizer.json"]),
              "lineage_id": lineage.get("id"), "serve_config_hash": settings.hash("serve")}
    with atomic_dir(repo / name / str(version)) as tmp:
        for f, src in sources.items():
            shutil.copy2(src, tmp / f)
        for dest, src in CODE.items():
            shutil.copy2(PROJECT_DIR / src, tmp / dest)
        write_json(tmp / "export.json", record)
    _write_config(settings, repo / name, name)
    # the streaming twin of earlier exports (<name>-stream): one model answers both now
    shutil.rmtree(repo / (name + LEGACY_STREAM_SUFFIX), ignore_errors=True)
    if aliases is not None:
        write_aliases(repo, name, aliases)
        keep = set(aliases.values()) | {version}
        for old in served_versions(repo, name):
            if old not in keep:
                shutil.rmtree(repo / name / str(old), ignore_errors=True)
                log.info("removed version %s of %s from the repository (no alias names it); the next "
                         "load of the model unloads it from the server", old, name)
    return {**record, "repository": str(repo), "models": [name],
            "path": str(repo / name / str(version)), "versions": served_versions(repo, name),
            "aliases": read_aliases(repo, name)}


def export(settings: Settings, alias: str | None = None, version: int | None = None,
           model: str | None = None) -> dict[str, Any]:
    """Export a registered version of `tracking.registered_model` (by alias or number) from MLflow to
    the Triton model `serve.triton.model_name`; `model` names both at once (e.g. "chat-gpt-small",
    the gateway's small tier, whose registered and Triton names are the same)."""
    import mlflow

    from tasks.tracking import mlflow_client

    if (alias is None) == (version is None):
        raise ExportError("give exactly one of an alias (e.g. challenger) or a version number")
    if model is not None:
        check_name(model)
        settings = settings.model_copy(update={
            "tracking": settings.tracking.model_copy(update={"registered_model": model}),
            "serve": settings.serve.model_copy(update={"triton": settings.serve.triton.model_copy(
                update={"model_name": model})})})
    client = mlflow_client(settings)
    name = check_name(settings.tracking.registered_model)
    if alias is not None:
        check_name(alias, "alias")
        v = client.get_model_version_by_alias(name, alias)
    else:
        v = client.get_model_version(name, str(check_version(version)))
    registered = client.get_registered_model(name)
    aliases = {a: int(n) for a, n in (registered.aliases or {}).items() if a in ("champion", "challenger")}
    previous = read_aliases(settings.paths.triton_repository,
                            settings.serve.triton.model_name).get("previous")
    if previous and previous not in aliases.values():
        aliases["previous"] = previous  # the last champion stays served for a fast roll-back (blue-green)
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=v.source, dst_path=tmp,
                                                         tracking_uri=client._tracking_client.tracking_uri))
        out = export_dir(settings, local, settings.serve.triton.model_name, int(v.version), aliases=aliases,
                         source={"registered_model": name, "version": int(v.version), "alias": alias,
                                 "run_id": v.run_id, "source": v.source},
                         expected_sha256=(v.tags or {}).get("weights_sha256") or None)
    log.info("exported %s version %s to %s", name, v.version, out["path"])
    return out
