import json

import pyarrow.parquet as pq
import pytest

from tasks.data.ingest import IngestError, RejectRateExceeded, ingest
from tasks.data.partition import PartitionError, read_partition
from tasks.data.synth import FAULT_KINDS, copy_chatterbot, synth_day
from tests.helpers.project import make_settings, write_raw

DAY = "2026-11-01"


def conv(user: str, answer: str = "Sure, here is a careful and complete answer to that.", **extra) -> str:
    return json.dumps({"messages": [{"role": "user", "content": user},
                                    {"role": "assistant", "content": answer}], **extra})


LONG = ("Please explain how a sourdough starter is fed and kept alive through the winter months in a cold "
        "kitchen without a proofing box or any special equipment at all")


def fault_lines(max_bytes: int) -> list[tuple[bytes | str, str | None]]:
    """(line, expected reject reason or None for clean)."""
    return [
        (conv("What is the capital of France?", ticket="T-1"), None),
        (conv(LONG, "Feed it flour and water daily, keep it somewhere a little warm, "
                    "and discard half before each feed."), None),
        ('{"messages": [', "invalid_json"),
        ("42", "not_object"),
        ('{"messages": []}', "missing_messages"),
        ('{"text": "no messages"}', "missing_messages"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
         "unknown_role"),
        (json.dumps({"messages": ["just a string", {"role": "assistant", "content": "y"}]}), "unknown_role"),
        (json.dumps({"messages": [{"role": "user", "content": " \n\t "},
                                  {"role": "assistant", "content": "y"}]}), "empty_content"),
        (json.dumps({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "y"}]}),
         "empty_content"),
        (json.dumps({"messages": [{"role": "system", "content": "be nice"},
                                  {"role": "user", "content": "hi"}]}), "no_assistant"),
        (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "invalid_utf8"),
        (conv("x" * max_bytes), "over_long"),
        # same after normalisation + casefold
        (conv("what is   the capital of FRANCE?", ticket="T-2"), "duplicate"),
        (conv(LONG, "Feed it flour and water daily, keep it somewhere a little warm, "
                    "and discard half before each feed!"),
         "near_duplicate"),
        (conv("My email is jane.doe@example.com and my IP is 10.1.2.3"), None),
    ]


def test_fault_file_counts_add_up_exactly(settings):
    lines = fault_lines(settings.ingest.max_record_bytes)
    # blank lines are counted, not records
    write_raw(settings, DAY, [line for line, _ in lines] + [b"", b"   "])
    r = ingest(DAY, make_settings(settings.paths.root, "ingest.max_reject_rate=1.0"))
    expected = {}
    for _, reason in lines:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert r["reasons"] == expected
    assert set(expected) == set(FAULT_KINDS)  # every reject kind is exercised
    assert r["input_records"] == len(lines) == r["clean"] + r["rejected"]
    assert r["blank_lines"] == 2
    assert r["pii_scrubbed"]["email"] == 1 and r["pii_scrubbed"]["ip"] == 1

    rejects = [json.loads(x) for x in open(r["quarantine"], encoding="utf-8")]
    assert len(rejects) == r["rejected"]
    by_line = {x["line"]: x for x in rejects}
    for lineno, (line, reason) in enumerate(lines, start=1):
        if reason is None:
            assert lineno not in by_line
            continue
        rec = by_line[lineno]
        assert rec["reason"] == reason and rec["file"] == f"app/dt={DAY}/chats.jsonl" and rec["detail"]
        if reason == "invalid_utf8":
            import base64
            assert base64.b64decode(rec["raw_b64"]) == line  # kept verbatim, byte for byte
        else:
            assert rec["raw"] == line  # kept verbatim
    # duplicates point at the kept original
    assert by_line[14]["detail"] == f"same conversation as app/dt={DAY}/chats.jsonl:1"
    assert by_line[15]["detail"] == f"near-duplicate of app/dt={DAY}/chats.jsonl:2"

    table = read_partition(r["partition"])
    assert table.num_rows == 3
    meta = [json.loads(m) for m in table.column("metadata").to_pylist()]
    assert meta[0] == {"ticket": "T-1"}  # extra keys kept as metadata
    text = json.dumps(table.column("messages").to_pylist())
    assert "jane.doe@example.com" not in text and "[EMAIL]" in text and "[IP]" in text


def test_reject_gate_fails_with_counts_and_keeps_quarantine(settings):
    write_raw(settings, DAY, [conv("hello there"), "not json", "[1]", '{"messages": 3}'])
    with pytest.raises(RejectRateExceeded) as e:
        ingest(DAY, settings)
    msg = str(e.value)
    assert "3 of 4 records rejected" in msg and "invalid_json=1" in msg and "not_object=1" in msg
    assert not (settings.paths.clean / f"dt={DAY}").exists()  # not published
    assert len((settings.paths.quarantine / f"dt={DAY}" / "rejects.jsonl").read_text().splitlines()) == 3


def test_rerun_is_byte_identical(settings):
    synth_day(settings, DAY, records=40, faults=True)
    a = ingest(DAY, settings)
    files = {p.name: p.read_bytes() for p in (settings.paths.clean / f"dt={DAY}").iterdir()}
    q = (settings.paths.quarantine / f"dt={DAY}" / "rejects.jsonl").read_bytes()
    b = ingest(DAY, settings)
    assert a["content_hash"] == b["content_hash"]
    assert {p.name: p.read_bytes() for p in (settings.paths.clean / f"dt={DAY}").iterdir()} == files
    assert (settings.paths.quarantine / f"dt={DAY}" / "rejects.jsonl").read_bytes() == q


def test_synth_faults_one_of_each(settings):
    synth_day(settings, DAY, records=60, faults=True)
    r = ingest(DAY, settings)
    assert r["reasons"] == {k: 1 for k in FAULT_KINDS}
    assert r["clean"] == 60


def test_packaged_chatterbot_corpus(settings):
    info = copy_chatterbot(settings, DAY)
    assert info["files"] >= 15
    r = ingest(DAY, settings)
    assert r["clean"] > 500  # real dialogs from the chatterbot-corpus package
    assert r["input_records"] == r["clean"] + r["rejected"]
    assert r["reasons"].get("duplicate", 0) > 0  # the corpus repeats itself; quarantined, not lost
    table = read_partition(r["partition"])
    roles = {m["role"] for ms in table.column("messages").to_pylist() for m in ms}
    assert roles == {"user", "assistant"}
    cats = {json.loads(m)["categories"][0] for m in table.column("metadata").to_pylist()}
    assert "AI" in cats
    assert pq.read_metadata(next((settings.paths.clean / f"dt={DAY}").glob("*.parquet"))).num_rows == \
        r["clean"]


def test_chatterbot_yaml_faults(settings):
    d = settings.paths.raw / "bot" / f"dt={DAY}"
    d.mkdir(parents=True)
    (d / "ok.yml").write_text("categories: [x]\nconversations:\n- - Hi\n  - Hello!\n"
                              "- - lonely question\n- just text\n")
    (d / "broken.yml").write_text("conversations: [[unclosed\n")
    r = ingest(DAY, make_settings(settings.paths.root, "ingest.max_reject_rate=1.0"))
    assert r["clean"] == 1
    assert r["reasons"] == {"invalid_yaml": 1, "no_assistant": 1, "not_object": 1}


@pytest.mark.parametrize("day", ["2026-13-01", "../../etc", "2026-11-01/../x", ""])
def test_bad_day_rejected_before_any_work(settings, day):
    with pytest.raises(PartitionError, match="expected a date"):
        ingest(day, settings)


def test_no_input_is_a_clear_error(settings):
    with pytest.raises(IngestError, match=r"no raw input for dt=2026-11-01"):
        ingest(DAY, settings)


def test_unchanged_input_is_skipped_and_any_change_runs_again(settings):
    from tasks.data.ingest import is_current

    synth_day(settings, DAY, records=40, faults=True)
    assert not is_current(settings, DAY)
    first = ingest(DAY, settings)
    assert "skipped" not in first and is_current(settings, DAY)
    again = ingest(DAY, settings)  # same raw bytes, config, seed and code: the published result, not redone
    assert again["skipped"].startswith("unchanged raw input")
    assert {k: again[k] for k in ("content_hash", "clean", "rejected", "reasons")} == {
        k: first[k] for k in ("content_hash", "clean", "rejected", "reasons")}
    # one more record in the raw input: ingested again
    write_raw(settings, DAY, [json.dumps({"messages": [
        {"role": "user", "content": "is the shop open on sunday?"},
        {"role": "assistant", "content": "Yes, from ten to four."}]})])
    assert not is_current(settings, DAY)
    more = ingest(DAY, settings)
    assert "skipped" not in more and more["clean"] == first["clean"] + 1
    # another ingest config over the same bytes: ingested again
    other = make_settings(settings.paths.root, "ingest.max_record_bytes=60000")
    assert not is_current(other, DAY) and "skipped" not in ingest(DAY, other)


def test_metadata_is_scrubbed_like_content_and_counted(settings):
    meta = {"customer": {"email": "bob.smith@example.org", "phones": ["call 555-123-4567 after 5"]},
            "ticket": "T-9", "created": 1733500000}
    write_raw(settings, DAY, [conv("What is the capital of France?", **meta)])
    r = ingest(DAY, settings)
    found = {k: n for k, n in r["pii_scrubbed"].items() if n}
    assert found == {"email": 1, "phone": 1}  # the content has none: both came from metadata
    (row,) = read_partition(r["partition"]).column("metadata").to_pylist()
    assert json.loads(row) == {"customer": {"email": "[EMAIL]", "phones": ["call [PHONE] after 5"]},
                               "ticket": "T-9", "created": 1733500000}  # numbers are left as they are
    assert "example.org" not in row and "555" not in row


def test_metadata_dropped_by_config(settings):
    write_raw(settings, DAY, [conv("What is the capital of France?", ticket="T-1", owner="bob@example.org")])
    r = ingest(DAY, make_settings(settings.paths.root, "ingest.keep_metadata=false"))
    assert not any(r["pii_scrubbed"].values())  # dropped, not scrubbed
    assert read_partition(r["partition"]).column("metadata").to_pylist() == ["{}"]
