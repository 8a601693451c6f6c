"""The records of long-term memory: a stored `Memory`, a queued `Job`, and what makes them from an
exchange (its identity `exchange_hash`, its condensed text `condense`)."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

RECORD_BYTES = 64  # fixed per-memory overhead counted against max_bytes_per_session
FORGET_KEEP_S = 86_400  # how long a deletion is remembered against jobs queued before it


def exchange_hash(user: str, reply: str) -> str:
    """Identity of one exchange (a user turn and the reply to it): its memory's id within a session."""
    return hashlib.sha256(json.dumps([user, reply], ensure_ascii=False).encode()).hexdigest()[:20]


def history_hashes(history: Sequence[dict[str, Any]]) -> set[str]:
    """The exchanges still in the short-term turns: recalling them again would only repeat them."""
    return {exchange_hash(a["content"], b["content"]) for a, b in zip(history, history[1:], strict=False)
            if a["role"] == "user" and b["role"] == "assistant"}


_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def _clip(text: str, limit: int) -> str:
    """Whole sentences up to `limit` characters; a first sentence longer than that is cut at a word."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    out = ""
    for s in _SENTENCE.split(text):
        if len(out) + len(s) + 1 > limit:
            break
        out = f"{out} {s}".strip()
    return out or text[:limit].rsplit(" ", 1)[0] + "…"


def condense(user: str, reply: str, max_chars: int) -> str:
    """The memory of an exchange: the user's words (what later questions are about) get two thirds
    of the room, the reply the rest; labelled with the chat template's role names, which every
    tokenizer trained on our shards holds as single tokens."""
    u = _clip(user, max_chars * 2 // 3)
    return f"user: {u} | assistant: {_clip(reply, max(16, max_chars - len(u) - 22))}"


@dataclass
class Memory:
    id: str            # exchange_hash, unique within its session
    session: str
    user: str | None
    text: str          # condensed and PII-scrubbed
    vector: np.ndarray  # float32, unit length
    created: float
    last_used: float

    @property
    def bytes(self) -> int:
        return len(self.text.encode()) + int(self.vector.nbytes) + RECORD_BYTES


@dataclass
class Job:
    session: str
    user: str | None
    text: str          # condensed, scrubbed: the queue never holds the raw turns
    id: str
    ts: float = field(default_factory=time.time)
    ref: str | None = None  # the queue's own handle (a stream entry id)

    def to_fields(self) -> dict[str, str]:
        return {"session": self.session, "user": self.user or "", "text": self.text, "id": self.id,
                "ts": repr(self.ts)}

    @classmethod
    def from_fields(cls, f: dict[str, str], ref: str | None = None) -> Job:
        return cls(f["session"], f["user"] or None, f["text"], f["id"], float(f["ts"]), ref)

