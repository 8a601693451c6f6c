"""The training curve: metrics.jsonl, one JSON line per step, appended by rank 0 and read by the
launcher (to stream into MLflow), the evaluation report (its loss plot) and a resumed run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl; a line torn by a kill mid-write is skipped."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
