"""The repository root and a project of one's own under a temporary directory: settings, raw input."""

from __future__ import annotations

from pathlib import Path

from tasks.config import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]


def make_settings(root: Path, *overrides: str, profile: str = "tiny") -> Settings:
    return load_settings(profile, [f"paths.root={root}", *overrides])


def write_raw(settings: Settings, day: str, lines: list[bytes | str], source: str = "app",
              name: str = "chats.jsonl") -> Path:
    path = settings.paths.raw / source / f"dt={day}" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return path
