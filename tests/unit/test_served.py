"""The gateway's served exchanges as the `requests` ingest source: what is kept, what is left out and why,
consent, byte-identical re-runs, and the way into the clean corpus through the same ingest."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from tasks.data.ingest import ingest
from tasks.data.served import collect, served_path
from tests.helpers.project import make_settings

DAY = "2026-12-01"


def _line(i: int, **over) -> dict:
    rec = {"ts": f"{DAY}T10:{i // 60:02d}:{i % 60:02d}+00:00", "request_id": f"chatcmpl-{i:04d}",
           "model": "chat-gpt", "version": 1, "session": "alice@example.com", "status": 200,
           "finish_reason": "stop", "safety_input": {"blocked": False}, "safety_output": {"blocked": False},
           "prompt": f"How do I reset the router in room {i}?",
           "response": f"Hold the reset button of router {i} for ten seconds, then wait for the light."}
    return {**rec, **over}


def _write_log(s, lines: list, name: str = "gateway-1.jsonl") -> None:
    d = s.paths.requests / f"dt={DAY}"
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def test_served_exchanges_are_kept_and_the_rest_left_out_by_reason(tmp_path):
    s = make_settings(tmp_path)
    _write_log(s, [
        *(_line(i) for i in range(12)),
        _line(20, safety_input={"blocked": True, "rule": "weapons"}, finish_reason="content_filter",
              response="I can't help with that."),
        _line(21, safety_output={"blocked": True, "rule": "toxicity"}),
        _line(22, status=503, error="model_server_unavailable"),
        _line(23, response="   "),
        _line(24, model="chat-gpt-small:chat-gpt-small"),
        '{"ts": "2026-12-01T10:59:00+00:00", "request_id": "cut-by-a-cra',
    ])
    # the shadow's mirrored pairs live under requests/shadow/: never training data
    (s.paths.requests / "shadow" / f"dt={DAY}").mkdir(parents=True)
    (s.paths.requests / "shadow" / f"dt={DAY}" / "gateway-1.jsonl").write_text(json.dumps(_line(30)) + "\n")

    out = collect(s, DAY)
    assert out["read"] == 18 and out["kept"] == 13  # 12 plain + the small tier's (every model by default)
    assert out["excluded"] == {"empty": 1, "not_served": 1, "safety_blocked": 2, "unparseable": 1}
    rows = [json.loads(x) for x in served_path(s, DAY).read_text().splitlines()]
    reply = "Hold the reset button of router 0 for ten seconds, then wait for the light."
    assert rows[0]["messages"] == [{"role": "user", "content": "How do I reset the router in room 0?"},
                                   {"role": "assistant", "content": reply}]
    assert "alice@example.com" not in served_path(s, DAY).read_text()  # session ids are not carried over
    assert {r["request_id"] for r in rows} >= {"chatcmpl-0000", "chatcmpl-0024"}
    before = served_path(s, DAY).read_bytes()
    collect(s, DAY)
    assert served_path(s, DAY).read_bytes() == before  # re-runs are byte-identical

    only_large = make_settings(tmp_path, "ingest.sources.requests.models=[chat-gpt]")
    assert collect(only_large, DAY)["excluded"]["other_model"] == 1


def test_consent_off_collects_nothing_and_removes_what_was_collected(tmp_path):
    s = make_settings(tmp_path)
    _write_log(s, [_line(i) for i in range(5)])
    assert collect(s, DAY)["kept"] == 5 and served_path(s, DAY).is_file()
    off = make_settings(tmp_path, "ingest.sources.requests.enabled=false")
    assert collect(off, DAY) == {"dt": DAY, "enabled": False, "path": None, "read": 0, "kept": 0,
                                 "excluded": {}}
    assert not served_path(s, DAY).exists()


def test_ingest_takes_the_served_day_through_the_same_quarantine_and_partition(tmp_path):
    s = make_settings(tmp_path)
    lines = [_line(i) for i in range(30)]
    lines += [_line(40, prompt="mail me at bob@example.org", response="I wrote to bob@example.org just now.")]
    lines += [_line(41 + i, prompt=lines[0]["prompt"], response=lines[0]["response"]) for i in range(3)]
    _write_log(s, lines)
    out = ingest(DAY, s)  # only served traffic on that day: it is the day's input
    assert out["served"]["kept"] == 34 and out["clean"] == 31
    assert out["reasons"] == {"duplicate": 3}  # the same exchange served again is a duplicate like any other
    t = pq.read_table(next((s.paths.clean / f"dt={DAY}").glob("part-*.parquet")))
    assert set(t.column("source").to_pylist()) == {"requests"}
    assert set(t.column("file").to_pylist()) == {f"requests/dt={DAY}/served.jsonl"}
    text = json.dumps(t.column("messages").to_pylist())
    assert "bob@example.org" not in text
    assert "alice@example.com" not in json.dumps(t.column("metadata").to_pylist())
    meta = json.loads(t.column("metadata").to_pylist()[0])
    assert set(meta) == {"request_id", "model", "version", "served_at"}
    # nothing new served: the day is not ingested again
    assert ingest(DAY, s)["skipped"].startswith("unchanged raw input")
