"""Model tiers for real: a teacher trained on 2 DeepSpeed CPU ranks and registered in MLflow, a smaller
student distilled from its logits and registered as chat-gpt-small with the teacher in its lineage, and
`reproduce` rebuilding the teacher from its lineage (DVC snapshot, config, seed) to the same weights
hash, then naming the data snapshot as the difference once the DVC remote's copy of a partition changed."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tasks.atomic import sha256_file
from tasks.data.ingest import ingest
from tasks.data.shard import shard
from tasks.data.snapshot import remote_url, snapshot
from tasks.data.synth import synth
from tasks.judge.release import distill_and_register, evaluate_and_register
from tasks.judge.reproduce import reproduce
from tasks.serve.export import export
from tasks.tracking import mlflow_client
from tasks.train.distill import distill, resolve_teacher
from tasks.train.launch import train
from tests.helpers.project import make_settings

pytestmark = pytest.mark.slow
DAYS = ("2026-11-01", "2026-11-02")
FAST = ["model.block_size=64", "train.micro_batch=4", "train.max_steps=60", "train.checkpoint_every=30",
        "train.eval_every=20", "train.warmup_steps=5", "train.world_size=2", "train.zero_stage=2",
        "eval.reply_samples=8", "eval.max_new_tokens=8", "eval.perplexity_windows=8",
        "eval.latency_requests=4", "distill.max_steps=60"]


def _settings(root: Path, *extra: str):
    return make_settings(root, *FAST, f"tracking.uri=sqlite:///{root / 'mlflow.db'}", *extra)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> dict:
    """Version 1 of chat-gpt: trained, evaluated, gated and registered (alias challenger)."""
    root = tmp_path_factory.mktemp("tiers")
    s = _settings(root)
    synth(s, days=2, start=DAYS[0], records=150, faults=False, chatterbot=False)
    for day in DAYS:
        ingest(day, s)
    snapshot(s)
    shard(s)
    trained = train(s, resume=False)
    reg = evaluate_and_register(s, Path(trained["weights"]).parent, int8=False)
    assert reg["registered"]["version"] == 1
    return {"root": root, "trained": trained, "weights_dir": Path(trained["weights"]).parent}


def _rows(run_dir: str) -> list[dict]:
    rows = [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "event" not in r]


def test_distilled_student_approaches_its_teacher_and_registers_with_it_in_the_lineage(teacher):
    s = _settings(teacher["root"])
    t = resolve_teacher(s, alias="challenger")
    assert t["version"] == 1 and \
        t["weights_sha256"] == sha256_file(teacher["weights_dir"] / "model.safetensors")
    out = distill_and_register(s, t)

    rows = _rows(str(Path(out["trained"]["weights"]).parents[1]))
    assert [r["step"] for r in rows] == list(range(1, 61))
    # the KL term to the teacher falls as the student learns its distribution ...
    kd_first, kd_last = (sum(r["kd_loss"] for r in part) / 5 for part in (rows[:5], rows[-5:]))
    assert kd_last < 0.6 * kd_first, (kd_first, kd_last)
    # ... and the student's validation loss closes in on the teacher's, measured on the same windows
    evals = [r for r in rows if "val_loss" in r]
    assert len(evals) == 3 and all(r["teacher_val_loss"] == evals[0]["teacher_val_loss"] for r in evals)
    gaps = [r["val_loss"] - r["teacher_val_loss"] for r in evals]
    assert gaps[-1] < gaps[0], gaps
    # the same student trained on the labels alone (alpha 0) ends farther from the teacher
    ce_only = distill(_settings(teacher["root"], "distill.alpha=0"), t, resume=False)
    kd_ce_only = sum(r["kd_loss"] for r in _rows(ce_only["run_dir"])[-5:]) / 5
    assert kd_last < 0.9 * kd_ce_only, (kd_last, kd_ce_only)

    # a smaller model, evaluated by the same suite and gate, registered as its own model with its teacher
    student_cfg = json.loads((Path(out["trained"]["weights"]).parent / "config.json").read_text())["model"]
    teacher_cfg = json.loads((teacher["weights_dir"] / "config.json").read_text())["model"]
    assert (student_cfg["n_layer"], student_cfg["d_model"]) == (2, 64) and teacher_cfg["d_model"] == 128
    assert student_cfg["vocab_size"] == teacher_cfg["vocab_size"]
    assert {c["metric"] for c in out["evaluation"]["gate"]["checks"]} >= {"perplexity", "toxicity_rate"}
    assert out["registered"]["name"] == "chat-gpt-small" and out["registered"]["alias"] == "challenger"
    v = mlflow_client(s).get_model_version("chat-gpt-small", str(out["registered"]["version"]))
    assert v.tags["teacher.registered_model"] == "chat-gpt" and v.tags["teacher.version"] == "1"
    assert v.tags["teacher.weights_sha256"] == t["weights_sha256"]
    assert v.tags["teacher.model_id"] == f"model@{teacher['trained']['run_id']}"
    assert float(v.tags["eval.perplexity"]) > 0 and v.tags["snapshot_hash"]
    run = mlflow_client(s).get_run(v.run_id)
    assert run.data.tags["llmops.stage"] == "distill" and "summary.kd_loss" in run.data.metrics

    # the small tier's Triton model, exported from the registry beside (not over) the main one
    exported = export(s, alias="challenger", model="chat-gpt-small")
    small = s.paths.triton_repository / "chat-gpt-small"
    assert exported["models"] == ["chat-gpt-small"]
    assert json.loads((small / "aliases.json").read_text()) == {"challenger": out["registered"]["version"]}
    assert sha256_file(small / str(out["registered"]["version"]) / "model.safetensors") == \
        sha256_file(Path(out["trained"]["weights"]))
    assert not (s.paths.triton_repository / "chat-gpt").exists()


def test_reproduce_rebuilds_the_registered_weights_bit_for_bit(teacher):
    s = _settings(teacher["root"])
    report = reproduce(s, "chat-gpt@1")
    assert report["identical"], report
    assert report["weights_sha256"]["rebuilt"] == report["weights_sha256"]["registered"] == \
        report["weights_sha256"]["tag"]
    assert report["differs"] == [], report["inputs"]
    assert {r["input"] for r in report["inputs"]} >= {"data snapshot", "tokenizer sha256", "seed",
                                                      "config hash", "code hash", "world size"}
    # rebuilt from the DVC remote into its own directory, not from the project's data/
    work = Path(report["workdir"])
    assert (work / "data" / "clean.dvc").is_file() and \
        list((work / "data" / "clean").glob("dt=*/part-*.parquet"))
    assert Path(report["report"]).is_file()


def test_reproduce_names_a_changed_data_snapshot_as_the_difference(teacher):
    """The DVC remote's copy of one partition file is replaced by other bytes: the rebuild checks out
    different data, and the report says the data snapshot is what differs (without training: the
    weights could not match)."""
    s = _settings(teacher["root"])
    part = sorted((s.paths.clean / f"dt={DAYS[0]}").glob("part-*.parquet"))[0]
    md5 = hashlib.md5(part.read_bytes()).hexdigest()
    obj = Path(remote_url(s)) / "files" / "md5" / md5[:2] / md5[2:]
    assert obj.is_file(), sorted(Path(remote_url(s)).rglob("*"))[:10]
    saved = obj.with_name(obj.name + ".saved")
    shutil.copy2(obj, saved)
    try:
        other = sorted((s.paths.clean / f"dt={DAYS[1]}").glob("part-*.parquet"))[0]
        obj.chmod(0o644)
        shutil.copyfile(other, obj)  # a valid parquet file, other conversations
        report = reproduce(s, "chat-gpt@1")
    finally:
        obj.chmod(0o644)
        shutil.copy2(saved, obj)
        saved.unlink()
    assert not report["identical"] and not report["retrained"] and report["weights_sha256"]["rebuilt"] is None
    assert report["differs"] == ["data snapshot"], report["inputs"]
    row = report["inputs"][0]
    assert row["registered"] != row["rebuilt"] and DAYS[0] in row["note"] and DAYS[1] not in row["note"], row
    assert json.loads(Path(report["report"]).read_text())["differs"] == ["data snapshot"]
