"""Day partitions of the clean corpus: data/clean/dt=YYYY-MM-DD/part-*.parquet, complete when its
_SUCCESS marker is there. Every stage after ingest reads partitions through here."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.atomic import file_lock, is_complete
from tasks.config import Settings
from tasks.errors import InputError


class PartitionError(InputError):
    """A partition key that is not a date, or a partition that is not complete."""


def check_day(day: str) -> str:
    """A partition key must be a real YYYY-MM-DD date (it becomes a path)."""
    try:
        return (dt.date.fromisoformat(day).isoformat() if re.fullmatch(r"\d{4}-\d{2}-\d{2}", day)
                else _bad(day))
    except ValueError:
        return _bad(day)


def _bad(day: str) -> str:
    raise PartitionError(f"day {day!r}: expected a date as YYYY-MM-DD")


def read_partition(path: Path | str) -> pa.Table:
    """Read a complete clean partition (all parts) as one Arrow table."""
    path = Path(path)
    if not is_complete(path):
        raise PartitionError(f"{path}: not a complete partition (no _SUCCESS marker); re-run ingest for it")
    return pa.concat_tables([pq.read_table(p) for p in sorted(path.glob("part-*.parquet"))])


def turns_table(records: pa.Table) -> pa.Table:
    """One row per message: record_id, turn, role, content (vectorised flatten, no Python loop)."""
    msgs = records.column("messages").combine_chunks()
    flat = msgs.flatten()
    parents = pc.list_parent_indices(msgs)
    starts = np.asarray(msgs.offsets)[:-1]
    idx = np.asarray(parents)
    return pa.table({
        "record_id": records.column("record_id").take(parents),
        "turn": pa.array(np.arange(len(idx)) - starts[idx], pa.int32()),
        "role": flat.field("role"),
        "content": flat.field("content"),
    })


def data_lock(settings: Settings):
    """The one lock over data/ that ingest's publication of a clean partition, snapshot and shard take:
    a snapshot never hashes a partition being replaced, a shard never reads one (parallel backfill days
    run on one machine; DVC's own lock fails instead of waiting)."""
    return file_lock(settings.paths.data_dir / ".data.lock", what="the data lock")
