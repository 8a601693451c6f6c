"""Ingest one day of raw chat logs into a clean parquet partition and a quarantine.

    llmops ingest --day 2026-11-01            # or: python -m tasks ingest --day 2026-11-01

Reads every source under data/raw/<source>/dt=<day>/ (OpenAI chat JSONL, chatterbot YAML), the
gateway's served exchanges of the day among them when consented (tasks/data/served.py),
normalises text, scrubs PII (in content and metadata), drops exact and near duplicates, and writes
data/clean/dt=<day>/part-NNNNN.parquet. Every rejected unit goes verbatim to
data/quarantine/dt=<day>/rejects.jsonl with file, line and reason; input = clean + rejected
is asserted. Outputs are byte-identical on re-runs, so retries and backfills are safe.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.atomic import atomic_dir, sha256_file, tree_hash
from tasks.config import Settings
from tasks.data.adapters import SUFFIXES, RawUnit, iter_units
from tasks.data.partition import check_day, data_lock
from tasks.data.text import normalize, scrub_pii
from tasks.errors import InputError
from tasks.lineage import LINEAGE_FILE, code_hash, make_lineage, read_lineage
from tasks.progress import Progress

log = logging.getLogger(__name__)

REASONS = (
    "invalid_utf8", "invalid_json", "invalid_yaml", "not_object", "missing_messages", "unknown_role",
    "empty_content", "no_assistant", "over_long", "duplicate", "near_duplicate",
)
DUPLICATE_REASONS = ("duplicate", "near_duplicate")

SCHEMA = pa.schema([
    ("record_id", pa.string()),
    ("content_hash", pa.string()),
    ("source", pa.string()),
    ("file", pa.string()),
    ("line", pa.int32()),
    ("n_turns", pa.int32()),
    ("n_chars", pa.int32()),
    ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("metadata", pa.string()),
    ("dt", pa.string()),
])


class IngestError(InputError):
    """The partition could not be published (bad input, reject gate)."""


class RejectRateExceeded(IngestError):
    pass


@dataclass
class _Reject(Exception):
    reason: str
    detail: str


def _parse(unit: RawUnit, cfg) -> dict[str, Any]:
    """Decode, parse and structurally check one unit; raise _Reject with the reason."""
    if unit.error:
        reason, _, detail = unit.error.partition(": ")
        raise _Reject(reason, detail)
    if len(unit.raw) > cfg.max_record_bytes:
        raise _Reject("over_long", f"{len(unit.raw)} bytes > max_record_bytes={cfg.max_record_bytes}")
    obj = unit.parsed
    if obj is None:
        try:
            text = unit.raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Reject("invalid_utf8", str(e)) from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise _Reject("invalid_json", str(e)) from None
    if not isinstance(obj, dict):
        raise _Reject("not_object", f"expected a JSON object, got {type(obj).__name__}")
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _Reject("missing_messages", "'messages' is missing, not a list, or empty")
    if len(msgs) > cfg.max_messages:
        raise _Reject("over_long", f"{len(msgs)} messages > max_messages={cfg.max_messages}")
    return obj


def _scrub_metadata(value: Any, kinds: tuple[str, ...], pii: Counter) -> Any:
    """The record's non-message keys with PII scrubbed as in content: string keys and values at every
    depth. Numbers are left alone: a 10-digit epoch time would read as a phone number."""
    if isinstance(value, dict):
        return {scrub_pii(str(k), kinds, pii): _scrub_metadata(v, kinds, pii) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_metadata(v, kinds, pii) for v in value]
    if isinstance(value, str):
        return scrub_pii(value, kinds, pii)
    return value


def _clean_messages(obj: dict[str, Any], cfg, pii: Counter) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(obj["messages"]):
        if not isinstance(m, dict) or m.get("role") not in cfg.roles:
            role = m.get("role") if isinstance(m, dict) else type(m).__name__
            raise _Reject("unknown_role", f"messages[{i}].role={role!r}; allowed {list(cfg.roles)}")
        content = m.get("content")
        if not isinstance(content, str):
            raise _Reject("empty_content", f"messages[{i}].content is {type(content).__name__}, not text")
        content = normalize(content)
        if not content:
            raise _Reject("empty_content", f"messages[{i}].content is empty after normalisation")
        out.append({"role": m["role"], "content": scrub_pii(content, cfg.pii_kinds, pii)})
    if not any(m["role"] == "assistant" for m in out):
        raise _Reject("no_assistant", "no assistant turn to learn from")
    return out


class NearDupIndex:
    """MinHash LSH over word shingles of the casefolded conversation (datasketch)."""

    def __init__(self, cfg, seed: int):
        from datasketch import MinHash, MinHashLSH

        self.cfg = cfg
        self._MinHash = MinHash
        self.lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
        # One set of permutations shared by every MinHash (creating them per record dominates otherwise).
        proto = MinHash(num_perm=cfg.num_perm, seed=seed, hashfunc=zlib.crc32)
        self.perms, self.scheme = proto.permutations, proto.scheme
        self.seed = seed

    def check_and_add(self, key: str, words: list[str]) -> str | None:
        n = self.cfg.shingle_words
        if len(words) < max(self.cfg.min_words, n):
            return None
        shingles = {" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}
        # C speed, deterministic; sha1 (the default) dominated ingest
        mh = self._MinHash(num_perm=self.cfg.num_perm, seed=self.seed, permutations=self.perms,
                           scheme=self.scheme, hashfunc=zlib.crc32)
        mh.update_batch(list(shingles))
        hits = self.lsh.query(mh)
        if hits:
            return min(hits)  # deterministic choice among earlier records
        self.lsh.insert(key, mh)
        return None


def _input_files(settings: Settings, day: str) -> list[tuple[Path, str]]:
    raw = settings.paths.raw
    files = []
    for src_dir in sorted(p for p in raw.glob("*") if p.is_dir()):
        part = src_dir / f"dt={day}"
        if part.is_dir():
            files += [(f, f.relative_to(raw).as_posix()) for f in sorted(part.rglob("*"))
                      if f.is_file() and f.suffix in SUFFIXES]
    return files


def _done_before(settings: Settings, day: str, raw_hash: str) -> dict[str, Any] | None:
    """The published result for dt=<day> if it was made from these very raw bytes with this ingest config,
    seed and code (the partition's lineage says so), else None: an unchanged stage is not run again."""
    part_dir = settings.paths.clean / f"dt={day}"
    if (not (part_dir / LINEAGE_FILE).is_file()
            or not (settings.paths.quarantine / f"dt={day}" / "rejects.jsonl").is_file()):
        return None
    prev = read_lineage(part_dir)
    stats = prev.get("stats") or {}
    if (stats.get("raw_hash"), prev.get("config_hash"), prev.get("seed"), prev.get("code_hash")) != (
            raw_hash, settings.hash("ingest"), settings.seed, code_hash("data")):
        return None
    return {**stats, "partition": str(part_dir), "content_hash": prev["content_hash"],
            "parts": sorted(prev["files"]), "seconds": 0.0,
            "skipped": f"unchanged raw input {raw_hash[:12]}, config and code"}


def is_current(settings: Settings, day: str) -> bool:
    """Whether dt=<day>'s clean partition is up to date with its raw input (what `ingest` would skip)."""
    files = _input_files(settings, check_day(day))
    return bool(files) and _done_before(
        settings, day, tree_hash({rel: sha256_file(p) for p, rel in files})) is not None


def ingest(day: str, settings: Settings) -> dict[str, Any]:
    """Ingest data/raw/*/dt=<day>/ into data/clean/dt=<day>/ and data/quarantine/dt=<day>/."""
    from tasks.data.served import collect

    day = check_day(day)
    cfg = settings.ingest
    served = collect(settings, day)  # the gateway's served exchanges of the day, when consented
    files = _input_files(settings, day)
    if not files:
        raise IngestError(f"no raw input for dt={day}: expected files ({', '.join(SUFFIXES)}) under "
                          f"{settings.paths.raw}/<source>/dt={day}/")
    t0 = time.perf_counter()
    input_bytes = sum(p.stat().st_size for p, _ in files)
    raw_hash = tree_hash({rel: sha256_file(p) for p, rel in files})
    if (done := _done_before(settings, day, raw_hash)) is not None:
        log.info("ingest dt=%s: skipped, %s", day, done["skipped"])
        return {**done, "served": served}

    pii: Counter = Counter()
    reasons: Counter = Counter()
    rejects: list[dict[str, Any]] = []
    rows: dict[str, list] = {f.name: [] for f in SCHEMA}
    seen: dict[str, str] = {}  # dedup key -> "file:line" of the kept record
    near = NearDupIndex(cfg.near_dup, settings.seed) if cfg.near_dup.enabled else None
    n_units = blank = pending_bytes = 0
    prog = Progress(f"ingest dt={day}", input_bytes / 1e6, "MB", log)

    for unit in iter_units(files):
        if isinstance(unit, int):
            blank += unit
            continue
        n_units += 1
        pending_bytes += len(unit.raw) + 1
        if n_units % 1000 == 0:
            prog.update(pending_bytes / 1e6)
            pending_bytes = 0
        where = f"{unit.file}:{unit.line}"
        try:
            obj = _parse(unit, cfg)
            messages = _clean_messages(obj, cfg, pii)
            flat = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
            words = flat.casefold().split()
            key = hashlib.sha256(" ".join(words).encode()).hexdigest()
            if key in seen:
                raise _Reject("duplicate", f"same conversation as {seen[key]}")
            if near is not None and (hit := near.check_and_add(where, words)):
                raise _Reject("near_duplicate", f"near-duplicate of {hit}")
            seen[key] = where
        except _Reject as r:
            reasons[r.reason] += 1
            rec: dict[str, Any] = {"reason": r.reason, "detail": r.detail, "file": unit.file,
                                   "line": unit.line}
            try:
                rec["raw"] = unit.raw.decode("utf-8")
            except UnicodeDecodeError:
                rec["raw"] = unit.raw.decode("utf-8", errors="replace")
                rec["raw_b64"] = base64.b64encode(unit.raw).decode()
            rejects.append(rec)
            continue
        content_hash = hashlib.sha256(json.dumps(messages, ensure_ascii=False).encode()).hexdigest()
        # the column stays (validate's column set is a contract); dropped metadata is an empty object
        meta = (_scrub_metadata({k: v for k, v in obj.items() if k != "messages"}, cfg.pii_kinds, pii)
                if cfg.keep_metadata else {})
        rows["record_id"].append(f"{day}-{content_hash[:16]}")
        rows["content_hash"].append(content_hash)
        rows["source"].append(unit.file.split("/", 1)[0])
        rows["file"].append(unit.file)
        rows["line"].append(unit.line)
        rows["n_turns"].append(len(messages))
        rows["n_chars"].append(sum(len(m["content"]) for m in messages))
        rows["messages"].append(messages)
        rows["metadata"].append(json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str))
        rows["dt"].append(day)

    n_clean = len(rows["record_id"])
    n_rejected = len(rejects)
    assert n_units == n_clean + n_rejected, (n_units, n_clean, n_rejected)  # nothing lost
    gated = n_rejected - (0 if cfg.rate_counts_duplicates else sum(reasons[r] for r in DUPLICATE_REASONS))
    rate = gated / max(n_units, 1)

    qdir = settings.paths.quarantine / f"dt={day}"
    with atomic_dir(qdir) as tmp:
        with open(tmp / "rejects.jsonl", "w", encoding="utf-8") as f:
            for rec in rejects:
                f.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
    summary = {
        "dt": day, "input_files": len(files), "input_bytes": input_bytes, "input_records": n_units,
        "blank_lines": blank, "clean": n_clean, "rejected": n_rejected,
        "reasons": dict(sorted(reasons.items())), "pii_scrubbed": dict(sorted(pii.items())),
        "reject_rate": round(rate, 6), "raw_hash": raw_hash,
        "quarantine": str(qdir / "rejects.jsonl"),
    }
    if rate > cfg.max_reject_rate or n_clean == 0:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(reasons.items()))
        raise RejectRateExceeded(
            f"dt={day}: {gated} of {n_units} records rejected ({rate:.1%} > max_reject_rate "
            f"{cfg.max_reject_rate:.1%}); by reason: {counts}; see {qdir / 'rejects.jsonl'}. "
            "The clean partition was not published.")

    part_dir = settings.paths.clean / f"dt={day}"
    table = pa.Table.from_pydict(rows, schema=SCHEMA)
    config_hash = settings.hash("ingest")
    with data_lock(settings), atomic_dir(part_dir) as tmp:  # no snapshot or shard reads it half replaced
        hashes = {}
        for i, start in enumerate(range(0, max(n_clean, 1), cfg.rows_per_part)):
            name = f"part-{i:05d}.parquet"
            pq.write_table(table.slice(start, cfg.rows_per_part), tmp / name, compression="zstd")
            hashes[name] = sha256_file(tmp / name)
        content_hash = tree_hash(hashes)
        lineage = make_lineage(
            "clean_partition", f"clean/dt={day}@{content_hash[:12]}", config_hash=config_hash,
            seed=settings.seed, parent=f"raw/dt={day}@{raw_hash[:12]}",
            extra={"files": hashes, "content_hash": content_hash, "stats": summary},
        )
        previous = read_lineage(part_dir) if (part_dir / LINEAGE_FILE).is_file() else {}
        if previous.get("content_hash") == content_hash:
            lineage["created_at"] = previous["created_at"]  # unchanged: stay byte-identical
        (tmp / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n")

    secs = time.perf_counter() - t0
    log.info("ingest dt=%s: %d records -> %d clean, %d rejected %s, pii %s (%.1f MB/s)", day, n_units,
             n_clean, n_rejected, dict(reasons), dict(pii), input_bytes / 1e6 / max(secs, 1e-9))
    return {**summary, "partition": str(part_dir), "content_hash": content_hash, "parts": sorted(hashes),
            "seconds": round(secs, 3), "served": served}
