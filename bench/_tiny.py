"""The tiny model the evaluation benchmarks measure: synthetic days plus chatterbot, ingested,
snapshotted, sharded and trained on one rank (ZeRO-0) for `steps` steps in a temporary root."""

from __future__ import annotations

from pathlib import Path

from tasks.config import Settings, load_settings
from tasks.data.ingest import ingest
from tasks.data.shard import shard
from tasks.data.snapshot import snapshot
from tasks.data.synth import synth
from tasks.train.launch import train


def train_tiny(root: Path, steps: int) -> tuple[Settings, Path]:
    """(settings rooted at `root`, the trained weights directory)."""
    s = load_settings("tiny", [f"paths.root={root}", "train.world_size=1", "train.zero_stage=0",
                               f"train.max_steps={steps}", f"train.checkpoint_every={steps}"])
    synth(s, days=2, start="2026-11-01", records=400, faults=False, chatterbot=True)
    for day in ("2026-11-01", "2026-11-02"):
        ingest(day, s)
    snapshot(s)
    shard(s)
    return s, Path(train(s, resume=False)["weights"]).parent
