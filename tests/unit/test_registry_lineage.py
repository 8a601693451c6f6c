import pytest

from tasks.judge.registry import REQUIRED, RegistrationRefused, lineage_tags

LINEAGE = {"id": "model@tiny-x", "seed": 1337, "snapshot_hash": "abc",
           "tokenizer": {"version": "bpe2048-x", "sha256": "def"},
           "config_hash": "123", "code_version": "git:deadbeef", "parent": "shards@xyz"}


def test_complete_lineage_becomes_tags():
    tags = lineage_tags(LINEAGE, "run123", "/r/report.html")
    assert tags["tokenizer.sha256"] == "def" and tags["mlflow_run_id"] == "run123" and \
        tags["eval_report"] == "/r/report.html"
    assert set(REQUIRED) <= set(tags)


@pytest.mark.parametrize("field", REQUIRED)
def test_each_missing_field_refuses_registration(field):
    import copy

    lin = copy.deepcopy(LINEAGE)
    run, report = "run123", "/r/report.html"
    if field == "mlflow_run_id":
        run = None
    elif field == "eval_report":
        report = None
    elif field.startswith("tokenizer."):
        del lin["tokenizer"][field.split(".", 1)[1]]
    else:
        del lin[field]
    with pytest.raises(RegistrationRefused, match=f"lineage field '{field}' is missing"):
        lineage_tags(lin, run, report)
