"""The MLflow model registry: register a gated challenger with full lineage, promote, load by alias.

    llmops register [--weights DIR]      # evaluate + gate + register as `challenger` (refused if lineage
                                         # is incomplete)
    llmops promote --version 3 --reason "canary clean for 24h"

Versions of the registered model `chat-gpt` carry every lineage field as tags (seed, snapshot,
tokenizer, config, code, parent run, eval report) and point at plain artifacts: safetensors
weights, config.json, tokenizer.json, _lineage.json. Aliases `challenger` and `champion`, never
the deprecated stages. Nothing is pickled.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tasks.config import Settings
from tasks.errors import LlmopsError, VerdictError
from tasks.tracking import mlflow_client

log = logging.getLogger(__name__)

REQUIRED = ("seed", "snapshot_hash", "tokenizer.version", "tokenizer.sha256", "config_hash", "code_version",
            "parent", "mlflow_run_id", "eval_report")


class RegistryError(LlmopsError):
    """A registry request that cannot be done as asked (no reason to promote, no such version)."""


class RegistrationRefused(RegistryError, VerdictError):
    """The gate failed or the lineage is incomplete: this version may not be registered."""


def latest_weights(settings: Settings) -> Path:
    """The newest finished training run of this profile (run directories are `<profile>-<identity>`)."""
    finals = sorted(settings.paths.models_dir.glob(f"checkpoints/{settings.profile}-*/final/_SUCCESS"),
                    key=lambda p: p.stat().st_mtime)
    if not finals:
        raise RegistryError(f"no trained {settings.profile} model under "
                            f"{settings.paths.models_dir / 'checkpoints'}; run `llmops train` first")
    return finals[-1].parent


def lineage_tags(lineage: dict[str, Any], mlflow_run_id: str | None,
                 eval_report: str | None) -> dict[str, str]:
    """The version's tags; raises RegistrationRefused naming the first missing lineage field."""
    flat = {
        "seed": lineage.get("seed"), "snapshot_hash": lineage.get("snapshot_hash"),
        "tokenizer.version": (lineage.get("tokenizer") or {}).get("version"),
        "tokenizer.sha256": (lineage.get("tokenizer") or {}).get("sha256"),
        "config_hash": lineage.get("config_hash"), "code_version": lineage.get("code_version"),
        "parent": lineage.get("parent"), "mlflow_run_id": mlflow_run_id, "eval_report": eval_report,
    }
    for key in REQUIRED:
        if flat.get(key) in (None, ""):
            raise RegistrationRefused(f"registration refused: lineage field '{key}' is missing "
                                      f"(model {lineage.get('id')}); every version must be rebuildable")
    teacher = {f"teacher.{k}": str(v) for k, v in (lineage.get("teacher") or {}).items() if v is not None}
    return {k: str(v) for k, v in flat.items()} | {"weights_sha256": str(lineage.get("weights_sha256", "")),
                                                   "model_id": str(lineage.get("id"))} | teacher


def quantize_and_register(settings: Settings, weights_dir: Path | str, fp32_eval: dict[str, Any],
                          parent_version: int,
                          variants: tuple[str, ...] = ("int8", "int4")) -> dict[str, Any]:
    """Evaluate each quantized variant (int8, int4) against its fp32 parent; register each as
    `challenger-<variant>` only if it passes its own gate. r["<variant>"] holds its comparison (bytes,
    memory_ratio, speedups, deltas) plus its metrics, gate, report and registered version (or None);
    r["gate"], r["report"], r["registered"] are int8's, as before the int4 tier."""
    from tasks.judge.quantize import evaluate_variant

    out: dict[str, Any] = {}
    for variant in variants:
        q = evaluate_variant(settings, weights_dir, fp32_eval, variant)
        log_evaluation(settings, weights_dir, q, variant=variant)
        gate = {"passed": q["gate"]["passed"], "reason": q["gate"]["reason"]}
        registered = None
        if gate["passed"]:
            registered = register(settings, weights_dir, q, q["gate"], variant, parent_version,
                                  recipe=q["recipe"])
        else:
            log.warning("%s variant not registered: %s", variant, q["gate"]["reason"])
        out[variant] = {**q[variant], "metrics": q["metrics"], "gate": gate, "report": q["report"],
                        "metrics_path": q["metrics_path"], "recipe": q["recipe"], "registered": registered}
    first = out[variants[0]]
    return {**out, "gate": first["gate"], "report": first["report"], "registered": first["registered"]}


def registered_run(settings: Settings, run_id: str) -> int | None:
    """The fp32 version registered from training run `run_id` (the `model_id` lineage tag), if any."""
    client = mlflow_client(settings)
    name = settings.tracking.registered_model
    versions = [int(v.version) for v in client.search_model_versions(f"name='{name}'")
                if v.tags.get("model_id") == f"model@{run_id}" and v.tags.get("variant", "fp32") == "fp32"]
    return max(versions) if versions else None


def versions_with_weights(settings: Settings, weights_sha256: str) -> list[dict[str, Any]]:
    """The fp32 versions registered with exactly these weights (the `weights_sha256` tag), newest first,
    each {"version", "aliases", "model_id"}."""
    client = mlflow_client(settings)
    name = settings.tracking.registered_model
    try:
        found = client.search_model_versions(f"name='{name}'")
    except Exception:  # noqa: BLE001 - no registered model yet (MLflow's RestException): nothing equal
        return []
    same = [v for v in found if v.tags.get("weights_sha256") == weights_sha256
            and v.tags.get("variant", "fp32") == "fp32"]
    # search results carry no aliases: each match is read in full
    full = [client.get_model_version(name, v.version) for v in sorted(same, key=lambda v: -int(v.version))]
    return [{"version": int(v.version), "aliases": sorted(v.aliases or ()),
             "model_id": v.tags.get("model_id")} for v in full]


def training_verdict(settings: Settings, mlflow_run_id: str) -> dict[str, str] | None:
    """The fp32 gate's verdict logged on a training's MLflow run ({"gate", "reason"}), None before one."""
    tags = mlflow_client(settings).get_run(mlflow_run_id).data.tags
    if "gate.fp32" not in tags:
        return None
    return {"gate": tags["gate.fp32"], "reason": tags.get("gate.fp32.reason", "")}


def alias_tags(settings: Settings, alias: str = "champion") -> dict[str, str] | None:
    """The tags of the version an alias points at (its lineage and metrics) and its "version"; None when
    there is no registered model or no such alias yet."""
    try:
        v = mlflow_client(settings).get_model_version_by_alias(settings.tracking.registered_model, alias)
    except Exception:  # noqa: BLE001 - no registered model or no such alias yet (MLflow's RestException)
        return None
    return {**v.tags, "version": str(v.version)}


def champion_metrics(settings: Settings, alias: str = "champion") -> dict[str, float] | None:
    tags = alias_tags(settings, alias) or {}
    return {k.removeprefix("eval."): float(val) for k, val in tags.items() if k.startswith("eval.")} or None


def log_evaluation(settings: Settings, weights_dir: Path | str, evaluation: dict[str, Any],
                   variant: str = "fp32") -> str:
    """Attach the evaluation (metrics, HTML report, metrics JSON) to the training's MLflow run."""
    result = json.loads((Path(weights_dir) / "result.json").read_text())
    client = mlflow_client(settings)
    run_id = result["mlflow_run_id"]
    client.log_artifact(run_id, evaluation["report"], f"eval/{variant}")
    client.log_artifact(run_id, evaluation["metrics_path"], f"eval/{variant}")
    for k, v in evaluation["metrics"].items():
        client.log_metric(run_id, f"eval.{variant}.{k}", float(v))
    client.set_tag(run_id, f"gate.{variant}", "passed" if evaluation["gate"]["passed"] else "failed")
    client.set_tag(run_id, f"gate.{variant}.reason", evaluation["gate"]["reason"][:5000])
    return run_id


def register(settings: Settings, weights_dir: Path | str, evaluation: dict[str, Any], gate: dict[str, Any],
             variant: str = "fp32", parent_version: int | None = None,
             recipe: dict[str, Any] | None = None) -> dict[str, Any]:
    """Register a gated model version as `challenger` (a variant as `challenger-<variant>`, with the
    `recipe` that rebuilds it from the fp32 weights in variant.json, e.g. int4's group size).
    Refuses when the gate failed or lineage is incomplete."""
    weights_dir = Path(weights_dir)
    if not gate["passed"]:
        raise RegistrationRefused(f"registration refused: the gate failed: {gate['reason']}")
    lineage = json.loads((weights_dir / "_lineage.json").read_text())
    result = (json.loads((weights_dir / "result.json").read_text()) if (weights_dir / "result.json").is_file()
              else {})
    tags = lineage_tags(lineage, result.get("mlflow_run_id"), evaluation.get("report"))
    client = mlflow_client(settings)
    name = settings.tracking.registered_model
    run_id = result["mlflow_run_id"]
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "chat_model"
        pkg.mkdir()
        for f in ("model.safetensors", "config.json", "_lineage.json"):
            shutil.copyfile(weights_dir / f, pkg / f)
        shutil.copyfile(lineage["tokenizer"]["path"], pkg / "tokenizer.json")
        recipe = {**(recipe or {}), "variant": variant}
        (pkg / "variant.json").write_text(json.dumps(recipe))
        client.log_artifacts(run_id, str(pkg), f"registered/{variant}")
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(name, description="Chat GPT trained by llmops-chat",
                                       tags={"project": "llmops-chat"})
    source = f"{client.get_run(run_id).info.artifact_uri}/registered/{variant}"
    extra = {"parent_version": str(parent_version)} if parent_version is not None else {}
    version = client.create_model_version(name, source, run_id=run_id, tags={
        **tags, **extra, "variant": variant, "gate": "passed", "gate.reason": gate["reason"],
        **{f"variant.{k}": str(v) for k, v in recipe.items() if k != "variant"},
        **{f"eval.{k}": f"{v:.6g}" for k, v in evaluation["metrics"].items()}})
    alias = "challenger" if variant == "fp32" else f"challenger-{variant}"
    client.set_registered_model_alias(name, alias, version.version)
    log.info("registered %s version %s (%s) as %s", name, version.version, variant, alias)
    return {"name": name, "version": int(version.version), "alias": alias, "variant": variant,
            "source": source}


class GateFailed(RegistryError, VerdictError):
    """The evaluation did not pass the gate."""


def promote(settings: Settings, version: int, reason: str, who: str | None = None) -> dict[str, Any]:
    """Point `champion` at a version, recording who, why and what it replaced."""
    if not reason.strip():
        raise RegistryError("promote needs a --reason")
    client = mlflow_client(settings)
    name = settings.tracking.registered_model
    client.get_model_version(name, str(version))  # fails clearly if it does not exist
    previous = None
    try:
        previous = client.get_model_version_by_alias(name, "champion").version
    except Exception:
        pass
    who = who or getpass.getuser()
    when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    for k, v in {"promoted_by": who, "promoted_reason": reason, "promoted_at": when,
                 "replaced_champion": str(previous)}.items():
        client.set_model_version_tag(name, str(version), k, v)
    client.set_registered_model_alias(name, "champion", str(version))
    return {"name": name, "champion": version, "previous": previous, "by": who, "reason": reason, "at": when}


def load_by_alias(settings: Settings, alias: str = "champion", dest: Path | None = None):
    """(model, tokenizer, version) of the registered version an alias points at, from MLflow's artifacts."""
    import mlflow

    from tasks.judge.evaluate import load_chat_model

    client = mlflow_client(settings)
    v = client.get_model_version_by_alias(settings.tracking.registered_model, alias)
    dest = Path(dest or tempfile.mkdtemp(prefix=f"chat-gpt-{alias}-"))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=v.source, dst_path=str(dest),
                                                     tracking_uri=client._tracking_client.tracking_uri))
    model, tok, _ = load_chat_model(local, tokenizer_path=str(local / "tokenizer.json"))
    recipe = json.loads((local / "variant.json").read_text())
    if recipe.get("variant", "fp32") != "fp32":
        from tasks.judge.quantize import apply_recipe

        model = apply_recipe(model, recipe)  # the variant is a deterministic recipe over the same weights
    return model, tok, v
