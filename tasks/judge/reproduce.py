"""Rebuild a registered model version from its lineage alone and compare it with the registered weights.

    llmops reproduce chat-gpt@3
    llmops reproduce chat-gpt@champion
    llmops reproduce chat-gpt-small@challenger  # a distilled student: its teacher version is fetched too

What it does, in a fresh work directory (var/reproduce/<model>-v<N>-<time>/ unless --workdir names an
empty one):
1. reads the version's lineage: its tags and `_lineage.json` (seed, snapshot, tokenizer, config and code
   hashes, the teacher of a student) and its training run's resolved config (`config/resolved.json`);
2. checks the data snapshot out of the DVC remote: the snapshot's `.dvc` file (kept as
   data/snapshots/<id>.dvcmeta) becomes the work directory's data/clean.dvc and `dvc pull` brings the
   files back; every partition's content hash is then recomputed from those bytes;
3. rebuilds the tokenizer and the shards from that data with the recorded shard config;
4. trains with the recorded config, seed and world size (its own MLflow store in the work directory);
5. compares the rebuilt weights' sha256 with the registered weights' and every input with its record.

On the same hardware and world size the weights are bit-identical (the sampler is a pure function
of seed and step, ranks reduce in a fixed order, deterministic algorithms are on). When they are not,
the report names each input that differs (data snapshot, tokenizer, shards, config, code, seed,
teacher, world size, machine) so the cause is read off rather than guessed. The report is written to
reports/reproduce/ and `llmops reproduce` exits 1 unless the weights are identical. When the data that
comes back from the remote is not the recorded snapshot it stops before training (the weights could
not match) and reports that, unless --force.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tasks.atomic import sha256_file, tree_hash, write_json
from tasks.config import Settings
from tasks.tracking import mlflow_client
from tasks.train.launch import TrainError

log = logging.getLogger(__name__)


class ReproduceError(TrainError):
    pass


def parse_ref(ref: str) -> tuple[str, str]:
    """`name@version|alias` (a bare name means its champion) -> (name, version or alias), both path-safe."""
    from tasks.names import check_name, check_version

    name, _, which = ref.partition("@")
    check_name(name)
    which = which or "champion"
    if which.isdigit():
        return name, str(check_version(which))
    return name, check_name(which, "alias")


def _machine() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"device": "gpu" if gpu else "cpu", "gpu": gpu, "cpus": os.cpu_count(),
            "machine": platform.machine(), "torch": torch.__version__}


def restore_snapshot(settings: Settings, work: Settings, record: dict[str, Any]) -> dict[str, Any]:
    """Check the snapshot `record` (load_snapshot's) out of its DVC remote into `work`'s data/, then hash
    what came back."""
    from tasks.data.snapshot import dvc_repo

    snapshot_hash = record["snapshot_hash"]
    dvcmeta = settings.paths.snapshots / f"{snapshot_hash}.dvcmeta"
    if not dvcmeta.is_file():
        raise ReproduceError(f"snapshot {snapshot_hash[:12]}: {dvcmeta} missing; "
                             "its .dvc file is how DVC finds the data")
    data = work.paths.data_dir
    data.mkdir(parents=True, exist_ok=True)
    work.paths.snapshots.mkdir(parents=True, exist_ok=True)
    for f in (f"{snapshot_hash}.json", f"{snapshot_hash}.dvcmeta"):
        shutil.copyfile(settings.paths.snapshots / f, work.paths.snapshots / f)
    write_json(work.paths.snapshots / "latest.json",
               {"snapshot_hash": snapshot_hash, "dvc_rev": record["dvc_rev"]})
    shutil.copyfile(dvcmeta, data / "clean.dvc")
    repo = dvc_repo(data, work)
    try:
        repo.pull(targets=[str(data / "clean.dvc")], remote=work.snapshot.remote_name)
    finally:
        repo.close()
    # our content hashes from the bytes DVC brought back, not from the _lineage.json files it also restored
    found = {}
    for day in sorted(record["partitions"]):
        part = work.paths.clean / f"dt={day}"
        found[day] = (tree_hash({f.name: sha256_file(f) for f in sorted(part.glob("*.parquet"))})
                      if part.is_dir() else "")
    changed = sorted(d for d, h in record["partitions"].items() if found[d] != h)
    return {"snapshot_hash": tree_hash(found), "dvc_rev": record["dvc_rev"], "remote": record["remote"],
            "partitions_changed": changed}


def _work_settings(resolved: dict[str, Any], workdir: Path, remote: str) -> Settings:
    """The recorded config, re-rooted: state under the work directory, the snapshot's remote, its own
    MLflow."""
    cfg = json.loads(json.dumps(resolved))
    cfg["paths"] = {"root": str(workdir)}
    cfg["snapshot"] = {**cfg["snapshot"], "remote_url": remote, "push": False}
    cfg["tracking"] = {**cfg["tracking"], "uri": f"sqlite:///{workdir / 'var' / 'mlflow' / 'mlflow.db'}"}
    cfg["train"] = {**cfg["train"], "backend": "local"}
    (workdir / "var" / "mlflow").mkdir(parents=True, exist_ok=True)
    return Settings.model_validate(cfg)


def _row(name: str, registered: Any, rebuilt: Any, note: str = "") -> dict[str, Any]:
    return {"input": name, "registered": registered, "rebuilt": rebuilt, "same": registered == rebuilt,
            "note": note}


def reproduce(settings: Settings, ref: str, workdir: Path | str | None = None,
              force: bool = False) -> dict[str, Any]:
    """Retrain `name@version|alias` from its lineage and compare; returns (and writes) the report. When the
    data checked out of the remote is not the recorded snapshot the weights cannot match, so it stops there
    and says so, unless `force` (train anyway, e.g. to see how far apart the weights end up)."""
    import mlflow

    from tasks.data.shard import shard
    from tasks.data.snapshot import SnapshotError, load_snapshot
    from tasks.lineage import code_hash, code_version
    from tasks.train.launch import train

    name, which = parse_ref(ref)
    client = mlflow_client(settings)
    try:
        v = (client.get_model_version(name, which) if which.isdigit()
             else client.get_model_version_by_alias(name, which))
    except Exception as e:  # MLflow's RestException: no such model, version or alias
        raise ReproduceError(f"{ref}: not in the registry ({e})") from None
    version = int(v.version)
    if workdir is None:
        # a rebuild starts from nothing (no reused tokenizer, shard or checkpoint) in a directory of its own;
        # the previous rebuilds of this version go (a new name each time: MLflow keeps the engines of
        # stores it opened in this process, and a store whose file was removed under it turns read-only)
        base = settings.paths.var_dir / "reproduce"
        for old in base.glob(f"{name}-v{version}-*"):
            shutil.rmtree(old, ignore_errors=True)
        workdir = base / f"{name}-v{version}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}"
    workdir = Path(workdir)
    if workdir.exists() and any(workdir.iterdir()):
        raise ReproduceError(f"--workdir {workdir} is not empty; a rebuild starts from an empty directory")
    workdir.mkdir(parents=True, exist_ok=True)
    uri = client._tracking_client.tracking_uri
    reg_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=v.source,
                                                       dst_path=str(workdir / "registered"),
                                                       tracking_uri=uri))
    lineage = json.loads((reg_dir / "_lineage.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        resolved = json.loads(Path(mlflow.artifacts.download_artifacts(
            run_id=v.run_id, artifact_path="config/resolved.json", dst_path=tmp,
            tracking_uri=uri)).read_text())
    run_tags = client.get_run(v.run_id).data.tags
    snapshot_hash = v.tags.get("snapshot_hash") or lineage["snapshot_hash"]
    try:
        record = load_snapshot(settings, snapshot_hash)
    except SnapshotError as e:
        raise ReproduceError(f"{ref}: {e}") from None
    work = _work_settings(resolved, workdir, record["remote"])

    log.info("reproducing %s version %d: snapshot %s from %s", name, version, snapshot_hash[:12],
             record["remote"])
    data = restore_snapshot(settings, work, record)
    data_row = _row("data snapshot", snapshot_hash, data["snapshot_hash"],
                    f"partitions whose bytes differ: {data['partitions_changed']}"
                    if data["partitions_changed"] else "")
    if not data_row["same"] and not force:
        log.warning("%s version %d: the data checked out of %s is not snapshot %s (%s); not retrained", name,
                    version, record["remote"], snapshot_hash[:12], data_row["note"])
        return _report(settings, name, version, ref, workdir, [data_row],
                       sha256_file(reg_dir / "model.safetensors"), None,
                       v.tags.get("weights_sha256") or lineage.get("weights_sha256"), None)
    manifest = Path(shard(work, snapshot_hash)["manifest"])

    teacher = None
    if lineage.get("teacher"):  # a distilled student: the same teacher weights, fetched by registered version
        from tasks.train.distill import resolve_teacher

        t = lineage["teacher"]
        teacher_settings = settings.model_copy(update={"tracking": settings.tracking.model_copy(
            update={"registered_model": t["registered_model"]})})
        found = resolve_teacher(teacher_settings, version=int(t["version"])) if t.get("version") else None
        if found is None:
            raise ReproduceError(f"{ref}: its teacher {t.get('model_id')} was not a registered version; "
                                 "cannot fetch it")
        teacher = {**found, "temperature": t["temperature"], "alpha": t["alpha"]}
    result = train(work, manifest, resume=False, teacher=teacher)
    rebuilt = json.loads((Path(result["weights"]).parent / "_lineage.json").read_text())

    registered_sha = sha256_file(reg_dir / "model.safetensors")
    rebuilt_sha = sha256_file(Path(result["weights"]))
    inputs = [
        data_row,
        _row("tokenizer sha256", v.tags.get("tokenizer.sha256") or lineage["tokenizer"]["sha256"],
             rebuilt["tokenizer"]["sha256"]),
        _row("seed", str(lineage["seed"]), str(rebuilt["seed"])),
        _row("config hash", lineage["config_hash"], rebuilt["config_hash"]),
        _row("code hash", lineage.get("code_hash"), code_hash("model"),
             f"recorded at {lineage.get('code_version')}, rebuilt with {code_version()}"),
        _row("world size", resolved["train"]["world_size"], work.train.world_size),
        _row("device", run_tags.get("llmops.device"), _machine()["device"]),
    ]
    if teacher is not None:
        inputs.append(_row("teacher weights sha256", lineage["teacher"]["weights_sha256"],
                           teacher["weights_sha256"]))
    return _report(settings, name, version, ref, workdir, inputs, registered_sha, rebuilt_sha,
                   v.tags.get("weights_sha256") or lineage.get("weights_sha256"), result["run_id"])


def _report(settings: Settings, name: str, version: int, ref: str, workdir: Path,
            inputs: list[dict[str, Any]], registered_sha: str, rebuilt_sha: str | None, tag_sha: str | None,
            rebuilt_run: str | None) -> dict[str, Any]:
    report = {
        "model": name, "version": version, "ref": ref, "identical": registered_sha == rebuilt_sha,
        "retrained": rebuilt_sha is not None,
        "weights_sha256": {"registered": registered_sha, "rebuilt": rebuilt_sha, "tag": tag_sha},
        "inputs": inputs, "differs": [r["input"] for r in inputs if not r["same"]],
        "rebuilt_run": rebuilt_run, "workdir": str(workdir), "machine": _machine(),
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    stamp = report["at"].replace(":", "").replace("-", "")
    report["report"] = str(settings.paths.reports_dir / "reproduce" / f"{name}-v{version}-{stamp}.json")
    write_json(Path(report["report"]), report)
    if report["identical"]:
        log.info("%s version %d rebuilt bit for bit (weights sha256 %s)", name, version, registered_sha[:12])
    else:
        log.warning("%s version %d not rebuilt to the same weights (%s vs registered %s); "
                    "inputs that differ: %s", name, version, (rebuilt_sha or "not retrained")[:14],
                    registered_sha[:12], ", ".join(report["differs"]) or "none recorded")
    return report
