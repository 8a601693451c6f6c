"""Canary analysis and the promote / roll-back decisions, judged on the gateway's request logs.

    llmops rollout analyze --since 10m        # champion vs challenger over a window: the verdict and why
    llmops rollout shadow --since 10m         # the shadow report of the mirrored pairs (HTML + JSON)
    llmops rollout canary                     # shadow, then 5 % -> 25 % -> 50 % -> 100 %; promote or
                                              # roll back

The canary starts with a shadow phase (`rollout.shadow_percent` > 0): the gateway mirrors that
share of the champion's requests to the challenger, users see only the champion's replies, and
`shadow_report()` scores each pair (embedding similarity of the two replies, toxicity, safety
verdicts, length, latency). A shadow that fails stops the rollout before any user is served by
the challenger.

`compare()` is the judge. With fewer than `rollout.min_samples` challenger requests it waits;
otherwise a check fails only when the difference is both larger than its threshold and
statistically real (one-sided Mann-Whitney U on latencies, as Kayenta does; Fisher's exact test
on safety hits), so a noisy window cannot roll a good model back. The error rate has an absolute
bound. Every decision is written as JSON under reports/rollout/ and as tags on the MLflow version.
Traffic moves by rewriting models/triton/<model>/traffic.json atomically; the gateway re-reads it
on the next request, and both versions stay loaded, so no request fails during a switch.

Per tier: the gateway's small tier (serve.routing) is its own Triton model with its own aliases.json
and traffic.json, and request-log lines name the model that served them, so all of this runs on it
with `--set serve.triton.model_name=chat-gpt-small --set tracking.registered_model=chat-gpt-small`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.atomic import write_json
from tasks.config import RolloutConfig, Settings
from tasks.errors import InputError
from tasks.serve.repository import read_aliases, write_aliases

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One version's requests in a window."""

    latencies_ms: list[float] = field(default_factory=list)
    requests: int = 0
    errors: int = 0        # 5xx answers
    safety_hits: int = 0   # prompts or replies the safety filter blocked

    @property
    def p99_ms(self) -> float:
        import numpy as np

        return float(np.percentile(self.latencies_ms, 99)) if self.latencies_ms else float("nan")

    def rate(self, n: int) -> float:
        return n / self.requests if self.requests else 0.0


def read_requests(settings: Settings, since: dt.datetime, until: dt.datetime | None = None,
                  kind: str = "") -> list[dict[str, Any]]:
    """The gateway's request log lines with since <= ts < until (the day partitions that can hold them);
    kind "shadow": the mirrored pairs of the shadow phase instead."""
    until = until or dt.datetime.now(dt.UTC)
    root = settings.paths.requests / kind if kind else settings.paths.requests
    out = []
    day = since.date()
    while day <= until.date():
        for f in sorted((root / f"dt={day.isoformat()}").glob("*.jsonl")):
            for line in f.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                    ts = dt.datetime.fromisoformat(rec["ts"])
                except (json.JSONDecodeError, KeyError, ValueError):
                    continue  # a line cut by a crash mid-write
                if since <= ts < until:
                    out.append(rec)
        day += dt.timedelta(days=1)
    return out


def _of_model(rec: dict[str, Any], model: str | None) -> bool:
    """Whether a log line is about `model`: the gateway serves two tiers (chat-gpt, chat-gpt-small) whose
    version numbers overlap, and each tier has its own canary. A line without a model is counted."""
    served = rec.get("model")
    return model is None or not isinstance(served, str) or served.partition(":")[0] == model


def samples(records: Iterable[dict[str, Any]], versions: Iterable[int],
            model: str | None = None) -> dict[int, Sample]:
    """Per-version samples of the request log lines, those of Triton model `model` only when given."""
    out = {int(v): Sample() for v in versions}
    for r in records:
        if not _of_model(r, model):
            continue
        s = out.get(r.get("version"))
        if s is None:
            continue
        s.requests += 1
        status = int(r.get("status", 200))
        if status >= 500:
            s.errors += 1
        elif status == 200 and r.get("latency_ms") is not None:
            s.latencies_ms.append(float(r["latency_ms"]))
        if (r.get("safety_input") or {}).get("blocked") or (r.get("safety_output") or {}).get("blocked"):
            s.safety_hits += 1
    return out


def compare(champion: Sample, challenger: Sample, cfg: RolloutConfig) -> dict[str, Any]:
    """{"verdict": "pass" | "fail" | "wait", "checks": [...], "reason": str}."""
    from scipy.stats import fisher_exact, mannwhitneyu

    if challenger.requests < cfg.min_samples or champion.requests < cfg.min_samples:
        return {"verdict": "wait", "checks": [], "reason": f"not enough requests yet (challenger "
                f"{challenger.requests}, champion {champion.requests}; {cfg.min_samples} needed each)"}
    checks = []
    d_p99 = challenger.p99_ms - champion.p99_ms
    p_lat = float(mannwhitneyu(challenger.latencies_ms, champion.latencies_ms,
                               alternative="greater").pvalue) \
        if challenger.latencies_ms and champion.latencies_ms else 1.0
    checks.append({"check": "p99_latency", "challenger_ms": round(challenger.p99_ms, 2),
                   "champion_ms": round(champion.p99_ms, 2),
                   "delta_ms": round(d_p99, 2), "limit_ms": cfg.max_p99_regression_ms, "p_value": p_lat,
                   "failed": bool(d_p99 > cfg.max_p99_regression_ms and p_lat < cfg.alpha)})
    r_ch, r_cp = challenger.rate(challenger.safety_hits), champion.rate(champion.safety_hits)
    p_saf = float(fisher_exact([[challenger.safety_hits, challenger.requests - challenger.safety_hits],
                                [champion.safety_hits, champion.requests - champion.safety_hits]],
                               alternative="greater").pvalue)
    checks.append({"check": "safety_hit_rate", "challenger": round(r_ch, 4), "champion": round(r_cp, 4),
                   "delta": round(r_ch - r_cp, 4), "limit": cfg.max_safety_regression, "p_value": p_saf,
                   "failed": bool(r_ch - r_cp > cfg.max_safety_regression and p_saf < cfg.alpha)})
    err = challenger.rate(challenger.errors)
    checks.append({"check": "error_rate", "challenger": round(err, 4), "limit": cfg.max_error_rate,
                   "failed": bool(err > cfg.max_error_rate)})
    failed = [c for c in checks if c["failed"]]
    reason = "; ".join(_why(c) for c in failed) or "challenger within every bound"
    return {"verdict": "fail" if failed else "pass", "checks": checks, "reason": reason}


def _why(c: dict[str, Any]) -> str:
    if c["check"] == "p99_latency":
        return (f"p99 latency {c['challenger_ms']} ms vs champion {c['champion_ms']} ms "
                f"(+{c['delta_ms']} ms > {c['limit_ms']} ms, Mann-Whitney p={c['p_value']:.2g})")
    if c["check"] == "safety_hit_rate":
        return (f"safety-hit rate {c['challenger']:.1%} vs champion {c['champion']:.1%} (+{c['delta']:.1%} > "
                f"{c['limit']:.0%}, Fisher p={c['p_value']:.2g})")
    return f"error rate {c['challenger']:.1%} above {c['limit']:.1%}"


def set_traffic(settings: Settings, challenger_percent: float, shadow_percent: float = 0.0) -> None:
    """Share of sessions the gateway sends to the challenger, and share of the champion's requests it
    mirrors to the challenger (shadow); takes effect on its next request."""
    body = {"challenger": float(challenger_percent)}
    if shadow_percent:
        body["shadow"] = float(shadow_percent)
    write_json(settings.paths.triton_repository / settings.serve.triton.model_name / "traffic.json", body)


def _pair_sample(pairs: list[dict[str, Any]], side: str) -> Sample:
    """One side (champion or challenger) of the mirrored pairs as a canary sample."""
    recs = [p[side] for p in pairs if isinstance(p.get(side), dict)]
    return samples(recs, [recs[0]["version"]])[recs[0]["version"]] if recs else Sample()


def shadow_report(settings: Settings, since: dt.datetime, until: dt.datetime | None = None,
                  out_dir: Path | None = None) -> dict[str, Any]:
    """Score the mirrored pairs of a window: the canary's checks (p99 latency, safety hits, errors) on
    the paired replies, plus the replies' embedding similarity, toxicity and length. Writes
    reports/shadow/<time>/shadow.json and an Evidently report (shadow.html) of the challenger's
    reply features against the champion's on the same prompts."""
    import numpy as np

    from tasks.judge import metrics as M

    cfg = settings.rollout
    name = settings.serve.triton.model_name
    aliases = read_aliases(settings.paths.triton_repository, name)
    pairs = [p for p in read_requests(settings, since, until, kind="shadow") if _of_model(p, name)
             and p.get("champion", {}).get("version") == aliases.get("champion")
             and p.get("challenger", {}).get("version") == aliases.get("challenger")]
    champ, chal = _pair_sample(pairs, "champion"), _pair_sample(pairs, "challenger")
    result: dict[str, Any] = {"phase": "shadow", "champion": aliases.get("champion"),
                              "challenger": aliases.get("challenger"), "pairs": len(pairs),
                              "window": [since.isoformat(), (until or dt.datetime.now(dt.UTC)).isoformat()],
                              "requests": {"champion": champ.requests, "challenger": chal.requests}}
    if len(pairs) < cfg.shadow_min_pairs:
        return {**result, "verdict": "wait", "checks": [],
                "reason": f"{len(pairs)} mirrored pairs so far; {cfg.shadow_min_pairs} needed"}
    verdict = compare(champ, chal, cfg.model_copy(update={"min_samples": 1}))
    ok = [p for p in pairs if p["challenger"].get("status") == 200]
    a = [p["champion"].get("response", "") for p in ok]
    b = [p["challenger"].get("response", "") for p in ok]
    sims = _similarities(a, b, cfg.embedding_model) if ok else np.zeros(0)
    tox_a, tox_b = (np.asarray(M.toxicity_scores(x)) for x in (a, b))
    len_a = np.array([p["champion"].get("completion_tokens", 0) for p in ok], dtype=float)
    len_b = np.array([p["challenger"].get("completion_tokens", 0) for p in ok], dtype=float)
    mean_sim = float(sims.mean()) if len(sims) else float("nan")
    sim_check = {"check": "reply_similarity", "mean": round(mean_sim, 4),
                 "p10": round(float(np.percentile(sims, 10)), 4) if len(sims) else None,
                 "limit": cfg.min_reply_similarity,
                 "failed": bool(not len(sims) or mean_sim < cfg.min_reply_similarity)}
    ref_check = _reference_check(settings, ok)
    checks = [*verdict["checks"], sim_check, ref_check]
    failed = [c for c in checks if c["failed"]]
    reasons = [_why(c) for c in failed if c["check"] not in ("reply_similarity", "reference_quality")]
    if sim_check["failed"]:
        reasons.append(f"replies differ from the champion's: mean embedding similarity {mean_sim:.3f} < "
                       f"{cfg.min_reply_similarity}")
    if ref_check["failed"]:
        reasons.append(f"replies further from the held-out references: mean ROUGE-L "
                       f"{ref_check['challenger']:.3f} vs champion {ref_check['champion']:.3f} over "
                       f"{ref_check['pairs']} pairs (-"
                       f"{-ref_check['delta']:.3f} > {cfg.max_reference_regression}, Wilcoxon "
                       f"p={ref_check['p_value']:.2g})")
    result |= {"verdict": "fail" if failed else "pass", "checks": checks,
               "reason": "; ".join(reasons) or "challenger within every bound on the mirrored requests",
               "replies": {"similarity_mean": mean_sim,
                           "toxicity_mean": {"champion": float(tox_a.mean()) if len(tox_a) else None,
                                             "challenger": float(tox_b.mean()) if len(tox_b) else None},
                           "completion_tokens_mean": {
                               "champion": float(len_a.mean()) if len(len_a) else None,
                               "challenger": float(len_b.mean()) if len(len_b) else None},
                           "identical_share": (float(np.mean([x == y for x, y in zip(a, b, strict=True)]))
                                               if ok else None)}}
    out_dir = out_dir or (settings.paths.reports_dir / "shadow"
                          / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if ok:
        result["report"] = str(_shadow_html(out_dir / "shadow.html", ok, sims, tox_a, tox_b))
    write_json(out_dir / "shadow.json", result)
    return result


def references(settings: Settings) -> dict[str, str]:
    """{user turn: held-out reply} of the latest snapshot's eval split: single-turn conversations only,
    and none from the `requests` source (a served reply as reference would favour the model that gave it)."""
    from tasks.data.shard import ShardError, latest_manifest
    from tasks.data.snapshot import SnapshotError
    from tasks.judge.evaluate import held_out

    try:
        manifest = json.loads(latest_manifest(settings).read_text())
    except (ShardError, SnapshotError):
        return {}
    return {r["prompt"][0]["content"]: r["reference"] for r in held_out(settings, manifest, 10**9)
            if len(r["prompt"]) == 1 and r["prompt"][0]["role"] == "user" and r["slice"] != "requests"}


def _reference_check(settings: Settings, pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Both sides' replies against the held-out reference, where the mirrored prompt has one: mean ROUGE-L
    of each, and whether the challenger is worse by more than `max_reference_regression`, significantly
    (one-sided Wilcoxon signed-rank on the paired scores, p < alpha). Too few such pairs: not judged."""
    import numpy as np
    from scipy.stats import wilcoxon

    from tasks.judge import metrics as M

    cfg = settings.rollout
    refs = references(settings) if pairs else {}
    scored = [(p, refs[p["prompt"]]) for p in pairs
              if isinstance(p.get("prompt"), str) and p["prompt"] in refs]
    check: dict[str, Any] = {"check": "reference_quality", "pairs": len(scored),
                             "limit": cfg.max_reference_regression, "champion": None, "challenger": None,
                             "delta": None, "p_value": None,
                             "failed": False}
    if len(scored) < cfg.reference_min_pairs:
        return {**check, "note": f"{len(scored)} mirrored prompts have a held-out reference; "
                                 f"{cfg.reference_min_pairs} needed to judge"}
    ref = [r for _, r in scored]
    a = np.array(M.rouge_l_scores([p["champion"].get("response", "") for p, _ in scored], ref))
    b = np.array(M.rouge_l_scores([p["challenger"].get("response", "") for p, _ in scored], ref))
    delta = float(b.mean() - a.mean())
    p_value = float(wilcoxon(a, b, alternative="greater").pvalue) if np.any(a != b) else 1.0
    return {**check, "champion": round(float(a.mean()), 4), "challenger": round(float(b.mean()), 4),
            "delta": round(delta, 4), "p_value": p_value,
            "failed": bool(-delta > cfg.max_reference_regression and p_value < cfg.alpha)}


def _similarities(a: list[str], b: list[str], model: str):
    """Cosine similarity of each pair of replies' sentence embeddings (the packaged MiniLM by default)."""
    import numpy as np

    from tasks.judge import metrics as M

    return np.sum(M.embed(a, model) * M.embed(b, model), axis=1)


def _shadow_html(path: Path, pairs: list[dict[str, Any]], sims, tox_a, tox_b) -> Path:
    """Evidently's drift report of the challenger's reply features (current) against the champion's
    on the same prompts (reference): latency, length, toxicity; with the pair similarity alongside."""
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset, DataSummaryPreset

    def frame(side: str, tox) -> pd.DataFrame:
        return pd.DataFrame({"latency_ms": [float(p[side].get("latency_ms", 0.0)) for p in pairs],
                             "completion_tokens": [int(p[side].get("completion_tokens", 0)) for p in pairs],
                             "toxicity": [float(x) for x in tox],
                             "similarity_to_champion": [float(x) for x in sims]})

    cols = ["latency_ms", "completion_tokens", "toxicity", "similarity_to_champion"]
    definition = DataDefinition(numerical_columns=cols)
    snap = Report([DataDriftPreset(columns=cols[:3]), DataSummaryPreset(columns=cols)]).run(
        current_data=Dataset.from_pandas(frame("challenger", tox_b), data_definition=definition),
        reference_data=Dataset.from_pandas(frame("champion", tox_a), data_definition=definition))
    snap.save_html(str(path))
    return path


def record(settings: Settings, decision: dict[str, Any]) -> Path:
    """The auditable record: reports/rollout/<time>-v<version>-<action>.json, and tags on the MLflow
    version."""
    from tasks.tracking import mlflow_client

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    path = (settings.paths.reports_dir / "rollout"
            / f"{stamp}-v{decision['challenger']}-{decision['action']}.json")
    client = mlflow_client(settings)
    name = settings.tracking.registered_model
    try:  # what the challenger's training saw that the champion's did not, and why it ran
        tags = client.get_run(client.get_model_version(name, str(decision["challenger"])).run_id).data.tags
        decision["training_data"] = {"new_data": tags.get("llmops.trigger_new_data"),
                                     "reason": tags.get("llmops.trigger_reason")}
    except Exception as e:  # noqa: BLE001 - a version registered by hand has no training run to ask
        decision["training_data"] = {"unknown": str(e)[:200]}
    write_json(path, decision)
    for k, v in {"rollout.action": decision["action"], "rollout.reason": decision["reason"][:4000],
                 "rollout.record": str(path), "rollout.at": decision["at"]}.items():
        client.set_model_version_tag(name, str(decision["challenger"]), k, v)
    log.info("rollout decision: %s v%s: %s (%s)", decision["action"], decision["challenger"],
             decision["reason"], path)
    return path


def _decision(action: str, champion: int | None, challenger: int, reason: str,
              **evidence: Any) -> dict[str, Any]:
    return {"action": action, "champion": champion, "challenger": challenger, "reason": reason,
            "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **evidence}


def promote(settings: Settings, evidence: dict[str, Any]) -> dict[str, Any]:
    """The challenger becomes champion (MLflow alias and aliases.json); the old champion stays loaded
    as `previous` (blue-green), traffic goes to the new champion."""
    from tasks.judge.registry import promote as registry_promote

    repo, name = settings.paths.triton_repository, settings.serve.triton.model_name
    aliases = read_aliases(repo, name)
    challenger, previous = aliases["challenger"], aliases.get("champion")
    registry_promote(settings, challenger, reason=f"canary passed: {evidence.get('reason', '')}"[:500],
                     who="rollout")
    _drop_alias(settings, "challenger")  # it is the champion now
    new = {"champion": challenger, **({"previous": previous} if previous and previous != challenger else {})}
    write_aliases(repo, name, new)  # the gateway's route for `chat-gpt` now goes to the new champion
    set_traffic(settings, 0.0)
    decision = _decision("promote", previous, challenger, evidence.get("reason", "canary passed"),
                         evidence=evidence)
    decision["record"] = str(record(settings, decision))
    return decision


def rollback(settings: Settings, reason: str, evidence: dict[str, Any]) -> dict[str, Any]:
    """Traffic back to the champion at once; the challenger alias is moved to `rejected` with the reason."""
    from tasks.tracking import mlflow_client

    repo, name = settings.paths.triton_repository, settings.serve.triton.model_name
    if "challenger" not in read_aliases(repo, name):
        raise InputError(f"no challenger to roll back (aliases.json: {read_aliases(repo, name)})")
    set_traffic(settings, 0.0)  # first: from the gateway's next request on, nobody is sent to the challenger
    aliases = read_aliases(repo, name)
    challenger = aliases.pop("challenger")
    write_aliases(repo, name, {**aliases, "rejected": challenger})
    _drop_alias(settings, "challenger")
    mlflow_client(settings).set_registered_model_alias(settings.tracking.registered_model, "rejected",
                                                       str(challenger))
    decision = _decision("rollback", aliases.get("champion"), challenger, reason, evidence=evidence)
    decision["record"] = str(record(settings, decision))
    return decision


def _drop_alias(settings: Settings, alias: str) -> None:
    from tasks.tracking import mlflow_client

    try:
        mlflow_client(settings).delete_registered_model_alias(settings.tracking.registered_model, alias)
    except Exception as e:  # noqa: BLE001 - already gone or moved by a newer registration: nothing to undo
        log.warning("alias %s not removed: %s", alias, e)


def analyze(settings: Settings, since: dt.datetime, until: dt.datetime | None = None,
            baseline: Sample | None = None) -> dict[str, Any]:
    """Judge the window. When the champion has too few requests in it (the 100 % step), the
    champion's requests from the canary's earlier windows (`baseline`) stand in for them."""
    aliases = read_aliases(settings.paths.triton_repository, settings.serve.triton.model_name)
    if "champion" not in aliases or "challenger" not in aliases:
        raise InputError(f"a canary needs a champion and a challenger in aliases.json, got {aliases}")
    s = samples(read_requests(settings, since, until), (aliases["champion"], aliases["challenger"]),
                settings.serve.triton.model_name)
    champ, source = s[aliases["champion"]], "same window"
    if champ.requests < settings.rollout.min_samples and baseline is not None and baseline.requests:
        champ, source = baseline, "earlier canary windows"
    verdict = compare(champ, s[aliases["challenger"]], settings.rollout)
    return {**verdict, "champion": aliases["champion"], "challenger": aliases["challenger"],
            "window": [since.isoformat(), (until or dt.datetime.now(dt.UTC)).isoformat()],
            "champion_sample": source,
            "requests": {"champion": champ.requests, "challenger": s[aliases["challenger"]].requests},
            "_champion": s[aliases["champion"]]}


def inconclusive(settings: Settings, result: dict[str, Any], steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The deadline passed without the evidence a verdict needs: traffic back to the champion and, with
    `rollout.on_inconclusive` "unload" (the default), the challenger leaves the gateway's routes (its alias
    becomes `inconclusive`); "keep" leaves it the challenger, for a later chat_deploy run to judge again.
    Recorded like any decision; never a promotion."""
    repo, name = settings.paths.triton_repository, settings.serve.triton.model_name
    set_traffic(settings, 0.0)
    aliases = read_aliases(repo, name)
    challenger = aliases.get("challenger", result.get("challenger"))
    kept = settings.rollout.on_inconclusive == "keep"
    if not kept and "challenger" in aliases:
        aliases.pop("challenger")
        write_aliases(repo, name, {**aliases, "inconclusive": challenger})
        _drop_alias(settings, "challenger")
    reason = (f"no decision by the deadline ({settings.rollout.deadline_s:.0f} s of waiting): "
              f"{result['reason']}; "
              + ("the challenger stays loaded as challenger (rollout.on_inconclusive: keep)" if kept
                 else "the challenger is taken out of the routes (rollout.on_inconclusive: unload)"))
    decision = _decision("inconclusive", aliases.get("champion"), challenger, reason, steps=steps)
    decision["record"] = str(record(settings, decision))
    return decision


def _state_path(settings: Settings) -> Path:
    return settings.paths.var_dir / "rollout" / f"{settings.serve.triton.model_name}.json"


def _load_state(settings: Settings, run: str) -> dict[str, Any] | None:
    p = _state_path(settings)
    st = json.loads(p.read_text()) if p.is_file() else None
    return st if st and st.get("run") == run else None


def _save_state(settings: Settings, state: dict[str, Any]) -> None:
    write_json(_state_path(settings), state)


def _end(settings: Settings, decision: dict[str, Any]) -> dict[str, Any]:
    _state_path(settings).unlink(missing_ok=True)
    return decision


def _begin(settings: Settings, run: str, phase: str, previous: dict[str, Any] | None,
           now: dt.datetime) -> dict[str, Any] | None:
    """Start `phase` of rollout `run`: its traffic and its state; a decision or outcome when there is
    nothing to wait for (no champion, no shadow)."""
    cfg = settings.rollout
    aliases = read_aliases(settings.paths.triton_repository, settings.serve.triton.model_name)
    if "challenger" not in aliases:
        raise InputError(f"no challenger to roll out (aliases.json: {aliases}); export one first")
    if "champion" not in aliases:
        if phase == "shadow":
            return {"action": "continue", "phase": "shadow", "verdict": "skipped",
                    "reason": "no champion to mirror"}
        return _end(settings, promote(settings, {"reason": "first champion: no model was serving"}))
    if phase == "shadow" and cfg.shadow_percent <= 0:
        return {"action": "continue", "phase": "shadow", "verdict": "skipped",
                "reason": "rollout.shadow_percent is 0"}
    if phase == "shadow":
        set_traffic(settings, 0.0, shadow_percent=cfg.shadow_percent)
    else:
        set_traffic(settings, cfg.steps[0])
    steps = (previous or {}).get("steps", [])
    _save_state(settings, {"run": run, "phase": phase, "step": 0, "champion": aliases["champion"],
                           "challenger": aliases["challenger"], "started": now.isoformat(),
                           "deadline": (now + dt.timedelta(seconds=cfg.deadline_s)).isoformat(),
                           "steps": steps, "baseline": asdict(Sample())})
    log.info("rollout %s: %s phase of v%s against champion v%s started", run, phase, aliases["challenger"],
             aliases["champion"])
    return None


def poll(settings: Settings, run: str, phase: str, now: dt.datetime | None = None,
         on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
    """One look at rollout `run`'s `phase` ("shadow" or "canary"); None while it waits.

    The first call starts the phase. Once its window has passed, every call judges everything since the
    step began: a verdict ends the step (the shadow's pass returns {"action": "continue"}; a canary step's
    pass moves to the next share, the last one promotes; a fail rolls back); "wait" (too few requests or
    pairs) keeps waiting until the step's deadline (`rollout.deadline_s`), then `inconclusive()`.
    The state lives in var/rollout/<model>.json, so the caller may be a process that comes and goes: an
    Airflow sensor in reschedule mode holds no worker slot between looks."""
    cfg = settings.rollout
    now = now or dt.datetime.now(dt.UTC)
    st = _load_state(settings, run)
    if st is None or st["phase"] != phase:
        return _begin(settings, run, phase, st, now)
    started = dt.datetime.fromisoformat(st["started"])
    window = cfg.shadow_window_s if phase == "shadow" else cfg.window_s
    if now < started + dt.timedelta(seconds=window):
        return None
    if phase == "shadow":
        result = shadow_report(settings, started, now)
        step = {"share": 0.0, **result}
    else:
        share = cfg.steps[st["step"]]
        result = analyze(settings, started, now, baseline=Sample(**st["baseline"]))
        champ = result.pop("_champion")
        step = {"share": share, **result}
    if result["verdict"] == "wait":
        if now < dt.datetime.fromisoformat(st["deadline"]):
            log.info("rollout %s: %s waits: %s", run, phase, result["reason"])
            return None
        return _end(settings, inconclusive(settings, result, [*st["steps"], step]))
    steps = [*st["steps"], step]
    if on_step:
        on_step(step)
    log.info("rollout %s: %s at %s%%: %s (%s)", run, phase, step["share"], result["verdict"],
             result["reason"])
    if phase == "shadow":
        set_traffic(settings, 0.0)  # mirroring ends with the phase
        if result["verdict"] == "fail":
            return _end(settings, rollback(settings, f"shadow: {result['reason']}", {"steps": steps}))
        _save_state(settings, {**st, "phase": "shadow-passed", "steps": steps})
        return {"action": "continue", **step}
    if result["verdict"] == "fail":
        return _end(settings, rollback(settings, f"canary at {step['share']}%: {result['reason']}",
                                       {"steps": steps}))
    b = st["baseline"]
    baseline = Sample(b["latencies_ms"] + champ.latencies_ms, b["requests"] + champ.requests,
                      b["errors"] + champ.errors, b["safety_hits"] + champ.safety_hits)
    if st["step"] + 1 == len(cfg.steps):
        return _end(settings, promote(settings, {"reason": "every canary step passed", "steps": steps}))
    set_traffic(settings, cfg.steps[st["step"] + 1])
    _save_state(settings, {**st, "step": st["step"] + 1, "started": now.isoformat(), "steps": steps,
                           "deadline": (now + dt.timedelta(seconds=cfg.deadline_s)).isoformat(),
                           "baseline": asdict(baseline)})
    return None


def _drive(settings: Settings, phase: str, run: str, sleep: Callable[[float], None],
           on_step: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    """poll() until the phase has an outcome, sleeping in between (the CLI's way; Airflow reschedules)."""
    window = settings.rollout.shadow_window_s if phase == "shadow" else settings.rollout.window_s
    while (out := poll(settings, run, phase, on_step=on_step)) is None:
        sleep(min(window, settings.rollout.poll_s))
    return out


def shadow(settings: Settings, sleep: Callable[[float], None] = time.sleep,
           on_step: Callable[[dict[str, Any]], None] | None = None, run: str | None = None) -> dict[str, Any]:
    """The shadow phase: mirror `rollout.shadow_percent` of the champion's requests to the challenger
    and judge the pairs once the window has passed (waiting for more while too few came in, up to the
    deadline). A failing shadow rolls the challenger back; no evidence by the deadline is `inconclusive`.
    Returns the shadow step with "action": "continue" when the canary may go on."""
    return _drive(settings, "shadow", run or f"cli-{uuid.uuid4().hex[:12]}", sleep, on_step)


def canary(settings: Settings, sleep: Callable[[float], None] = time.sleep,
           on_step: Callable[[dict[str, Any]], None] | None = None,
           with_shadow: bool = True) -> dict[str, Any]:
    """The shadow phase (unless with_shadow is False: chat_deploy runs it as its own task), then the
    traffic steps; roll back on the first failure, promote at the end; a step without enough requests by
    its deadline ends the rollout `inconclusive` (traffic back to the champion) rather than guess."""
    run = f"cli-{uuid.uuid4().hex[:12]}"
    if with_shadow:
        first = shadow(settings, sleep, on_step, run)
        if first["action"] != "continue":
            return first
    return _drive(settings, "canary", run, sleep, on_step)


def drill(settings: Settings, version: int, delay_ms_per_token: float) -> dict[str, Any]:
    """Make a served version slower on purpose (drill.json in its directory, then reload), to rehearse
    the automatic roll-back; delay 0 removes the drill."""
    from tasks.serve import server
    from tasks.serve.repository import served_versions

    name = settings.serve.triton.model_name
    if version not in (served := served_versions(settings.paths.triton_repository, name)):
        raise InputError(f"version {version} is not in the Triton repository (served: {served})")
    p = settings.paths.triton_repository / name / str(version) / "drill.json"
    if delay_ms_per_token > 0:
        write_json(p, {"delay_ms_per_token": delay_ms_per_token})
    else:
        p.unlink(missing_ok=True)
    server.reload(settings, (name,))
    return {"version": version, "delay_ms_per_token": delay_ms_per_token}


def load_exported(settings: Settings, exported: dict[str, Any],
                  drill_delay_ms: float = 0.0) -> dict[str, Any]:
    """chat_deploy's `load`: (re)load an exported version in the running
    tritonserver; with `drill_delay_ms` > 0, slowed down on purpose so the rollout must roll it back.
    Without a server here, nothing is loaded (`llmops serve` loads every exported version when it
    starts)."""
    from tasks.procs import alive
    from tasks.serve import server

    if not alive(settings, "tritonserver"):
        log.info("tritonserver is not running here; "
                 "`llmops serve` starts it with every exported version loaded")
        return {**exported, "loaded": False}
    if drill_delay_ms > 0:  # writes drill.json beside the version, then reloads
        log.info("roll-back drill: version %s is %s ms slower per token: %s", exported["version"],
                 drill_delay_ms, drill(settings, exported["version"], drill_delay_ms))
    else:
        server.reload(settings, (exported["model"],))
    return {**exported, "loaded": True}


def shadow_step(settings: Settings, smoked: dict[str, Any], run: str) -> dict[str, Any] | None:
    """chat_deploy's `shadow` (a sensor): one poll() of the shadow phase, unless nothing is served here;
    None while it waits, else its outcome, small enough for XCom."""
    if smoked.get("skipped"):
        return {"action": "none", "reason": "no server running"}
    out = poll(settings, run, "shadow",
               on_step=lambda step: log.info("shadow: %s", json.dumps(step, default=str)))
    if out is None:
        return None
    log.info("shadow verdict: %s",
             json.dumps({k: v for k, v in out.items() if k not in ("evidence", "checks")}, default=str))
    return {k: out.get(k)
            for k in ("action", "verdict", "champion", "challenger", "reason", "report", "record")}


def canary_step(settings: Settings, shadowed: dict[str, Any], run: str) -> dict[str, Any] | None:
    """chat_deploy's `canary` (a sensor): one poll() of the traffic steps after a shadow that let the
    rollout go on; None while it waits, else the decision."""
    if shadowed["action"] != "continue":  # no server, or the shadow already rolled back
        log.info("no canary: %s: %s", shadowed["action"], shadowed["reason"])
        return {k: shadowed.get(k) for k in ("action", "champion", "challenger", "reason", "record")}
    decision = poll(settings, run, "canary",
                    on_step=lambda step: log.info("canary step: %s", json.dumps(step)))
    if decision is None:
        return None
    log.info("rollout decision: %s", json.dumps({k: v for k, v in decision.items() if k != "evidence"}))
    return {k: decision.get(k) for k in ("action", "champion", "challenger", "reason", "record")}
