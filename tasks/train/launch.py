"""Train the GPT with DeepSpeed as real ranks, track it in MLflow, export safetensors weights.

    llmops train                                  # latest shards, resume if a checkpoint exists
    llmops train --set train.zero_stage=3 --set train.max_steps=50 --no-resume

The launcher runs the ranks as separate processes (`torchrun`, or the `deepspeed` launcher),
on CPU with gloo (DS_ACCELERATOR=cpu) or on GPUs with NCCL, streams their logs, and tails the
metrics rank 0 writes, sending them to MLflow while training runs. The run directory
models/checkpoints/<run_id>/ is keyed by the config, data and code, so an Airflow retry of the
same inputs resumes from the newest complete checkpoint. A finished run is not trained again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from tasks.atomic import atomic_dir, is_complete, sha256_file, write_json
from tasks.config import Settings, TrainConfig
from tasks.data.shard import latest_manifest
from tasks.errors import ConfigError, ServiceError
from tasks.lineage import code_hash, code_version, make_lineage
from tasks.procs import free_port
from tasks.tracking import experiment_id, mlflow_client, tracking_uri
from tasks.train.curve import read_metrics

log = logging.getLogger(__name__)


class TrainError(ServiceError):
    """A training rank failed or the launch did not complete: a retry resumes from the newest checkpoint."""


def measure_peak_flops(seconds: float = 0.5, n: int = 1024) -> float:
    """fp32 matmul FLOP/s with all cores: the denominator of MFU on this machine."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class _MetricsTail:
    """Follows metrics.jsonl and sends step rows MLflow has not seen to it, in batches."""

    def __init__(self, path: Path, client, run_id: str):
        self.path, self.client, self.run_id = path, client, run_id
        # rows already in the file were sent by the attempt that wrote them (a retry continues its run)
        self.logged = max((r["step"] for r in read_metrics(path) if "event" not in r), default=0)

    def poll(self) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        new = [r for r in read_metrics(self.path) if "event" not in r and r["step"] > self.logged]
        metrics = [Metric(k, float(v), now, r["step"]) for r in new for k, v in r.items() if k != "step"]
        for i in range(0, len(metrics), 900):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 900])
        if new:
            self.logged = max(r["step"] for r in new)


def run_identity(settings: Settings, manifest: Path | str, teacher: dict[str, Any] | None = None) -> str:
    """The training run's id, `<profile>-<hash>`: a hash of what changes the math (model and training
    config, the shards manifest, seed, the `tasks` package's source). How the global batch is split
    over ranks and micro-batches does not count, so a retry on another world size continues the same
    run. A distillation run (`teacher`: its weights' sha256, temperature and alpha count too) is
    `distill-<profile>-<hash>`."""
    t = settings.train
    ident = settings.resolved()["train"]
    ident["global_batch"] = t.micro_batch * t.grad_accum * t.world_size
    for k in ("world_size", "grad_accum", "micro_batch", "launcher", "threads_per_rank", "timeout_s",
              "peak_flops", "log_every"):
        ident.pop(k)
    parts: list[Any] = [settings.resolved()["model"], ident, sha256_file(Path(manifest)), settings.seed,
                        code_hash("model")]
    if teacher is not None:
        parts.append({k: teacher[k] for k in ("weights_sha256", "temperature", "alpha")})
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
    return f"{'distill-' if teacher is not None else ''}{settings.profile}-{key.hexdigest()[:12]}"


def read_result(settings: Settings, run_id: str) -> dict[str, Any]:
    """The result.json of a finished training run, by its run id (models/checkpoints/<run_id>/final/)."""
    final = settings.paths.models_dir / "checkpoints" / run_id / "final"
    if not is_complete(final):
        raise TrainError(f"run {run_id}: no finished weights under {final}")
    return json.loads((final / "result.json").read_text())


def train(settings: Settings, manifest: Path | str | None = None, resume: bool = True,
          teacher: dict[str, Any] | None = None, trigger: dict[str, str] | None = None) -> dict[str, Any]:
    """Train on the shards of `manifest`. With `teacher` (tasks/train/distill.py builds it: weights_dir,
    weights_sha256, temperature, alpha, and who the teacher is) the ranks distill a student from it.
    `trigger` ({"reason": ..., "drift_report": ...}: why this training runs) is tagged on the MLflow run.
    One process at a time per run: a second train of the same run (same inputs) fails at once, instead of
    sharing its directory (or, with resume=False, deleting it under the first)."""
    from tasks.atomic import Busy, file_lock

    manifest = Path(manifest) if manifest else latest_manifest(settings)
    run_id = run_identity(settings, manifest, teacher)
    lock = settings.paths.models_dir / "checkpoints" / f".{run_id}.lock"
    try:
        with file_lock(lock, wait=False, what=f"training run {run_id}"):
            return _train(settings, manifest, resume, teacher, trigger)
    except Busy as e:
        raise TrainError(f"{e}: another process trains it now; wait for it, or change the inputs") from None


def _train(settings: Settings, manifest: Path, resume: bool, teacher: dict[str, Any] | None,
           trigger: dict[str, str] | None) -> dict[str, Any]:
    import torch

    t = settings.train
    man = json.loads(manifest.read_text())
    vocab = -(-man["vocab_size"] // 64) * 64  # round up: faster matmuls, room for added tokens
    config_hash = settings.hash("model", "train")
    run_id = run_identity(settings, manifest, teacher)
    run_dir = settings.paths.models_dir / "checkpoints" / run_id
    final = run_dir / "final"
    teacher_lineage = {k: v for k, v in (teacher or {}).items() if k != "weights_dir"}
    lineage = make_lineage(
        "model", f"model@{run_id}", config_hash=config_hash, seed=settings.seed,
        parent=man["lineage"]["id"], snapshot_hash=man["snapshot_hash"],
        tokenizer={"version": man["tokenizer"]["version"], "sha256": man["tokenizer"]["sha256"],
                   "path": man["tokenizer"]["path"]},
        extra={"shards_manifest": str(manifest), **({"teacher": teacher_lineage} if teacher else {})})

    client = mlflow_client(settings)
    exp_id = experiment_id(client, settings)
    run_file = run_dir / "mlflow_run_id"
    if resume and is_complete(final):
        log.info("run %s already finished; not training again", run_id)
        done = json.loads((final / "result.json").read_text())
        for key, why in (trigger or {}).items():
            client.set_tag(done["mlflow_run_id"], f"llmops.trigger_{key}", str(why)[:4000])
        return done
    if not resume and run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if run_file.exists():  # a retry continues the same MLflow run
        mlrun_id = run_file.read_text().strip()
        client.update_run(mlrun_id, status="RUNNING")
    else:
        teacher_tags = {f"teacher.{k}": str(v) for k, v in teacher_lineage.items()}
        mlrun_id = client.create_run(exp_id, run_name=run_id, tags={
            **teacher_tags, "llmops.run_id": run_id, "llmops.stage": "distill" if teacher else "train",
            "seed": str(settings.seed),
            "snapshot_hash": man["snapshot_hash"], "tokenizer_version": man["tokenizer"]["version"],
            "tokenizer_sha256": man["tokenizer"]["sha256"], "config_hash": config_hash,
            "code_version": code_version(), "parent": man["lineage"]["id"],
            "checkpoint_path": str(run_dir / "ckpt")}).info.run_id
        run_file.write_text(mlrun_id)
        for k, v in _flatten(settings.resolved()).items():
            if not k.startswith(("paths.", "stack.", "validate.")):
                client.log_param(mlrun_id, k, str(v)[:500])
        client.log_dict(mlrun_id, settings.resolved(), "config/resolved.json")

    for key, why in (trigger or {}).items():
        client.set_tag(mlrun_id, f"llmops.trigger_{key}", str(why)[:4000])
    peak = t.peak_flops or measure_peak_flops()
    spec = {"settings": settings.resolved(), "run_dir": str(run_dir), "manifest": str(manifest),
            "resume": resume, "vocab_size": vocab, "config_hash": config_hash, "lineage": lineage,
            "peak_flops": peak, "teacher": teacher}
    write_json(run_dir / "spec.json", spec)

    on_gpu = torch.cuda.is_available()
    # the cost report's device-hours unit
    client.set_tag(mlrun_id, "llmops.device", "gpu" if on_gpu else "cpu")
    cmd = launch_command(t, run_dir / "spec.json", free_port())
    threads = t.threads_per_rank or max(1, (os.cpu_count() or 1) // t.world_size)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads), "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONWARNINGS": "ignore::FutureWarning",
           "TOKENIZERS_PARALLELISM": "false"}
    if not on_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    log.info("launching %d ranks (%s, ZeRO-%d, %s): %s", t.world_size, t.launcher, t.zero_stage,
             "NCCL" if on_gpu else "gloo", " ".join(cmd))
    tail: deque[str] = deque(maxlen=40)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=str(Path(__file__).resolve().parents[1]))

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            log.info("[ranks] %s", line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    metrics = _MetricsTail(run_dir / "metrics.jsonl", client, mlrun_id)
    deadline = time.monotonic() + t.timeout_s
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise TrainError(f"training exceeded train.timeout_s={t.timeout_s}s; ranks killed")
            metrics.poll()
            time.sleep(1.0)
    except BaseException:
        _kill(proc)
        client.set_terminated(mlrun_id, status="FAILED")
        raise
    reader.join(timeout=10)
    metrics.poll()
    if proc.returncode != 0:
        client.set_terminated(mlrun_id, status="FAILED")
        raise TrainError(f"ranks exited with status {proc.returncode}; last lines:\n" + "\n".join(tail))

    # final weights: the last complete checkpoint's consolidated fp32 weights, as safetensors
    tags = sorted(p for p in (run_dir / "ckpt").glob("step_*") if is_complete(p))
    last = tags[-1]
    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in rows if "event" not in r]
    start = [r for r in rows if r.get("event") == "start"][-1]
    measured = [r for r in steps if r["step"] > start["step"] + 1] or steps  # skip the warm-up step
    summary = {
        "final_loss": steps[-1]["loss"],
        "val_loss": next((r["val_loss"] for r in reversed(steps) if "val_loss" in r), None),
        **({"teacher_val_loss": next((r["teacher_val_loss"] for r in steps if "teacher_val_loss" in r), None),
            "kd_loss": steps[-1].get("kd_loss"), "teacher": teacher_lineage} if teacher else {}),
        "tokens_per_s": sum(r["tokens_per_s"] for r in measured) / len(measured),
        "mfu": sum(r.get("mfu", 0.0) for r in measured) / len(measured), "peak_flops": peak,
        "steps": steps[-1]["step"], "resumed_from": start["step"], "resume_mode": start["resume"],
    }
    with atomic_dir(final) as tmp:
        for name in ("model.safetensors", "config.json"):
            (tmp / name).write_bytes((last / name).read_bytes())
        write_json(tmp / "_lineage.json",
                   {**lineage, "weights_sha256": sha256_file(tmp / "model.safetensors")})
        result = {"run_id": run_id, "run_dir": str(run_dir), "weights": str(final / "model.safetensors"),
                  "mlflow_run_id": mlrun_id, "tracking_uri": tracking_uri(settings), **summary}
        write_json(tmp / "result.json", result)
    client.log_artifact(mlrun_id, str(final / "model.safetensors"), "model")
    client.log_artifact(mlrun_id, str(final / "config.json"), "model")
    client.log_artifact(mlrun_id, str(final / "_lineage.json"), "model")
    client.log_artifact(mlrun_id, str(run_dir / "metrics.jsonl"))
    for k in ("final_loss", "val_loss", "tokens_per_s", "mfu", "teacher_val_loss", "kd_loss"):
        if summary.get(k) is not None:
            client.log_metric(mlrun_id, f"summary.{k}", float(summary[k]))
    client.set_terminated(mlrun_id, status="FINISHED")
    log.info("trained %s: loss %.4f, val %.4f, %.0f tok/s, MFU %.1f%%", run_id, summary["final_loss"],
             summary["val_loss"] or float("nan"), summary["tokens_per_s"], 100 * summary["mfu"])
    return result


def read_hostfile(path: Path) -> dict[str, int]:
    """A DeepSpeed hostfile: `host slots=N` per line, `#` comments; errors name the file and line."""
    import re

    hosts: dict[str, int] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"train.hostfile {path}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9_.-]*)\s+slots=([1-9][0-9]*)", line)
        if not m:
            raise ConfigError(f"{path}:{n}: expected 'host slots=N', got {line!r}")
        if m.group(1) in hosts:
            raise ConfigError(f"{path}:{n}: host {m.group(1)} listed twice")
        hosts[m.group(1)] = int(m.group(2))
    if not hosts:
        raise ConfigError(f"{path}: no hosts")
    return hosts


def launch_command(t: TrainConfig, spec: Path, port: int) -> list[str]:
    """The ranks' launch: torchrun on this node, or the deepspeed launcher on this node or, with
    `train.hostfile`, on every host of the hostfile (DeepSpeed starts the remote ranks over ssh/pdsh)."""
    if t.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
                f"--nproc_per_node={t.world_size}", "--master_addr=127.0.0.1", f"--master_port={port}",
                "-m", "tasks.train.rank", "--spec", str(spec)]
    ds = str(Path(sys.executable).parent / "deepspeed")
    if t.hostfile is None:
        return [ds, f"--num_gpus={t.world_size}", "--master_addr=127.0.0.1", f"--master_port={port}",
                "--module", "tasks.train.rank", "--spec", str(spec)]
    hosts = read_hostfile(t.hostfile)
    short = {h: n for h, n in hosts.items() if n < t.world_size}
    if short:
        raise ConfigError(f"train.hostfile {t.hostfile}: hosts with fewer slots than "
                          f"train.world_size={t.world_size} ranks per host: {short}")
    return [ds, f"--hostfile={t.hostfile}", f"--num_nodes={len(hosts)}", f"--num_gpus={t.world_size}",
            f"--master_addr={t.master_addr}", f"--master_port={port}", "--module", "tasks.train.rank",
            "--spec", str(spec)]


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
