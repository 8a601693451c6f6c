"""The gateway's served exchanges as a source of training data: the `requests` source.

    llmops ingest --day 2026-12-07      # collects data/requests/dt=2026-12-07/ first, when consented

The gateway logs one JSON line per request under data/requests/dt=<day>/ (the prompt and the reply,
PII already scrubbed). `collect()` turns one day of them into data/raw/requests/dt=<day>/served.jsonl in
the OpenAI chat format, so they go through the same quarantine, validation, snapshot and shards as any
other source, and a drift retrain learns from the traffic that drifted.

Left out, and counted by reason: answers that were not a 200, exchanges the safety filter blocked on
either side (their reply is the refusal), empty prompts or replies, other models than
`ingest.sources.requests.models`, and rehearsal lines when `include_synthetic` is off. The session id is
not carried over (it may be an e-mail address); the request id, model, version and time are, as metadata.

Consent is a setting: `ingest.sources.requests.enabled` (on in configs/ingest.yaml for the embedded
stack, off in the prod-local profile until an operator turns it on). With it off, nothing is collected
and a served.jsonl collected earlier is removed, so the day's partition no longer holds served traffic.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from tasks.atomic import atomic_file
from tasks.config import Settings
from tasks.data.partition import check_day

log = logging.getLogger(__name__)

SOURCE = "requests"
FILE = "served.jsonl"


def served_path(settings: Settings, day: str) -> Path:
    return settings.paths.raw / SOURCE / f"dt={day}" / FILE


def _why_excluded(rec: dict[str, Any], cfg) -> str | None:
    """The reason a request-log line is not training data, or None when it is."""
    if rec.get("status") != 200 or rec.get("error"):
        return "not_served"
    if ((rec.get("safety_input") or {}).get("blocked") or (rec.get("safety_output") or {}).get("blocked")
            or rec.get("finish_reason") == "content_filter"):
        return "safety_blocked"
    if cfg.models and str(rec.get("model", "")).partition(":")[0] not in cfg.models:
        return "other_model"
    if rec.get("synthetic") and not cfg.include_synthetic:
        return "synthetic"
    prompt, reply = rec.get("prompt"), rec.get("response")
    if not isinstance(prompt, str) or not isinstance(reply, str) or not prompt.strip() or not reply.strip():
        return "empty"
    return None


def collect(settings: Settings, day: str) -> dict[str, Any]:
    """data/requests/dt=<day>/*.jsonl -> data/raw/requests/dt=<day>/served.jsonl (see the module doc).

    Byte-identical on re-runs over the same logs (lines sorted by time and request id), so an unchanged day
    is not ingested again. Returns the counts: lines read, kept, excluded by reason."""
    day = check_day(day)
    cfg = settings.ingest.sources.requests
    out = served_path(settings, day)
    if not cfg.enabled:
        if out.is_file():
            out.unlink()
            log.info("requests source dt=%s: consent is off (ingest.sources.requests.enabled); removed %s",
                     day, out)
        return {"dt": day, "enabled": False, "path": None, "read": 0, "kept": 0, "excluded": {}}
    excluded: Counter[str] = Counter()
    kept: list[tuple[str, str, str]] = []
    read = 0
    for f in sorted((settings.paths.requests / f"dt={day}").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            read += 1
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                excluded["unparseable"] += 1  # a line cut by a crash mid-write
                continue
            if not isinstance(rec, dict):
                excluded["unparseable"] += 1
                continue
            if (why := _why_excluded(rec, cfg)) is not None:
                excluded[why] += 1
                continue
            row: dict[str, Any] = {"messages": [{"role": "user", "content": rec["prompt"]},
                                {"role": "assistant", "content": rec["response"]}],
                   "request_id": str(rec.get("request_id", "")), "model": rec.get("model"),
                   "version": rec.get("version"), "served_at": rec.get("ts"),
                   **({"synthetic": True} if rec.get("synthetic") else {})}
            kept.append((str(rec.get("ts", "")), str(row["request_id"]),
                         json.dumps(row, ensure_ascii=False, sort_keys=True)))
    result = {"dt": day, "enabled": True, "path": None, "read": read, "kept": len(kept),
              "excluded": dict(sorted(excluded.items()))}
    if kept:
        body = "".join(line + "\n" for *_, line in sorted(kept)).encode()
        if not out.is_file() or out.read_bytes() != body:  # unchanged: leave it, byte for byte
            with atomic_file(out) as tmp:
                tmp.write_bytes(body)
        result["path"] = str(out)
    log.info("requests source dt=%s: %d served lines -> %d exchanges to ingest, excluded %s", day, read,
             len(kept), result["excluded"])
    return result


def served_days(settings: Settings) -> list[str]:
    """Days the gateway logged requests for (data/requests/dt=<day>/), oldest first."""
    root = settings.paths.requests
    return sorted(p.name[3:] for p in root.glob("dt=*") if p.is_dir()) if root.is_dir() else []
