"""The locks that keep concurrent stages apart: one data lock for ingest's publication, snapshot and
shard; one training lock per run."""

import subprocess
import sys
import time

import pytest

from tasks.atomic import Busy, file_lock
from tasks.data.ingest import ingest
from tasks.data.synth import synth
from tasks.train.launch import TrainError, run_identity, train
from tests.helpers.project import make_settings

HOLD = """import fcntl, sys, time
f = open(sys.argv[1], "a")
fcntl.flock(f, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[2]))"""


def _hold(path, seconds):
    """Another process holding the lock at `path` for `seconds`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_file_lock_waits_or_refuses(tmp_path):
    lock = tmp_path / "x.lock"
    p = _hold(lock, 1.0)
    with pytest.raises(Busy, match="the thing is held by another process"), \
            file_lock(lock, wait=False, what="the thing"):
        pass
    t0 = time.monotonic()
    with file_lock(lock):  # waits for the holder
        assert time.monotonic() - t0 > 0.5
    p.wait()


def test_ingest_publishes_a_day_only_when_no_snapshot_or_shard_reads_data(tmp_path):
    s = make_settings(tmp_path)
    synth(s, days=1, start="2026-11-01", records=30, faults=False, chatterbot=False)
    p = _hold(s.paths.data_dir / ".data.lock", 2.0)  # a snapshot (or shard) under way
    t0 = time.monotonic()
    out = ingest("2026-11-01", s)
    assert time.monotonic() - t0 > 1.5 and out["content_hash"] and out["parts"]  # waited, then published
    p.wait()


def test_a_second_training_of_the_same_run_fails_at_once(tmp_path):
    s = make_settings(tmp_path)
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    run_id = run_identity(s, manifest)
    p = _hold(s.paths.models_dir / "checkpoints" / f".{run_id}.lock", 30.0)  # the first training
    try:
        t0 = time.monotonic()
        with pytest.raises(TrainError, match=f"training run {run_id} is held by another process"):
            train(s, manifest, resume=False)  # would have deleted the first one's directory
        assert time.monotonic() - t0 < 5
    finally:
        p.kill()
