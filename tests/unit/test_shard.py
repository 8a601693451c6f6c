import json
from pathlib import Path

import numpy as np
import pytest

from tasks.data.ingest import ingest
from tasks.data.partition import read_partition
from tasks.data.shard import ShardError, is_val, load_tokenizer, open_shard, shard, verify_shards, write_shard
from tasks.data.snapshot import corpus_partitions
from tasks.data.synth import synth_day
from tasks.model.chat_template import BOS, EOS, SPECIAL_TOKENS, encode_chat, render_chat

DAY = "2026-11-01"


def test_shard_file_round_trip(tmp_path):
    tokens = np.arange(70_000, dtype=np.uint32) % 65_000
    write_shard(tmp_path / "a.bin", tokens.astype(np.uint16), vocab_size=65_000)
    got = open_shard(tmp_path / "a.bin")
    assert got.dtype == np.uint16 and np.array_equal(got, tokens)
    big = np.array([0, 70_000, 1 << 20], dtype=np.uint32)
    write_shard(tmp_path / "b.bin", big, vocab_size=1 << 21)
    assert np.array_equal(open_shard(tmp_path / "b.bin"), big)


def test_open_shard_rejects_garbage_and_truncation(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"not a shard" * 40)
    with pytest.raises(ShardError, match="not a token shard"):
        open_shard(tmp_path / "x.bin")
    write_shard(tmp_path / "t.bin", np.arange(100, dtype=np.uint16), 1000)
    data = (tmp_path / "t.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(data[:-10])
    with pytest.raises(ShardError, match="truncated"):
        open_shard(tmp_path / "t.bin")


def test_render_chat_defangs_special_tokens():
    text = render_chat([{"role": "user", "content": "hi <|im_end|> fake"},
                        {"role": "assistant", "content": "ok"}])
    assert text.count(EOS) == 2 and text.count(BOS) == 2


def _fake_snapshot(settings):
    """Write the snapshot record shard() reads, without DVC (tested in integration)."""
    from tasks.atomic import tree_hash, write_json

    parts = corpus_partitions(settings)
    h = tree_hash(parts)
    write_json(settings.paths.snapshots / f"{h}.json", {"snapshot_hash": h, "partitions": parts})
    write_json(settings.paths.snapshots / "latest.json", {"snapshot_hash": h})
    return h


def test_shard_end_to_end_parity_and_reuse(settings):
    synth_day(settings, DAY, records=300, faults=False)
    ingest(DAY, settings)
    _fake_snapshot(settings)
    r = shard(settings)
    manifest = verify_shards(r["shards_dir"])  # sha256 + counts of every shard match
    assert manifest["tokens"]["train"] > 0 and manifest["tokens"]["val"] > 0
    assert manifest["lineage"]["snapshot_hash"] == r["snapshot_hash"]
    assert manifest["lineage"]["tokenizer"]["sha256"] == r["tokenizer_sha256"]

    tok = load_tokenizer(manifest["tokenizer"]["path"])
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    # Tokenization parity: the serving path's encode_chat gives exactly the ids in the shards.
    table = read_partition(settings.paths.clean / f"dt={DAY}")
    convs = table.column("messages").to_pylist()
    hashes = table.column("content_hash").to_pylist()
    cut = int(settings.shard.val_fraction * 10_000)
    train_ids = [i for c, h in zip(convs, hashes, strict=True) if not is_val(h, cut)
                 for i in encode_chat(tok, c)]
    shard_ids = np.concatenate([open_shard(f"{r['shards_dir']}/{s['file']}") for s in manifest["shards"]
                                if s["split"] == "train"])
    assert shard_ids.tolist() == train_ids
    # and decoding a conversation's ids gives back the rendered template text
    assert tok.decode(encode_chat(tok, convs[0]), skip_special_tokens=False) == render_chat(convs[0])
    # serving prompt = the same turns + the generation prompt, a prefix-compatible encoding
    prompt = encode_chat(tok, convs[0][:1], add_generation_prompt=True)
    assert tok.decode(prompt, skip_special_tokens=False).endswith(f"{BOS}assistant\n")

    again = shard(settings)
    assert again["reused"] and again["shards_dir"] == r["shards_dir"]


def test_shard_splits_into_files_of_bounded_size(settings):
    from tests.helpers.project import make_settings

    s = make_settings(settings.paths.root, "shard.shard_tokens=5000", "shard.val_fraction=0.0")
    synth_day(s, DAY, records=200, faults=False)
    ingest(DAY, s)
    _fake_snapshot(s)
    manifest = json.loads(open(shard(s)["manifest"]).read())
    sizes = [x["tokens"] for x in manifest["shards"]]
    assert len(sizes) > 2 and all(n == 5000 for n in sizes[:-1]) and 0 < sizes[-1] <= 5000
    assert [x["file"] for x in manifest["shards"]][:2] == ["train_000.bin", "train_001.bin"]


def test_tokenizer_training_is_deterministic(tmp_path):
    from tests.helpers.project import make_settings

    hashes = []
    for i in range(2):
        s = make_settings(tmp_path / str(i))
        synth_day(s, DAY, records=300, faults=False)
        ingest(DAY, s)
        _fake_snapshot(s)
        hashes.append(shard(s)["tokenizer_sha256"])
    assert hashes[0] == hashes[1]


def test_shard_refuses_a_snapshot_whose_partitions_changed_but_not_one_a_later_day_came_after(settings):
    synth_day(settings, DAY, records=50, faults=False)
    ingest(DAY, settings)
    _fake_snapshot(settings)
    # a parallel backfill run ingests another day meanwhile: this snapshot is still whole
    synth_day(settings, "2026-11-02", records=50, faults=False)
    ingest("2026-11-02", settings)
    out = shard(settings)
    assert out["snapshot_hash"] and \
        json.loads(Path(out["manifest"]).read_text())["snapshot_hash"] == out["snapshot_hash"]
    # the snapshot's own day re-ingested with other content: refused
    synth_day(settings, DAY, records=60, faults=False)
    ingest(DAY, settings)
    from tasks.data.snapshot import SnapshotError

    with pytest.raises(SnapshotError, match=r"no longer matches snapshot .*2026-11-01"):
        shard(settings)
