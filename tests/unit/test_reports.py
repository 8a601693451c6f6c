"""reports/index.html finds every report the stages wrote and links it relatively, newest first."""

import os
import re
import time

from tasks.ops.reports import collect, last_drift, last_drift_at, latest, write_index


def _touch(path, text="x", age_s=0.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_index_links_every_kind_relatively_and_newest_first(settings):
    r, d = settings.paths.reports_dir, settings.paths.data_dir
    old = _touch(r / "data_docs" / "dt=2026-11-01" / "index.html", age_s=100)
    new = _touch(r / "data_docs" / "dt=2026-11-02" / "index.html")
    files = [
        _touch(d / "quarantine" / "dt=2026-11-01" / "rejects.jsonl"),
        _touch(r / "eval" / "tiny-abc" / "report.html"),
        _touch(r / "eval" / "tiny-abc-int8" / "report.html"),
        _touch(r / "eval" / "tiny-abc-int4" / "report.html"),
        _touch(r / "eval" / "tiny-abc-tiers" / "report.html"),
        _touch(r / "shadow" / "20261128T080000" / "shadow.html"),
        _touch(r / "rollout" / "20261128T080100-v2-promote.json"),
        _touch(r / "drift" / "20261128T090000" / "report.html"),
        _touch(r / "drift" / "20261128T090000" / "verdict.json", '{"verdict": "ok", "reason": "no drift"}'),
        _touch(r / "cost" / "20261128T090000Z" / "cost.html"),
        _touch(r / "autoscale" / "recommendations.jsonl"),
    ]
    found = {x["path"] for x in collect(settings)}
    assert {old, new, *[f for f in files if f.suffix != ".json" or "rollout" in str(f)]} <= found
    assert latest(settings)["Data Docs"] == new
    kinds = {x["path"].parent.name: x["title"] for x in collect(settings) if "eval" in x["path"].parts}
    assert kinds == {"tiny-abc": "Evaluation", "tiny-abc-int8": "Evaluation (int8)",
                     "tiny-abc-int4": "Evaluation (int4)", "tiny-abc-tiers": "Model tiers"}
    index = write_index(settings, {"Airflow": "http://127.0.0.1:8080"})
    html = index.read_text()
    hrefs = re.findall(r"href='([^']+)'", html)
    assert hrefs[0] == "http://127.0.0.1:8080"
    for h in hrefs[1:]:
        assert not h.startswith("/") and (index.parent / h).resolve().is_file(), h  # relative, and it exists
    assert html.index("dt=2026-11-02") < html.index("dt=2026-11-01")  # newest first
    assert "../data/quarantine/dt=2026-11-01/rejects.jsonl" in hrefs
    assert last_drift(settings)["verdict"] == "ok"
    when, verdict = last_drift_at(settings)
    assert (when.isoformat(), verdict["reason"]) == ("2026-11-28T09:00:00+00:00", "no drift")


def test_an_empty_project_gets_an_index_that_says_so(settings):
    html = write_index(settings).read_text()
    assert html.count("nothing yet") == 4 and last_drift(settings) is None
