"""The Great Expectations gate on real partitions: passes on clean data, fails on a bad one."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.atomic import atomic_dir
from tasks.data.ingest import SCHEMA, ingest
from tasks.data.synth import synth_day
from tasks.data.validate import ValidationFailed, validate

DAY = "2026-11-01"


def test_clean_partition_passes_with_data_docs(settings):
    synth_day(settings, DAY, records=120, faults=True)
    ingest(DAY, settings)
    r = validate(DAY, settings)
    assert r["success"] and r["evaluated"] == len(settings.validate_.expectations) and r["failed"] == []
    html = Path(r["data_docs"]).read_text()
    assert "chat_clean" in html  # the suite's results are rendered
    assert (settings.paths.reports_dir / "validation" / f"dt={DAY}.json").is_file()


def _bad_partition(settings):
    msgs = [
        [{"role": "user", "content": "mail me at bob@example.com"}, {"role": "assistant", "content": "ok"}],
        [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}],
        [{"role": "user", "content": "server 10.0.0.1"}, {"role": "assistant", "content": "ok"}],
        [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}],
    ]
    rows = {
        "record_id": [f"r{i}" for i in range(4)], "content_hash": ["a", "b", "c", "b"],  # one duplicate
        "source": ["x"] * 4, "file": ["x"] * 4, "line": [1, 2, 3, 4], "n_turns": [2] * 4,
        "n_chars": [30, 7, 17, 7], "messages": msgs, "metadata": ["{}"] * 4, "dt": [DAY] * 4,
    }
    with atomic_dir(settings.paths.clean / f"dt={DAY}") as tmp:
        pq.write_table(pa.Table.from_pydict(rows, schema=SCHEMA), tmp / "part-00000.parquet")


def test_bad_partition_fails_the_gate_naming_each_expectation(settings):
    _bad_partition(settings)
    with pytest.raises(ValidationFailed) as e:
        validate(DAY, settings)
    msg = str(e.value)
    assert f"dt={DAY}: 4 of {len(settings.validate_.expectations)} expectations failed" in msg
    for name in ("expect_column_values_to_be_in_set", "expect_column_values_to_not_match_regex",
                 "expect_column_proportion_of_unique_values_to_be_between"):
        assert name in msg
    assert "bob@example.com" in msg  # the offending example is shown
    assert "Data Docs:" in msg and \
        (settings.paths.reports_dir / "data_docs" / f"dt={DAY}" / "index.html").is_file()


def test_unknown_expectation_in_config_is_named(tmp_path):
    from tests.helpers.project import make_settings

    s = make_settings(tmp_path, "validate.expectations=[{expectation: ExpectNothingAtAll, table: records}]")
    synth_day(s, DAY, records=20, faults=False)
    ingest(DAY, s)
    with pytest.raises(ValidationFailed, match="unknown expectation 'ExpectNothingAtAll'"):
        validate(DAY, s)


def test_an_unchanged_partition_is_not_validated_again(settings):
    synth_day(settings, DAY, records=60, faults=False)
    ingest(DAY, settings)
    first = validate(DAY, settings)
    assert "skipped" not in first and first["key"]
    again = validate(DAY, settings)
    assert again["skipped"] and again["success"] and again["key"] == first["key"]
    synth_day(settings, DAY, records=80, faults=False)  # new content in the partition: validated again
    ingest(DAY, settings)
    third = validate(DAY, settings)
    assert "skipped" not in third and third["rows"] > first["rows"] and third["key"] != first["key"]
