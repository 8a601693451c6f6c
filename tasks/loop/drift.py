"""Drift and SLO checks of the served model on its request logs, and the guarded retrain decision.

    llmops drift                   # report + verdict for the last monitor.window_hours

Reference: the user turns of the training snapshot's corpus. Current: the prompts of the
gateway's request logs in the window. Both are sampled to `monitor.sample_rows`. Compared with
Evidently's DataDriftPreset on prompt features (characters, tokens, words, empty, charset), plus
the KL divergence of the token unigram distribution (same tokenizer as the served model), plus
embedding drift of the prompts (`monitor.embedding_model`, sampled further to
`monitor.embedding_sample_rows` a side: Evidently's EmbeddingsDrift, "model" method), plus the SLO
figures (p99 latency, error rate) of the same logs. The HTML reports go to
reports/drift/<time>/report.html and embeddings.html, with the verdict beside them as JSON.

`guard()` decides whether a firing monitor may act: not within the cooldown, not while a chat_train
run is running or queued, not without enough new rows since the last trigger, not above the weekly
cap. Its state (the triggers so far) lives in var/monitor/state.json. `plan_retrain()` then decides on
the evidence: served days not in the corpus yet are ingested first (the training follows from their
shards); a snapshot with days the champion's lacks is trained on; with nothing new it raises an alert
instead, since a retrain on the champion's own data would only reproduce it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import random
import time
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

from tasks.atomic import write_json
from tasks.config import MonitorConfig, Settings

log = logging.getLogger(__name__)
FEATURES_NUM = ("prompt_chars", "prompt_words", "prompt_tokens")
FEATURES_CAT = ("charset", "empty")
# Evidently's default bound for its "model" method (ROC AUC of a reference-vs-current classifier)
EMBEDDING_AUC = 0.55


def charset(text: str) -> str:
    """The script most letters of a text are in: ascii, latin, cyrillic, greek, cjk, arabic, other, none."""
    counts: Counter[str] = Counter()
    for ch in text:
        if not ch.isalpha():
            continue
        if ch.isascii():
            counts["ascii"] += 1
            continue
        name = unicodedata.name(ch, "")
        for script in ("LATIN", "CYRILLIC", "GREEK", "CJK", "HIRAGANA", "KATAKANA", "HANGUL", "ARABIC"):
            if name.startswith(script):
                counts["cjk" if script in ("CJK", "HIRAGANA", "KATAKANA", "HANGUL") else script.lower()] += 1
                break
        else:
            counts["other"] += 1
    return counts.most_common(1)[0][0] if counts else "none"


def features(prompts: list[str], tokenizer) -> tuple[Any, Counter]:
    """(DataFrame of prompt features, token unigram counts)."""
    import pandas as pd

    rows, unigrams = [], Counter()
    encoded = tokenizer.encode_batch(prompts, add_special_tokens=False) if prompts else []
    for text, enc in zip(prompts, encoded, strict=True):
        unigrams.update(enc.ids)
        rows.append({"prompt_chars": len(text), "prompt_words": len(text.split()),
                     "prompt_tokens": len(enc.ids), "charset": charset(text),
                     "empty": "yes" if not text.strip() else "no"})
    return pd.DataFrame(rows, columns=[*FEATURES_NUM, *FEATURES_CAT]), unigrams


def kl_divergence(current: Counter, reference: Counter, alpha: float = 1.0) -> float:
    """KL(current || reference) in nats over the union of token ids, add-alpha smoothed."""
    import numpy as np

    keys = sorted(set(current) | set(reference))
    if not keys or not sum(current.values()):
        return 0.0
    p = np.array([current.get(k, 0) for k in keys], dtype=float) + alpha
    q = np.array([reference.get(k, 0) for k in keys], dtype=float) + alpha
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))


def auc_bound(n_reference: int, n_current: int, z: float = 3.09) -> float:
    """The ROC AUC above which embedding drift fires: Evidently's 0.55, raised for small samples to the
    AUC a classifier scores by chance with probability 0.001 on the held-out half that Evidently scores
    (normal approximation of the Mann-Whitney U null). 2,000 a side: 0.55; 150 a side: 0.65."""
    n1, n2 = max(n_reference // 2, 1), max(n_current // 2, 1)
    return max(EMBEDDING_AUC, 0.5 + z * math.sqrt((n1 + n2 + 1) / (12 * n1 * n2)))


def embedding_drift(reference: list[str], current: list[str], model: str) -> tuple[dict[str, Any], Any]:
    """({"method", "score", "threshold", "drifted", "rows"}, Evidently snapshot) of the prompts' sentence
    embeddings.

    Evidently's EmbeddingsDrift with its "model" method: a linear classifier is trained to tell
    reference from current embeddings on half the rows; the score is its ROC AUC on the other half
    (0.5: indistinguishable). The snapshot has the metric's t-SNE density plots of both sides.
    """
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift
    from evidently.metrics.embeddings import ModelDriftMethod
    from evidently.tests import lte

    from tasks.model.encoders import embed

    ref, cur = embed(reference, model), embed(current, model)  # (N, D) unit vectors
    cols = [f"e{i}" for i in range(ref.shape[1])]
    definition = DataDefinition(embeddings={"prompt": cols})
    bound = auc_bound(len(reference), len(current))
    metric = EmbeddingsDrift(embeddings_name="prompt", drift_method=ModelDriftMethod(threshold=bound),
                             tests=[lte(bound)])
    snapshot = Report([metric], include_tests=True).run(
        current_data=Dataset.from_pandas(pd.DataFrame(cur, columns=cols), data_definition=definition),
        reference_data=Dataset.from_pandas(pd.DataFrame(ref, columns=cols), data_definition=definition))
    score = float(snapshot.dict()["metrics"][0]["value"])
    return {"method": "model", "score": score, "threshold": bound, "drifted": score > bound,
            "rows": {"reference": len(reference), "current": len(current)}}, snapshot


def reference_prompts(settings: Settings) -> list[str]:
    """User turns of the latest snapshot's clean partitions (what the model was trained on)."""
    from tasks.data.partition import read_partition
    from tasks.data.snapshot import load_snapshot

    snap = load_snapshot(settings)
    out = []
    for day in sorted(snap["partitions"]):
        for msgs in read_partition(settings.paths.clean / f"dt={day}").column("messages").to_pylist():
            out.extend(m["content"] for m in msgs if m["role"] == "user")
    return out


def drift_report(settings: Settings, reference: list[str], records: list[dict[str, Any]], tokenizer,
                 out_dir: Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Evidently drift of prompt features + token KL + prompt embedding drift + SLO figures; the HTML
    reports and verdict JSON."""
    import numpy as np
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    cfg = settings.monitor
    rng = random.Random(seed)
    served = [r for r in records if r.get("status") == 200 and isinstance(r.get("prompt"), str)]
    current = [r["prompt"] for r in served]
    if len(current) > cfg.sample_rows:
        current = rng.sample(current, cfg.sample_rows)
    if len(reference) > cfg.sample_rows:
        reference = rng.sample(reference, cfg.sample_rows)
    lat = [float(r["latency_ms"]) for r in served if r.get("latency_ms") is not None]
    errors = sum(1 for r in records if int(r.get("status", 200)) >= 500)
    slo = {"requests": len(records), "p99_ms": float(np.percentile(lat, 99)) if lat else None,
           "error_rate": errors / len(records) if records else 0.0}
    result: dict[str, Any] = {"rows": {"reference": len(reference), "current": len(current)}, "slo": slo}
    if len(current) < cfg.min_rows:
        return {**result, "verdict": "insufficient", "fire": False,
                "reason": f"{len(current)} served prompts in the window; {cfg.min_rows} needed"}
    ref_df, ref_uni = features(reference, tokenizer)
    cur_df, cur_uni = features(current, tokenizer)
    definition = DataDefinition(numerical_columns=list(FEATURES_NUM), categorical_columns=list(FEATURES_CAT))
    report = Report([DataDriftPreset(columns=[*FEATURES_NUM, *FEATURES_CAT], drift_share=cfg.drift_share)],
                    include_tests=True)
    snapshot = report.run(current_data=Dataset.from_pandas(cur_df, data_definition=definition),
                          reference_data=Dataset.from_pandas(ref_df, data_definition=definition))
    tests = snapshot.dict().get("tests", [])
    failed_tests = [t.get("name", "") for t in tests if str(t.get("status", "")).upper().endswith("FAIL")]
    kl = kl_divergence(cur_uni, ref_uni)
    # A second Report: one Report runs on one pair of datasets, and only a sample of the feature rows
    # is embedded (embedding is the slow part). EmbeddingsDrift is Evidently's new-API metric over its
    # legacy EmbeddingsDriftMetric; DataDriftPreset takes an `embeddings` argument but ignores it in 0.7.
    emb: dict[str, Any] | None = None
    emb_snapshot: Any = None
    if cfg.embedding_model:
        n, t0 = cfg.embedding_sample_rows, time.perf_counter()
        emb, emb_snapshot = embedding_drift(rng.sample(reference, min(n, len(reference))),
                                            rng.sample(current, min(n, len(current))), cfg.embedding_model)
        log.info("embedding drift of prompts: %s score %.3f (threshold %.3f), %d + %d prompts in %.1f s",
                 emb["method"], emb["score"], emb["threshold"], emb["rows"]["reference"],
                 emb["rows"]["current"], time.perf_counter() - t0)
    reasons = [f"Evidently: {n}" for n in failed_tests]
    if kl > cfg.kl_threshold:
        reasons.append(f"token unigram KL {kl:.3f} > {cfg.kl_threshold}")
    if emb and emb["drifted"]:
        reasons.append(f"embedding drift of prompts: {emb['method']} score {emb['score']:.3f} > "
                       f"threshold {emb['threshold']:.3f}")
    if slo["p99_ms"] is not None and slo["p99_ms"] > cfg.slo_p99_ms:
        reasons.append(f"SLO: p99 {slo['p99_ms']:.0f} ms > {cfg.slo_p99_ms:.0f} ms")
    if slo["error_rate"] > cfg.slo_error_rate:
        reasons.append(f"SLO: error rate {slo['error_rate']:.1%} > {cfg.slo_error_rate:.1%}")
    out_dir = out_dir or (settings.paths.reports_dir / "drift"
                          / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S"))
    out_dir.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(out_dir / "report.html"))
    if emb is not None:
        emb_snapshot.save_html(str(out_dir / "embeddings.html"))
        emb["report"] = str(out_dir / "embeddings.html")
    result |= {"verdict": "drift" if reasons else "ok", "fire": bool(reasons),
               "reason": "; ".join(reasons) or "no drift",
               "token_kl": kl, "embedding_drift": emb, "evidently_failed_tests": failed_tests,
               "report": str(out_dir / "report.html")}
    write_json(out_dir / "verdict.json", result)
    return result


def check(settings: Settings, hours: float | None = None) -> dict[str, Any]:
    """The drift report for the last `hours` (default monitor.window_hours) of request logs."""
    from tasks.data.shard import latest_manifest, load_tokenizer
    from tasks.loop.rollout import read_requests

    now = dt.datetime.now(dt.UTC)
    records = read_requests(settings, now - dt.timedelta(hours=hours or settings.monitor.window_hours), now)
    manifest = json.loads(latest_manifest(settings).read_text())
    result = drift_report(settings, reference_prompts(settings), records,
                          load_tokenizer(manifest["tokenizer"]["path"]))
    log.info("drift verdict: %s: %s (report %s)", result["verdict"], result["reason"], result.get("report"))
    return result


def guard(state: dict[str, Any], now: dt.datetime, cfg: MonitorConfig, running_or_queued: int,
          new_rows: int) -> tuple[bool, str]:
    """May a firing monitor trigger chat_train now? (allowed, why)."""
    g = cfg.guard
    triggers = [dt.datetime.fromisoformat(t) for t in state.get("triggers", [])]
    if running_or_queued:
        return False, f"chat_train already has {running_or_queued} run(s) running or queued"
    if triggers and now - max(triggers) < dt.timedelta(hours=g.cooldown_hours):
        return False, f"in cooldown: last trigger {max(triggers).isoformat()} (< {g.cooldown_hours} h ago)"
    week = [t for t in triggers if now - t < dt.timedelta(days=7)]
    if len(week) >= g.max_per_week:
        return False, f"weekly cap reached: {len(week)} triggers in the last 7 days (max {g.max_per_week})"
    if new_rows < g.min_new_rows:
        return False, f"only {new_rows} new request rows since the last trigger ({g.min_new_rows} needed)"
    return True, "guards passed"


def state_path(settings: Settings) -> Path:
    return settings.paths.var_dir / "monitor" / "state.json"


def load_state(settings: Settings) -> dict[str, Any]:
    p = state_path(settings)
    return json.loads(p.read_text()) if p.is_file() else {"triggers": []}


def note_trigger(settings: Settings, now: dt.datetime, reason: str) -> None:
    state = load_state(settings)
    state["triggers"] = [*state.get("triggers", []), now.isoformat()][-50:]
    state["last_reason"] = reason
    write_json(state_path(settings), state)


def served_pending(settings: Settings, now: dt.datetime) -> list[str]:
    """Days of the monitor's window whose served traffic (the `requests` source, when consented) is not in
    the clean corpus yet: collected here, so that ingesting the day is what would change."""
    from tasks.data.ingest import is_current
    from tasks.data.served import collect, served_days

    if not settings.ingest.sources.requests.enabled:
        return []
    first = (now - dt.timedelta(hours=settings.monitor.window_hours)).date().isoformat()
    pending = []
    for day in served_days(settings):
        if first <= day <= now.date().isoformat() and collect(settings, day)["kept"] \
                and not is_current(settings, day):
            pending.append(day)
    return pending


def alert(settings: Settings, kind: str, reason: str, evidence: dict[str, Any],
          now: dt.datetime | None = None) -> dict[str, Any]:
    """A condition a person has to look at: logged at WARNING and written to
    reports/alerts/<time>-<kind>.json (`llmops status` lists the latest)."""
    now = now or dt.datetime.now(dt.UTC)
    record = {"kind": kind, "at": now.isoformat(timespec="seconds"), "reason": reason, **evidence}
    path = settings.paths.reports_dir / "alerts" / f"{now.strftime('%Y%m%dT%H%M%S')}-{kind}.json"
    write_json(path, record)
    log.warning("ALERT %s: %s (%s)", kind, reason, path)
    return {**record, "record": str(path)}


def plan_retrain(settings: Settings, verdict: dict[str, Any], running_or_queued: int, profile: str,
                 now: dt.datetime | None = None) -> dict[str, Any]:
    """chat_monitor's `decide`: what a verdict leads to, {"action", "reason", ...}.

    - "none": the verdict does not fire, or a guard holds it back (a training going, cooldown, weekly cap,
      too little new traffic);
    - "ingest": served days of the window are not in the corpus yet (and consent is on): chat_ingest runs
      for the latest (`conf`), and the chat_shards event it publishes starts the training, with the reason;
    - "train": the latest snapshot has days the champion's does not, and its training was neither
      registered nor refused yet: chat_train runs on it (`conf`);
    - "alert": nothing new to learn from (a retrain would reproduce what was trained): an alert with the
      drift report instead of a training.
    A trigger that goes ahead ("ingest", "train") is noted in the monitor's state, for the next guard."""
    from tasks.data.shard import ShardError
    from tasks.data.snapshot import SnapshotError, load_snapshot, new_data
    from tasks.judge.registry import alias_tags
    from tasks.judge.release import check_inputs
    from tasks.loop.rollout import read_requests

    if not verdict["fire"]:
        log.info("no retrain: %s", verdict["reason"])
        return {"action": "none", "reason": verdict["reason"]}
    now = now or dt.datetime.now(dt.UTC)
    state = load_state(settings)
    last = max((dt.datetime.fromisoformat(t) for t in state.get("triggers", [])),
               default=now - dt.timedelta(days=7))
    allowed, why = guard(state, now, settings.monitor, running_or_queued,
                         len(read_requests(settings, last, now)))
    log.info("monitor fired (%s); guards: %s", verdict["reason"], why)
    if not allowed:
        return {"action": "none", "reason": why}
    reason = f"chat_monitor: {verdict['reason']}"
    why = {"reason": reason, "drift_report": verdict.get("report")}
    if pending := served_pending(settings, now):
        note_trigger(settings, now, verdict["reason"])
        return {"action": "ingest", "days": pending, "reason": f"served traffic of {pending} is not in the "
                f"corpus yet: chat_ingest dt={pending[-1]} first, then the training its shards start",
                "conf": {"day": pending[-1], "profile": profile, **why}}
    try:  # what chat_train's check_inputs would find on the latest shards
        inputs: dict[str, Any] | None = check_inputs(settings)
    except (ShardError, SnapshotError):  # no shards for the latest snapshot yet
        inputs = None
    if inputs is not None:
        data = inputs["data"]
    else:
        champion = alias_tags(settings, "champion")
        data = new_data(settings, load_snapshot(settings)["snapshot_hash"],
                        champion.get("snapshot_hash") if champion else None)
    done = ""
    if inputs is not None and inputs["registered"] is not None:
        done = f"; its training is registered already as version {inputs['registered']}"
    elif inputs is not None and inputs["refused"] is not None:
        done = f"; its training was refused by the gate ({inputs['refused']})"
    if data["has_new"] and not done:
        note_trigger(settings, now, verdict["reason"])
        return {"action": "train", "data": data, "reason": data["summary"],
                "conf": {"profile": profile, **why, "resume": False}}
    consent = settings.ingest.sources.requests.enabled
    return {"action": "alert", **alert(
        settings, "drift-no-new-data",
        f"{verdict['reason']}; but there is no new data to learn from ({data['summary']}{done}; served "
        "traffic " + ("is in the corpus already" if consent else "is not trained on: "
                      "ingest.sources.requests.enabled is off")
        + "): a retrain would reproduce what was trained, so none is started",
        {"drift_report": verdict.get("report"), "data": data, "consent": consent}, now)}
