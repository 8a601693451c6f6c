"""Data-plane benchmark: prints one JSON line of figures, all measured in this one run.

    python bench/data.py [--days 4] [--records 25000] [--ge-rows 1000000]

- ingest_mb_s: raw JSONL MB/s through ingest (parse, normalise, PII, exact + near dedup, parquet)
- shard_vs_raw_encode: tokenize+shard tokens/s over raw `Tokenizer.encode_batch_fast` tokens/s on the
  same rendered text in the same run (goal >= 0.8)
- shard_write_share: share of shard wall time spent writing .bin files (goal <= 0.10)
- ge_checkpoint_s_1m: the Great Expectations suite on a 1M-conversation partition (goal <= 60 s)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from tasks.config import load_settings  # noqa: E402
from tasks.data.ingest import ingest
from tasks.data.partition import read_partition  # noqa: E402
from tasks.data.shard import load_tokenizer, shard  # noqa: E402
from tasks.data.snapshot import snapshot  # noqa: E402
from tasks.data.synth import synth  # noqa: E402
from tasks.data.validate import _frames, run_suite  # noqa: E402
from tasks.model.chat_template import render_chat  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--days", type=int, default=4)
    ap.add_argument("--records", type=int, default=25_000)
    ap.add_argument("--ge-rows", type=int, default=1_000_000)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="llmops-bench-"))
    s = load_settings("tiny", [f"paths.root={root}"])
    try:
        out: dict = {"bench": "data", "machine": f"{platform.machine()} {os.cpu_count()} cpu",
                     "python": platform.python_version()}
        days = synth(s, days=args.days, start="2026-11-01", records=args.records, faults=True,
                     chatterbot=False)["days"]
        raw_bytes = sum(Path(d["path"]).stat().st_size for d in days)

        t = time.perf_counter()
        ing = [ingest(d["path"].split("dt=")[1][:10], s) for d in days]
        ingest_s = time.perf_counter() - t
        out.update(ingest_mb=round(raw_bytes / 1e6, 2), ingest_s=round(ingest_s, 2),
                   ingest_mb_s=round(raw_bytes / 1e6 / ingest_s, 2),
                   ingest_records_s=round(sum(r["input_records"] for r in ing) / ingest_s))

        snapshot(s)
        t = time.perf_counter()
        first = shard(s)  # trains the tokenizer, then shards
        out["tokenizer_train_and_shard_s"] = round(time.perf_counter() - t, 2)
        shutil.rmtree(first["shards_dir"])  # time tokenize+shard alone, tokenizer reused
        t = time.perf_counter()
        r = shard(s)
        shard_s = time.perf_counter() - t
        manifest = json.loads(Path(r["manifest"]).read_text())
        n_tokens = sum(manifest["tokens"].values())

        # the same text through the raw tokenizer, nothing else
        tok = load_tokenizer(manifest["tokenizer"]["path"])
        texts = []
        for day in sorted(p.name[3:] for p in s.paths.clean.glob("dt=*")):
            texts += [render_chat(m)
                      for m in read_partition(s.paths.clean / f"dt={day}").column("messages").to_pylist()]
        t = time.perf_counter()
        raw_tokens = 0
        for i in range(0, len(texts), s.shard.encode_batch):
            raw_tokens += sum(len(e.ids) for e in tok.encode_batch_fast(texts[i:i + s.shard.encode_batch],
                                                                        add_special_tokens=False))
        raw_s = time.perf_counter() - t
        assert raw_tokens == n_tokens, (raw_tokens, n_tokens)
        out.update(tokens=n_tokens, text_mb=round(sum(map(len, texts)) / 1e6, 2), shard_s=round(shard_s, 2),
                   shard_tok_s=round(n_tokens / shard_s), raw_encode_s=round(raw_s, 2),
                   raw_encode_tok_s=round(n_tokens / raw_s),
                   shard_vs_raw_encode=round((n_tokens / shard_s) / (n_tokens / raw_s), 3),
                   shard_write_share=round(manifest["write_seconds"] / manifest["seconds"], 4))
        del texts

        # GE on ge_rows conversations: tile the real partition, giving each row a unique id and hash
        base = read_partition(s.paths.clean / "dt=2026-11-01")
        reps = -(-args.ge_rows // base.num_rows)
        big = pa.concat_tables([base] * reps).slice(0, args.ge_rows)
        ids = pa.array(np.char.add("r", np.arange(args.ge_rows).astype(str)))
        big = big.set_column(big.schema.get_field_index("record_id"), "record_id", ids)
        big = big.set_column(big.schema.get_field_index("content_hash"), "content_hash",
                             pc.binary_join_element_wise(big.column("content_hash"), ids, "-"))
        t = time.perf_counter()
        frames = _frames(big)
        frames_s = time.perf_counter() - t
        summary = run_suite(frames, s, docs_dir=None, name="bench")
        assert summary["success"], summary["failed"]
        out.update(ge_rows=args.ge_rows, ge_turn_rows=len(frames["turns"]), ge_frames_s=round(frames_s, 2),
                   ge_checkpoint_s_1m=round(summary["seconds"], 2), ge_expectations=summary["evaluated"])
        print(json.dumps(out))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
