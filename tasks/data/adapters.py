"""Source adapters: turn raw files into (file, line, raw bytes, parsed-or-error) units.

- `*.jsonl`: OpenAI chat format, one JSON object per line; parsing happens in ingest so that
  every failure mode (invalid UTF-8, invalid JSON, ...) is judged in one place.
- `*.yml` / `*.yaml`: chatterbot-corpus dialogs (`conversations: [[utterance, reply, ...]]`),
  turned into user/assistant turns; each conversation is one unit, its raw text the YAML lines
  it spans, and the corpus `categories` kept as metadata.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True, slots=True)
class RawUnit:
    file: str  # path relative to data/raw
    line: int  # 1-based line where the unit starts
    raw: bytes  # the input exactly as read, for the quarantine
    parsed: Any = None  # set by adapters that parse themselves (YAML)
    error: str | None = None  # (reason, detail) pre-decided by the adapter, "reason: detail"


SUFFIXES = (".jsonl", ".yml", ".yaml")


def read_jsonl(path: Path, rel: str) -> Iterator[RawUnit | int]:
    """Yield one unit per non-blank line; a blank line yields the int 1 (counted, not a record)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                yield 1
                continue
            yield RawUnit(rel, lineno, raw)


def read_chatterbot_yaml(path: Path, rel: str) -> Iterator[RawUnit]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield RawUnit(rel, 1, data, error=f"invalid_utf8: {e}")
        return
    lines = text.splitlines()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        yield RawUnit(rel, 1, data, error=f"invalid_yaml: {e}")
        return
    if not isinstance(root, yaml.MappingNode):
        yield RawUnit(rel, 1, data, error="not_object: top level is not a mapping with 'conversations'")
        return
    top = {k.value: v for k, v in root.value if isinstance(k, yaml.ScalarNode)}
    categories = yaml.safe_load(yaml.serialize(top["categories"])) if "categories" in top else []
    convs = top.get("conversations")
    if not isinstance(convs, yaml.SequenceNode):
        yield RawUnit(rel, 1, data, error="missing_messages: no 'conversations' list")
        return
    for node in convs.value:
        start, end = node.start_mark.line, max(node.end_mark.line, node.start_mark.line + 1)
        raw = "\n".join(lines[start:end]).encode()
        utterances = yaml.safe_load(yaml.serialize(node))
        if not isinstance(utterances, list):
            yield RawUnit(rel, start + 1, raw,
                          error="not_object: a conversation must be a list of utterances")
            continue
        messages: list[dict[str, Any]] = [
            {"role": "user" if i % 2 == 0 else "assistant", "content": u if isinstance(u, str) else u}
            for i, u in enumerate(utterances)
        ]
        yield RawUnit(rel, start + 1, raw, parsed={"messages": messages, "categories": categories})


def iter_units(files: list[tuple[Path, str]]) -> Iterator[RawUnit | int]:
    for path, rel in files:
        if path.suffix == ".jsonl":
            yield from read_jsonl(path, rel)
        else:
            yield from read_chatterbot_yaml(path, rel)
