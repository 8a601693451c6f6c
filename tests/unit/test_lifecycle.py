"""The lifecycle driver's own machinery: stage statuses, the history it keeps, the ETA it shows,
and what a failing stage leaves. (The stages themselves run for real in `make run`; their DAGs are
tested through the scheduler in tests/e2e.)"""

import io
import json

import pytest
from rich.console import Console

from tasks.ops.lifecycle import Lifecycle, LifecycleError, Stage, _fmt


def _lc(settings, *stages: Stage) -> tuple[Lifecycle, io.StringIO]:
    out = io.StringIO()
    lc = Lifecycle(settings, "2026-11-01", "2026-11-03",
                   console=Console(file=out, width=160, force_terminal=False))
    lc.stages = list(stages)
    return lc, out


def test_statuses_history_and_eta_from_the_last_run_that_did_the_work(settings):
    lc, out = _lc(settings, Stage("a", "does a", lambda lc, st: (True, "did a")),
                  Stage("b", "does b", lambda lc, st: (False, "unchanged: b")))
    result = lc.run()
    assert {k: v["status"] for k, v in result["stages"].items()} == {"a": "done", "b": "skipped"}
    text = out.getvalue()
    assert "▶ a: does a" in text and "✓ a" in text and "did a" in text and "= b" in text and \
        "unchanged: b" in text
    hist = json.loads(lc.history_path.read_text())
    assert set(hist["stages"]["a"]) == {"ran"} and set(hist["stages"]["b"]) == {"skipped"}
    assert hist["last"]["statuses"] == {"a": "done", "b": "skipped"}

    # the next run: a's ETA is a's time when it last did the work; b never did any, so it has none
    lc2, _ = _lc(settings, Stage("a", "does a", lambda lc, st: (True, "")),
                 Stage("b", "does b", lambda lc, st: (True, "")))
    lc2.history_path.write_text(json.dumps({"stages": {"a": {"ran": 90.0}, "b": {"skipped": 1.0}}}))
    assert lc2.eta(lc2.stages[0]) == 90.0 and lc2.eta(lc2.stages[1]) is None
    wide = io.StringIO()
    Console(file=wide, width=160).print(lc2)
    assert "1m30s" in wide.getvalue() and "ETA 1m30s + stages never timed" in wide.getvalue()


def test_a_failing_stage_is_marked_stops_the_run_and_the_times_are_still_kept(settings):
    def boom(lc, st):
        lc.note(st, "halfway")
        raise LifecycleError("chat_train run x failed: {'train': 'failed'}")

    ran = []
    lc, out = _lc(settings, Stage("a", "a", lambda lc, st: (True, "ok")), Stage("b", "b", boom),
                  Stage("c", "c", lambda lc, st: ran.append("c") or (True, "")))
    with pytest.raises(LifecycleError, match="chat_train run x failed"):
        lc.run()
    assert [st.status for st in lc.stages] == ["done", "failed", "pending"] and not ran
    assert "train" in lc.stages[1].detail and "  b: halfway" in out.getvalue()
    hist = json.loads(lc.history_path.read_text())
    assert hist["last"]["statuses"] == {"a": "done", "b": "failed", "c": "pending"} and \
        "b" not in hist["stages"]


def test_durations_read_like_a_clock():
    assert [_fmt(x) for x in (None, 0.4, 59.6, 61, 754)] == ["", "0s", "1m00s", "1m01s", "12m34s"]
