"""The Triton model repository as the gateway, the rollout and the tuner read it: which versions of a
model are on disk and complete, and which alias (champion, challenger) names which version.

    models/triton/<name>/<N>/               a complete version (export's marker written last)
    models/triton/<name>/aliases.json       {"champion": M, "challenger": N}

One Triton model per served model: its engine answers streaming and non-streaming requests alike.
Exports before that also wrote a decoupled twin <name>-stream/; export removes it.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.atomic import is_complete, write_json
from tasks.names import check_name

LEGACY_STREAM_SUFFIX = "-stream"  # the twin of earlier exports, removed by export
ALIASES_FILE = "aliases.json"


def read_aliases(repository: Path, name: str) -> dict[str, int]:
    path = repository / name / ALIASES_FILE
    return {k: int(v) for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}


def write_aliases(repository: Path, name: str, aliases: dict[str, int]) -> None:
    write_json(repository / name / ALIASES_FILE, dict(sorted(aliases.items())))


def served_versions(repository: Path, name: str) -> list[int]:
    d = repository / check_name(name)
    return (sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and is_complete(p)) if d.is_dir()
            else [])
