"""`llmops synth --traffic`: request-log lines the gateway's readers accept; the drifted mix fires the
monitor."""

from __future__ import annotations

import datetime as dt
import random

from tasks.data.synth import conversation
from tasks.loop.drift import drift_report
from tasks.loop.rollout import read_requests, samples
from tasks.loop.traffic import traffic
from tests.helpers.project import make_settings
from tests.helpers.serving import small_tokenizer


def test_synthetic_traffic_is_read_like_gateway_logs_and_only_the_drifted_mix_fires(tmp_path):
    s = make_settings(tmp_path, "monitor.min_rows=50")
    rng = random.Random(0)
    reference = [next(m["content"] for m in conversation(rng)["messages"] if m["role"] == "user")
                 for _ in range(400)]
    tok = small_tokenizer()

    normal = traffic(s, 300, drifted=False, hours=1.0)
    now = dt.datetime.now(dt.UTC)
    recs = read_requests(s, now - dt.timedelta(hours=2), now + dt.timedelta(seconds=1))
    assert len(recs) == 300 == normal["rows"] and all(r["synthetic"] and r["status"] == 200 for r in recs)
    assert samples(recs, [1])[1].requests == 300
    calm = drift_report(s, reference, recs, tok, out_dir=tmp_path / "calm")
    assert calm["verdict"] == "ok", calm["reason"]

    d = make_settings(tmp_path / "shifted", "monitor.min_rows=50")
    traffic(d, 300, drifted=True, hours=1.0)
    shifted = read_requests(d, now - dt.timedelta(hours=2), dt.datetime.now(dt.UTC))
    drifted = drift_report(d, reference, shifted, tok, out_dir=tmp_path / "drifted")
    assert drifted["fire"] and drifted["verdict"] == "drift", drifted["reason"]
    assert "charset" in drifted["reason"] or "KL" in drifted["reason"]
