"""DVC versioning for real: add, push to a local remote, no new version on unchanged data, restore."""

import shutil
import subprocess
import sys
from pathlib import Path

from tasks.data.ingest import ingest
from tasks.data.snapshot import corpus_partitions, load_snapshot, snapshot
from tasks.data.synth import synth_day


def test_snapshot_versions_pushes_and_restores(settings):
    for day in ("2026-11-01", "2026-11-02"):
        synth_day(settings, day, records=40, faults=True)
    ingest("2026-11-01", settings)
    first = snapshot(settings)
    assert first["new_version"] and first["pushed_files"] > 0
    remote = Path(first["remote"])
    assert remote.is_dir() and any(p.is_file() for p in remote.rglob("*"))

    again = snapshot(settings)  # unchanged data: same version, nothing new
    assert (again["snapshot_hash"], again["dvc_rev"], again["new_version"]) == \
        (first["snapshot_hash"], first["dvc_rev"], False)
    assert again["pushed_files"] == 0

    ingest("2026-11-02", settings)
    second = snapshot(settings)
    assert second["new_version"] and second["snapshot_hash"] != first["snapshot_hash"]
    assert load_snapshot(settings)["snapshot_hash"] == second["snapshot_hash"]
    assert sorted(load_snapshot(settings, first["snapshot_hash"])["partitions"]) == ["2026-11-01"]

    # Bring the first version back from the remote alone: wipe the working copy and the cache.
    data = settings.paths.data_dir
    shutil.rmtree(settings.paths.clean)
    shutil.rmtree(data / ".dvc" / "cache")
    shutil.copyfile(settings.paths.snapshots / f"{first['snapshot_hash']}.dvcmeta", data / "clean.dvc")
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "pull", "clean.dvc"], cwd=data, check=True, capture_output=True)
    assert corpus_partitions(settings) == load_snapshot(settings, first["snapshot_hash"])["partitions"]
