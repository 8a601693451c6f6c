"""Version the clean corpus with DVC and push it to the DVC remote.

    llmops snapshot

data/ is a DVC project (initialised on first use, without git so that the stage also runs
in a bare worker); data/clean is tracked as one directory output. The snapshot id is our
sha256 over the partitions' content hashes; the DVC revision is the `.dir` md5 DVC gives the
tree. Each version's `.dvc` file is kept in data/snapshots/, so any snapshot can be brought
back by copying data/snapshots/<id>.dvcmeta to data/clean.dvc and running `dvc pull`
(or `dvc checkout`) in data/. Unchanged data makes no new version.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from tasks.atomic import atomic_file, is_complete, tree_hash, write_json
from tasks.config import Settings
from tasks.data.partition import data_lock
from tasks.errors import InputError
from tasks.lineage import LINEAGE_FILE, make_lineage

log = logging.getLogger(__name__)

DVCIGNORE = """# in-flight and backup directories of atomic writes (tasks/atomic.py)
.*.tmp-*
.*.old
snapshots/
"""


class SnapshotError(InputError):
    """No clean partitions or no such snapshot."""




def corpus_partitions(settings: Settings) -> dict[str, str]:
    """{dt: content_hash} of every complete clean partition."""
    out = {}
    for part in sorted(settings.paths.clean.glob("dt=*")):
        if not is_complete(part):
            log.warning("skipping %s: incomplete partition", part)
            continue
        out[part.name.removeprefix("dt=")] = json.loads((part / LINEAGE_FILE).read_text())["content_hash"]
    return out


def remote_url(settings: Settings) -> str:
    return settings.snapshot.remote_url or str(settings.paths.var_dir / "dvcstore")


def dvc_repo(data_dir: Path, settings: Settings):
    from dvc.repo import Repo

    if not (data_dir / ".dvc").is_dir():
        # DVC's loggers write INFO to stdout, where the CLI's JSON goes: its one line here is ours, on stderr
        dvc_init = logging.getLogger("dvc.repo.init")
        level = dvc_init.level
        # setLevel, not .level =: it clears the loggers' isEnabledFor cache
        dvc_init.setLevel(logging.WARNING)
        try:
            Repo.init(str(data_dir), no_scm=True)
        finally:
            dvc_init.setLevel(level)
        log.info("initialised a DVC project (no git) in %s", data_dir)
    (data_dir / ".dvcignore").write_text(DVCIGNORE)
    repo = Repo(str(data_dir))
    url = remote_url(settings)
    with repo.config.edit() as conf:
        conf["remote"][settings.snapshot.remote_name] = {"url": url}
        conf["core"]["remote"] = settings.snapshot.remote_name
        conf["core"]["analytics"] = False
        conf["core"]["autostage"] = False
    return repo


def snapshot(settings: Settings) -> dict[str, Any]:
    data_dir = settings.paths.data_dir
    with data_lock(settings):
        parts = corpus_partitions(settings)
        if not parts:
            raise SnapshotError(f"no complete clean partitions under {settings.paths.clean}; "
                                f"run ingest first")
        content_hash = tree_hash(parts)
        record_path = settings.paths.snapshots / f"{content_hash}.json"
        new_version = not record_path.is_file()

        repo = dvc_repo(data_dir, settings)
        try:
            repo.add(str(data_dir / "clean"))
            dvc_file = data_dir / "clean.dvc"
            dvc_meta = yaml.safe_load(dvc_file.read_text())
            rev = dvc_meta["outs"][0]["md5"]
            pushed = repo.push(remote=settings.snapshot.remote_name) if settings.snapshot.push else 0
        finally:
            repo.close()

        settings.paths.snapshots.mkdir(parents=True, exist_ok=True)
        # not named *.dvc: DVC would read every copy as a second stage tracking data/clean
        with atomic_file(settings.paths.snapshots / f"{content_hash}.dvcmeta") as tmp:
            shutil.copyfile(dvc_file, tmp)
        if new_version:
            record = make_lineage(
                "snapshot", f"snapshot@{content_hash[:12]}", config_hash=settings.hash("snapshot"),
                seed=settings.seed, snapshot_hash=content_hash,
                extra={"dvc_rev": rev, "partitions": parts, "remote": remote_url(settings),
                       "files": dvc_meta["outs"][0].get("nfiles"), "bytes": dvc_meta["outs"][0].get("size")},
            )
            write_json(record_path, record)
        write_json(settings.paths.snapshots / "latest.json", {"snapshot_hash": content_hash, "dvc_rev": rev})
    log.info("snapshot %s (dvc %s): %d partitions, new_version=%s, pushed %s files", content_hash[:12], rev,
             len(parts), new_version, pushed)
    return {"snapshot_hash": content_hash, "dvc_rev": rev, "new_version": new_version,
            "partitions": len(parts), "pushed_files": int(pushed or 0), "record": str(record_path),
            "remote": remote_url(settings)}


def load_snapshot(settings: Settings, snapshot_hash: str | None = None) -> dict[str, Any]:
    """The snapshot record (the latest when no hash is given)."""
    snaps = settings.paths.snapshots
    if snapshot_hash is None:
        latest = snaps / "latest.json"
        if not latest.is_file():
            raise SnapshotError(f"no snapshot yet ({latest} missing); run `llmops snapshot` first")
        snapshot_hash = json.loads(latest.read_text())["snapshot_hash"]
    if not snapshot_hash.isalnum():
        raise SnapshotError(f"snapshot id {snapshot_hash!r} is not a hash")
    path = snaps / f"{snapshot_hash}.json"
    if not path.is_file():
        raise SnapshotError(f"unknown snapshot {snapshot_hash}: {path} missing")
    return json.loads(path.read_text())


def rows_by_source(settings: Settings, day: str) -> dict[str, int]:
    """{source: rows} of dt=<day>'s clean partition (`requests` is the gateway's served traffic)."""
    import pyarrow.parquet as pq

    counts: dict[str, int] = {}
    for f in sorted((settings.paths.clean / f"dt={day}").glob("part-*.parquet")):
        for src in pq.read_table(f, columns=["source"]).column("source").to_pylist():
            counts[src] = counts.get(src, 0) + 1
    return dict(sorted(counts.items()))


def new_data(settings: Settings, snapshot_hash: str, base_hash: str | None) -> dict[str, Any]:
    """What snapshot `snapshot_hash` holds that snapshot `base_hash` (the champion's) does not: the days
    added, the days whose content changed, and their rows by source. `has_new` False: training on it
    learns nothing the base did not have."""
    parts = load_snapshot(settings, snapshot_hash)["partitions"]
    base = load_snapshot(settings, base_hash)["partitions"] if base_hash else {}
    added = sorted(d for d in parts if d not in base)
    changed = sorted(d for d in parts if d in base and base[d] != parts[d])
    by_source: dict[str, int] = {}
    for day in added + changed:
        for src, n in rows_by_source(settings, day).items():
            by_source[src] = by_source.get(src, 0) + n
    removed = sorted(d for d in base if d not in parts)
    if not base_hash:
        summary = f"no champion yet: all {len(parts)} days are new"
    elif not added and not changed:
        summary = f"nothing new: the champion's snapshot {base_hash[:12]} holds the same days"
    else:
        summary = (f"{len(added)} new day(s) {added}, {len(changed)} changed {changed}; rows by source "
                   f"{by_source}")
    return {"snapshot_hash": snapshot_hash, "base": base_hash, "added_days": added, "changed_days": changed,
            "removed_days": removed, "rows_by_source": dict(sorted(by_source.items())),
            "has_new": bool(added or changed), "summary": summary}
