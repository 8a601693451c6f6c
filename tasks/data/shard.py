"""Train (or reuse) a byte-level BPE tokenizer and write token shards for a snapshot.

    llmops shard                       # the latest snapshot
    llmops shard --snapshot <hash>

Outputs, keyed by content so an unchanged input is skipped:
- data/tokenizers/<id>/tokenizer.json (+ _lineage.json): HF `tokenizers` byte-level BPE with the
  chat special tokens; its version is `bpe<vocab>-<sha256[:12]>` of the JSON.
- data/shards/<id>/{train,val}_NNN.bin + manifest.json: a fixed 256-byte header then the token
  ids (uint16 when the vocabulary fits, else uint32); the manifest has token counts and the
  sha256 of every shard. `open_shard()` memmaps one.
Records go to val by their content hash, so a record stays on its side across re-runs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from tasks.atomic import atomic_dir, is_complete, sha256_file, write_json
from tasks.config import Settings
from tasks.data.partition import data_lock, read_partition
from tasks.data.snapshot import SnapshotError, corpus_partitions, load_snapshot
from tasks.errors import InputError
from tasks.lineage import LINEAGE_FILE, make_lineage
from tasks.model.chat_template import SPECIAL_TOKENS, render_chat
from tasks.progress import Progress

log = logging.getLogger(__name__)

MAGIC = b"LLMOPSTK"
HEADER_BYTES = 256
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIQI")  # magic, version, itemsize, n_tokens, vocab_size


class ShardError(InputError):
    """No shards for the snapshot, or shards that do not match their manifest."""


def latest_manifest(settings: Settings) -> Path:
    """The shards manifest of the latest snapshot."""
    snap = load_snapshot(settings)["snapshot_hash"]
    found = [p for p in settings.paths.shards.glob("*/manifest.json")
             if is_complete(p.parent) and json.loads(p.read_text())["snapshot_hash"] == snap]
    if not found:
        raise ShardError(f"no shards for the latest snapshot {snap[:12]}; run `llmops shard` first")
    return max(found, key=lambda p: p.stat().st_mtime)


def is_val(content_hash: str, cut: int) -> bool:
    """The held-out split: a record is in val when its content hash falls under the cut (of 10,000)."""
    return int(content_hash[:8], 16) % 10_000 < cut


def split_paths(manifest_path: Path | str, split: str) -> list[Path]:
    """The shard files of one split (train or val); val falls back to train when it is empty."""
    manifest_path = Path(manifest_path)
    shards = json.loads(manifest_path.read_text())["shards"]
    paths = [manifest_path.parent / s["file"] for s in shards if s["split"] == split]
    return paths or (split_paths(manifest_path, "train") if split == "val" else [])


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_shard(path: Path, tokens: np.ndarray, vocab_size: int) -> None:
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, tokens.dtype.itemsize, len(tokens), vocab_size)
    with open(path, "wb") as f:
        f.write(header.ljust(HEADER_BYTES, b"\0"))
        f.write(np.ascontiguousarray(tokens).data)


def open_shard(path: Path | str) -> np.memmap:
    """Memory-map a shard's tokens (read-only), checking its header."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES:
        raise ShardError(f"{path}: shorter than its {HEADER_BYTES}-byte header")
    magic, version, itemsize, n, _vocab = _HEADER.unpack_from(head)
    if magic != MAGIC or version != FORMAT_VERSION or itemsize not in (2, 4):
        raise ShardError(f"{path}: not a token shard (magic {magic!r}, version {version}, "
                         f"itemsize {itemsize})")
    expected = HEADER_BYTES + n * itemsize
    if path.stat().st_size != expected:
        raise ShardError(f"{path}: {path.stat().st_size} bytes on disk, header says {expected}; truncated?")
    dtype = np.uint16 if itemsize == 2 else np.uint32
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n,))


def load_tokenizer(path: Path | str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def _iter_conversations(settings: Settings, partitions: dict[str, str]) -> Iterator[tuple[str, list[dict]]]:
    for day in sorted(partitions):
        table = read_partition(settings.paths.clean / f"dt={day}")
        yield from zip(table.column("content_hash").to_pylist(), table.column("messages").to_pylist(),
                       strict=True)


def _train_tokenizer(settings: Settings, partitions: dict[str, str], key: str) -> Path:
    """Train byte-level BPE on message contents (never on the template's special-token strings)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    cfg = settings.shard
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )

    def texts() -> Iterator[str]:
        yield "system\nuser\nassistant\n"
        for _, messages in _iter_conversations(settings, partitions):
            for m in messages:
                yield m["content"]

    t0 = time.perf_counter()
    tok.train_from_iterator(texts(), trainer=trainer)
    out_dir = settings.paths.tokenizers / key
    with atomic_dir(out_dir) as tmp:
        tok.save(str(tmp / "tokenizer.json"))
        digest = sha256_file(tmp / "tokenizer.json")
        write_json(tmp / LINEAGE_FILE, make_lineage(
            "tokenizer", f"bpe{tok.get_vocab_size()}-{digest[:12]}", config_hash=settings.hash("shard"),
            seed=settings.seed, snapshot_hash=key,
            extra={"sha256": digest, "vocab_size": tok.get_vocab_size()},
        ))
    log.info("trained tokenizer %s (vocab %d) in %.1fs", out_dir.name, tok.get_vocab_size(),
             time.perf_counter() - t0)
    return out_dir


def tokenizer_info(tok_dir: Path) -> dict[str, Any]:
    lin = json.loads((tok_dir / LINEAGE_FILE).read_text())
    return {"version": lin["id"], "sha256": lin["sha256"], "path": str(tok_dir / "tokenizer.json"),
            "vocab_size": lin["vocab_size"]}


def shard(settings: Settings, snapshot_hash: str | None = None) -> dict[str, Any]:
    """Tokenize the snapshot's corpus into train/val shards; reuse everything whose inputs are unchanged.
    Holds the data lock: no day is published into data/clean while its partitions are read."""
    with data_lock(settings):
        return _shard(settings, snapshot_hash)


def _shard(settings: Settings, snapshot_hash: str | None) -> dict[str, Any]:
    import tokenizers

    snap = load_snapshot(settings, snapshot_hash)
    snapshot_hash = snap["snapshot_hash"]
    current = corpus_partitions(settings)
    # the snapshot's own partitions must be as it recorded them; a day ingested since (a parallel
    # backfill run) is not in this snapshot and waits for the next one
    changed = sorted(d for d, h in snap["partitions"].items() if current.get(d) != h)
    if changed:
        raise SnapshotError(f"data/clean no longer matches snapshot {snapshot_hash[:12]} (differs at "
                            f"{changed}); run `llmops snapshot` first")
    if newer := sorted(set(current) - set(snap["partitions"])):
        log.info("partitions %s came after snapshot %s; the next snapshot takes them", newer,
                 snapshot_hash[:12])
    cfg = settings.shard
    tok_key = hashlib.sha256(json.dumps(
        [snapshot_hash, cfg.vocab_size, cfg.min_frequency, tokenizers.__version__]).encode()).hexdigest()[:16]
    tok_dir = settings.paths.tokenizers / tok_key
    reused_tokenizer = is_complete(tok_dir)
    if not reused_tokenizer:
        tok_dir = _train_tokenizer(settings, snap["partitions"], tok_key)
    tok_meta = tokenizer_info(tok_dir)

    shard_key = hashlib.sha256(json.dumps(
        [snapshot_hash, tok_meta["sha256"], cfg.val_fraction, cfg.shard_tokens, FORMAT_VERSION],
    ).encode()).hexdigest()[:16]
    out_dir = settings.paths.shards / shard_key
    if is_complete(out_dir):
        manifest = json.loads((out_dir / "manifest.json").read_text())
        log.info("shards %s already built for snapshot %s; reusing", shard_key, snapshot_hash[:12])
        return _result(out_dir, manifest, reused=True)

    tok = load_tokenizer(tok_meta["path"])
    vocab = tok.get_vocab_size()
    dtype = token_dtype(vocab)
    val_cut = int(cfg.val_fraction * 10_000)
    t0 = time.perf_counter()
    write_s = 0.0
    total_docs = sum(_count_rows(settings, d) for d in snap["partitions"])
    prog = Progress("shard", total_docs, "conversations", log)
    shards: list[dict[str, Any]] = []

    with atomic_dir(out_dir) as tmp:
        buffers: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        counts = {"train": 0, "val": 0}
        docs = {"train": 0, "val": 0}

        def flush(split: str, final: bool = False) -> None:
            nonlocal write_s
            while counts[split] >= cfg.shard_tokens or (final and counts[split]):
                t = time.perf_counter()
                arr = np.concatenate(buffers[split])
                head, rest = arr[:cfg.shard_tokens], arr[cfg.shard_tokens:]
                name = f"{split}_{sum(s['split'] == split for s in shards):03d}.bin"
                write_shard(tmp / name, head, vocab)
                shards.append({"file": name, "split": split, "tokens": int(len(head)), "docs": docs[split],
                               "sha256": sha256_file(tmp / name)})
                buffers[split] = [rest] if len(rest) else []
                counts[split] = len(rest)
                docs[split] = 0
                write_s += time.perf_counter() - t

        def consume(hashes: list[str], encs) -> None:
            for split in ("train", "val"):
                picked = [e.ids for h, e in zip(hashes, encs, strict=True)
                          if is_val(h, val_cut) == (split == "val")]
                if picked:
                    ids = np.fromiter(itertools.chain.from_iterable(picked), dtype=dtype)
                    buffers[split].append(ids)
                    counts[split] += len(ids)
                    docs[split] += len(picked)
                flush(split)
            prog.update(len(hashes))

        def batches() -> Iterator[tuple[list[str], list[str]]]:
            hashes: list[str] = []
            texts: list[str] = []
            for h, messages in _iter_conversations(settings, snap["partitions"]):
                hashes.append(h)
                texts.append(render_chat(messages))
                if len(texts) >= cfg.encode_batch:
                    yield hashes, texts
                    hashes, texts = [], []
            if texts:
                yield hashes, texts

        # The tokenizer (Rust, GIL released) encodes batch k on its threads while this thread
        # renders batch k+1 and packs batch k-1: the Python work hides behind the encoding.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for hashes, texts in batches():
                fut = pool.submit(tok.encode_batch_fast, texts, add_special_tokens=False)
                if pending is not None:
                    consume(pending[0], pending[1].result())
                pending = (hashes, fut)
            if pending is not None:
                consume(pending[0], pending[1].result())
        flush("train", final=True)
        flush("val", final=True)
        prog.close()

        secs = time.perf_counter() - t0
        manifest = {
            "format": {"magic": MAGIC.decode(), "version": FORMAT_VERSION, "header_bytes": HEADER_BYTES,
                       "dtype": dtype.name},
            "snapshot_hash": snapshot_hash, "tokenizer": tok_meta, "vocab_size": vocab,
            "shards": shards,
            "tokens": {s: sum(x["tokens"] for x in shards if x["split"] == s) for s in ("train", "val")},
            "docs": total_docs, "seconds": round(secs, 3), "write_seconds": round(write_s, 3),
            # the held-out split, so evaluation can find the same conversations in data/clean
            "split": {"by": "int(content_hash[:8], 16) % 10000 < cut", "cut": val_cut,
                      "val_fraction": cfg.val_fraction},
            "lineage": make_lineage(
                "shards", f"shards@{shard_key}", config_hash=settings.hash("shard"), seed=settings.seed,
                parent=f"snapshot@{snapshot_hash[:12]}", snapshot_hash=snapshot_hash,
                tokenizer={"version": tok_meta["version"], "sha256": tok_meta["sha256"]}),
        }
        write_json(tmp / "manifest.json", manifest)
    log.info("sharded %d conversations -> %s tokens in %.1fs (%.0f tok/s, %.1f%% writing)", total_docs,
             manifest["tokens"], secs, sum(manifest["tokens"].values()) / max(secs, 1e-9),
             100 * write_s / max(secs, 1e-9))
    return _result(out_dir, manifest, reused=False, reused_tokenizer=reused_tokenizer)


def _count_rows(settings: Settings, day: str) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows
               for p in (settings.paths.clean / f"dt={day}").glob("part-*.parquet"))


def _result(out_dir: Path, manifest: dict[str, Any], reused: bool,
            reused_tokenizer: bool = True) -> dict[str, Any]:
    return {"shards_dir": str(out_dir), "manifest": str(out_dir / "manifest.json"),
            "snapshot_hash": manifest["snapshot_hash"], "tokenizer_version": manifest["tokenizer"]["version"],
            "tokenizer_sha256": manifest["tokenizer"]["sha256"], "tokens": manifest["tokens"],
            "reused": reused, "reused_tokenizer": reused_tokenizer}


def verify_shards(shards_dir: Path | str) -> dict[str, Any]:
    """Check every shard against the manifest's sha256 and token count."""
    shards_dir = Path(shards_dir)
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    for s in manifest["shards"]:
        path = shards_dir / s["file"]
        if sha256_file(path) != s["sha256"]:
            raise ShardError(f"{path}: sha256 does not match manifest.json")
        if len(open_shard(path)) != s["tokens"]:
            raise ShardError(f"{path}: token count does not match manifest.json")
    return manifest
