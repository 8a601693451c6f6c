"""The release of a trained model: what chat_train runs around the ranks, one function per DAG task.
`llmops register`, `llmops distill --register`, `make run` and the tests compose the same functions,
so the DAG and the CLI cannot drift apart.

    check_inputs         the shards to train on (every sha256 verified), the run id they give with this
                         config, seed and code, the version already registered from that run, if any, the
                         gate's verdict if that run was trained and refused, and the data it adds to the
                         champion's
    identical_weights    the registered version whose weights these are, byte for byte: nothing to register
    evaluate_trained     the evaluation suite against the champion, attached to the training's MLflow run
    require_gate         a failed gate stops the release here (GateFailed, a verdict: no retry)
    register_evaluated   an MLflow model version, alias challenger, every lineage tag
    quantize_and_report  the int8 and int4 variants, each gated against its fp32 parent, and the tiers report
    distill_and_report   a smaller student distilled from the champion, gated and registered as its own
                         model, and the tiers report again with it

    evaluate_and_register  evaluate -> gate -> register (-> quantize + tiers report) in one call
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from tasks.config import Settings
from tasks.judge.registry import (
    GateFailed,
    RegistrationRefused,
    alias_tags,
    champion_metrics,
    log_evaluation,
    quantize_and_register,
    register,
    registered_run,
    training_verdict,
    versions_with_weights,
)

log = logging.getLogger(__name__)


def check_inputs(settings: Settings, manifest: Path | str | None = None) -> dict[str, Any]:
    """The shards to train on (default: the latest snapshot's), verified shard by shard, the training run id
    they give, and `registered`: the version already registered from that run (None: training would be
    new)."""
    from tasks.data.shard import latest_manifest, verify_shards
    from tasks.data.snapshot import new_data
    from tasks.train.launch import TrainError, read_result, run_identity

    manifest = str(manifest or latest_manifest(settings))
    m = verify_shards(Path(manifest).parent)
    run_id = run_identity(settings, manifest)
    registered = registered_run(settings, run_id)
    refused = None
    if registered is None:
        try:
            result = read_result(settings, run_id)
        except TrainError:
            result = None
        verdict = training_verdict(settings, result["mlflow_run_id"]) if result else None
        if verdict and verdict["gate"] == "failed":
            refused = verdict["reason"]
    champion = alias_tags(settings, "champion")
    data = new_data(settings, m["snapshot_hash"], champion.get("snapshot_hash") if champion else None)
    log.info("training data: snapshot %s; against the champion's: %s", m["snapshot_hash"][:12],
             data["summary"])
    return {"manifest": manifest, "snapshot_hash": m["snapshot_hash"], "tokens": m["tokens"],
            "run_id": run_id, "registered": registered, "refused": refused, "data": data}


def identical_weights(settings: Settings, weights_dir: Path | str) -> dict[str, Any] | None:
    """{"version", "aliases", "reason"} of the registered version whose weights equal these byte for byte
    (sha256); None when they are new. Registering them again would make a version that changes nothing,
    and rolling it out would judge a model against itself."""
    lineage = json.loads((Path(weights_dir) / "_lineage.json").read_text())
    sha = lineage.get("weights_sha256")
    same = versions_with_weights(settings, sha) if sha else []
    if not same:
        return None
    v = same[0]
    what = f"version {v['version']}" + (f" ({', '.join(v['aliases'])})" if v["aliases"] else "")
    return {**v, "weights_sha256": sha,
            "reason": f"the trained weights equal {settings.tracking.registered_model} {what} byte for byte "
                      f"(sha256 {sha[:12]}): no new version is registered and nothing is deployed"}


SPEED_KEYS = ("latency_p50_ms_b1", "latency_p99_ms_b1", "tokens_per_s_b1")


def speed_side_by_side(settings: Settings, weights_dir: Path | str) -> dict[str, dict[str, float]] | None:
    """Batch-1 generation latency of the champion and of these weights, timed now and interleaved prompt by
    prompt on the same held-out prompts, so both see one machine state; None without a champion. A latency
    stored with the champion was measured at another time, under another load: comparing with it gates on
    the noise of the machine, not on the model."""
    from tasks.judge import metrics as M
    from tasks.judge.evaluate import Generator, held_out, load_chat_model
    from tasks.judge.registry import load_by_alias

    try:
        with tempfile.TemporaryDirectory(prefix="champion-") as tmp:  # the weights are in memory once loaded
            champ_model, champ_tok, _ = load_by_alias(settings, "champion", Path(tmp))
    except Exception:  # noqa: BLE001 - no registered model or no champion alias yet (MLflow's RestException)
        return None
    model, tok, lineage = load_chat_model(weights_dir)
    manifest = json.loads(Path(lineage["shards_manifest"]).read_text())
    prompts = [r["prompt"] for r in held_out(settings, manifest, settings.eval.latency_requests)]
    gens = {"champion": Generator(champ_model, champ_tok, settings.eval),
            "challenger": Generator(model, tok, settings.eval)}
    for g in gens.values():
        g.model.generate([0, 1], 4, temperature=0.0)  # warm-up: the first call pays one-time costs
    for prompt in prompts:
        for g in gens.values():
            g.reply(prompt)
    out = {}
    for side, g in gens.items():
        lat = M.latency_stats(g.latencies, g.tokens)
        out[side] = dict(zip(SPEED_KEYS, (lat["p50_ms"], lat["p99_ms"], lat["tokens_per_s"]), strict=True))
    log.info("speed side by side on %d prompts: %s", len(prompts), out)
    return out


def evaluate_trained(settings: Settings, weights_dir: Path | str) -> dict[str, Any]:
    """The full suite against the champion's metrics (absolute bounds when there is none), logged to the
    training's MLflow run. The champion's quality metrics are its registered ones; its latency is timed now,
    beside these weights' (speed_side_by_side). Returns the paths the next steps read, and the verdict."""
    from tasks.judge.evaluate import evaluate

    champion = champion_metrics(settings)
    speeds = speed_side_by_side(settings, weights_dir) if champion is not None else None
    if champion is not None and speeds is not None:
        champion = {**champion, **speeds["champion"]}
    ev = evaluate(settings, weights_dir, champion, speed=speeds["challenger"] if speeds else None)
    log_evaluation(settings, weights_dir, ev)
    return {"weights_dir": str(weights_dir), "run_id": ev["run_id"], "metrics": ev["metrics"],
            "metrics_path": ev["metrics_path"], "report": ev["report"],
            "gate": ev["gate"]}


def require_gate(evaluated: dict[str, Any], what: str = "gate") -> dict[str, Any]:
    """`evaluated` when its gate passed; GateFailed with the reason and the report otherwise."""
    if not evaluated["gate"]["passed"]:
        raise GateFailed(f"{what} failed, not registered: {evaluated['gate']['reason']} "
                         f"(report {evaluated['report']})")
    return evaluated


def skip_identical(settings: Settings, weights_dir: Path | str) -> str | None:
    """chat_train's `evaluate`, first: the reason these weights are not evaluated nor registered (they equal
    a registered version's), tagged on the training's MLflow run as `llmops.not_registered`; None when
    they are new."""
    from tasks.tracking import mlflow_client

    if (same := identical_weights(settings, weights_dir)) is None:
        return None
    result = json.loads((Path(weights_dir) / "result.json").read_text())
    mlflow_client(settings).set_tag(result["mlflow_run_id"], "llmops.not_registered", same["reason"])
    log.warning("%s", same["reason"])
    return same["reason"]


def register_evaluated(settings: Settings, evaluated: dict[str, Any]) -> dict[str, Any]:
    """Register the gated fp32 weights as `challenger` with the evaluation's metrics; refused when a version
    with the same weights is registered already from another run. Registering the same run again (an
    Airflow retry of `register`) returns the version it registered the first time: no second version."""
    if (same := identical_weights(settings, evaluated["weights_dir"])) is not None:
        from tasks.tracking import mlflow_client

        result = Path(evaluated["weights_dir"]) / "result.json"
        run_id = json.loads(result.read_text()).get("mlflow_run_id") if result.is_file() else None
        name = settings.tracking.registered_model
        v = mlflow_client(settings).get_model_version(name, str(same["version"]))
        if run_id and v.run_id == run_id:
            log.info("%s version %s is this run's registration already: not registered again", name,
                     v.version)
            return {"name": name, "version": int(v.version),
                    "alias": "challenger" if "challenger" in same["aliases"] else None, "variant": "fp32",
                    "source": v.source, "already_registered": True}
        raise RegistrationRefused(same["reason"])
    ev = json.loads(Path(evaluated["metrics_path"]).read_text())
    return register(settings, evaluated["weights_dir"], ev, ev["gate"])


def quantize_and_report(settings: Settings, evaluated: dict[str, Any],
                        registered: dict[str, Any]) -> dict[str, Any]:
    """The int8 and int4 variants of the registered version, each evaluated, gated against its fp32 parent
    and registered when it passes; then the tiers report (fp32, int8, int4 side by side)."""
    from tasks.judge.tiers import tiers_report

    ev = json.loads(Path(evaluated["metrics_path"]).read_text())
    r = quantize_and_register(settings, evaluated["weights_dir"], ev, registered["version"])
    # the comparison from the evaluations' own files (each quantized one records its bytes); distill adds
    # the student
    paths = {"fp32": evaluated["metrics_path"], "int8": r["int8"]["metrics_path"],
             "int4": r["int4"]["metrics_path"]}
    tiers = tiers_report(settings, {t: json.loads(Path(p).read_text()) for t, p in paths.items()})
    return {"registered": r["registered"], "gate": r["gate"], "report": r["report"],
            "memory_ratio": r["int8"]["memory_ratio"], "speedup_b1": r["int8"]["speedup_b1"],
            "int4": {k: r["int4"][k] for k in ("registered", "memory_ratio", "speedup_b1", "report")},
            "tiers_report": tiers["report"], "tier_metrics": paths, "variants": r}


def distill_and_register(settings: Settings, teacher: dict[str, Any] | None = None,
                         manifest: Path | str | None = None, resume: bool = True) -> dict[str, Any]:
    """distill -> the same evaluation suite -> the same gate (vs the small tier's champion, or absolute
    bounds) -> registered as `distill.registered_model`, alias challenger. GateFailed otherwise."""
    from tasks.train.distill import distill, resolve_teacher, student_settings

    teacher = teacher or resolve_teacher(settings)
    trained = distill(settings, teacher, manifest, resume)
    student = student_settings(settings, teacher["weights_dir"])
    evaluated = evaluate_trained(student, Path(trained["weights"]).parent)
    out = {"trained": {k: trained.get(k) for k in ("run_id", "weights", "mlflow_run_id", "final_loss",
                                                    "val_loss", "teacher_val_loss", "kd_loss",
                                                    "tokens_per_s")},
           "teacher": {k: v for k, v in teacher.items() if k != "weights_dir"},
           "evaluation": {k: evaluated[k] for k in ("run_id", "metrics", "report", "gate", "metrics_path")}}
    require_gate(evaluated, "student gate")
    return {**out, "registered": register_evaluated(student, evaluated)}


def distill_and_report(settings: Settings, fallback_version: int | None = None,
                       tier_metrics: dict[str, str] | None = None) -> dict[str, Any]:
    """chat_train's `distill`: the teacher is `distill.teacher_alias` (the champion), else `fallback_version`
    (the version this run registered, when there is no champion yet); the tiers report again with the
    student."""
    from tasks.judge.tiers import tiers_report
    from tasks.train.distill import DistillError, resolve_teacher

    try:
        teacher = resolve_teacher(settings)
    except DistillError:
        if fallback_version is None:
            raise
        teacher = resolve_teacher(settings, version=fallback_version)
    r = distill_and_register(settings, teacher)
    paths = {**(tier_metrics or {}), "distilled": r["evaluation"]["metrics_path"]}
    tiers = tiers_report(settings, {t: json.loads(Path(p).read_text()) for t, p in paths.items()})
    return {"registered": r["registered"], "teacher": r["teacher"], "report": r["evaluation"]["report"],
            "val_loss": r["trained"]["val_loss"], "teacher_val_loss": r["trained"]["teacher_val_loss"],
            "tiers_report": tiers["report"]}


def evaluate_and_register(settings: Settings, weights_dir: Path | str, int8: bool = True) -> dict[str, Any]:
    """evaluate -> gate (vs the champion, or absolute bounds) -> register as challenger; GateFailed otherwise.
    Then (int8=True) the int8 and int4 variants, each gated against this fp32 parent, and the tiers report."""
    evaluated = require_gate(evaluate_trained(settings, weights_dir))
    registered = register_evaluated(settings, evaluated)
    out = {"evaluation": {k: evaluated[k] for k in ("run_id", "metrics", "report", "gate")},
           "registered": registered}
    if int8:
        q = quantize_and_report(settings, evaluated, registered)
        out["int8"] = q["variants"]
        out["tiers_report"] = q["tiers_report"]
    return out
