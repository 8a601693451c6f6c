"""The runtime safety filter on prompts and replies (configured rules, then the packaged classifier),
and its error rates measured on a labelled set.

    f = SafetyFilter(settings.serve.safety)
    v = f.check("some text")      # Verdict(blocked=False, rule=None, score=0.02)
    f.version                     # "2026.11.1+3fa2c1d0": configured version + hash of rules, threshold
    m = measure(f, load_labelled(settings.serve.safety.labelled_set))
    m["held_out"]["combined"]     # {"fp_rate": .., "fn_rate": .., "fp": k, "benign": n, "fp_ci95": [lo, hi]}
    calibrate(settings)           # `llmops safety-calibrate`: choose_threshold() for target_fn_rate
    choose_threshold(settings.serve.safety, items)  # the highest threshold whose FN rate meets target_fn_rate

The version goes out on every gateway response (X-Safety-Version) and into every request log
line, so a verdict can always be traced to the rules that made it. The gateway (serve) and the
evaluation and gate (judge) both use this module, so it sits in its own layer below them.

The labelled set (configs/eval/safety_labelled.jsonl) is split by a stable hash of each text:
70 % calibration (the threshold is chosen there), 30 % held out (the rates reported are measured there).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tasks.config import PROJECT_DIR, SafetyConfig, Settings
from tasks.errors import InputError

PARTS = ("rules", "classifier", "combined")
CALIBRATION_SHARE = 7  # of 10 hash buckets


class SafetyError(InputError):
    """The labelled safety set is missing or malformed, or no threshold meets the target."""


@dataclass(frozen=True)
class Verdict:
    blocked: bool
    rule: str | None  # "pattern:<i>" or "classifier"
    score: float      # the classifier's score (0..1)

    def to_dict(self) -> dict:
        return asdict(self)


class SafetyFilter:
    def __init__(self, cfg: SafetyConfig):
        self.cfg = cfg
        self.threshold = cfg.classifier_threshold
        self.patterns = [re.compile(p, re.IGNORECASE) for p in cfg.blocked_patterns]
        rules = json.dumps({"patterns": list(cfg.blocked_patterns), "threshold": cfg.classifier_threshold,
                            "classifier": "alt-profanity-check"}, sort_keys=True)
        self.version = f"{cfg.version}+{hashlib.sha256(rules.encode()).hexdigest()[:8]}"

    def rule_hit(self, text: str) -> int | None:
        """The index of the first pattern that matches, or None."""
        return next((i for i, pat in enumerate(self.patterns) if pat.search(text)), None)

    def check(self, text: str) -> Verdict:
        from tasks.model.encoders import toxicity_scores

        score = toxicity_scores([text])[0] if text.strip() else 0.0
        hit = self.rule_hit(text)
        if hit is not None:
            return Verdict(True, f"pattern:{hit}", score)
        if score >= self.threshold:
            return Verdict(True, "classifier", score)
        return Verdict(False, None, score)


# ---- the labelled set -------------------------------------------------------------------------------

def split_of(text: str) -> str:
    """'calibration' or 'held_out', from a stable hash of the text (the same on every machine and run)."""
    bucket = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 10
    return "calibration" if bucket < CALIBRATION_SHARE else "held_out"


def load_labelled(path: Path | str) -> list[dict[str, str]]:
    """The labelled set's rows, each with its split; a malformed line fails naming file and line."""
    path = Path(path)
    path = path if path.is_absolute() else PROJECT_DIR / path
    if not path.is_file():
        raise SafetyError(f"{path}: labelled safety set missing (serve.safety.labelled_set); "
                          "rebuild it with configs/eval/build_safety_labelled.py")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise SafetyError(f"{path}:{n}: not JSON ({e.msg})") from None
        for key, allowed in (("text", None), ("kind", ("prompt", "reply")), ("label", ("harmful", "benign")),
                             ("category", None)):
            if not isinstance(r.get(key), str) or not r[key] or (allowed and r[key] not in allowed):
                raise SafetyError(f"{path}:{n}: key {key!r} must be "
                                  + (" or ".join(allowed) if allowed else "a non-empty string"))
        rows.append({**r, "split": split_of(r["text"])})
    return rows


# ---- the rates --------------------------------------------------------------------------------------

def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95 % interval of k successes in n trials ((0, 1) when n is 0)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def error_rates(labels: Sequence[str], blocked: Sequence[bool]) -> dict[str, Any]:
    """False positives (benign blocked) over benign items, false negatives (harmful passed) over harmful."""
    fp = sum(b for lab, b in zip(labels, blocked, strict=True) if lab == "benign")
    fn = sum(not b for lab, b in zip(labels, blocked, strict=True) if lab == "harmful")
    nb, nh = sum(lab == "benign" for lab in labels), sum(lab == "harmful" for lab in labels)
    return {"fp": fp, "benign": nb, "fp_rate": fp / nb if nb else 0.0, "fp_ci95": list(wilson(fp, nb)),
            "fn": fn, "harmful": nh, "fn_rate": fn / nh if nh else 0.0, "fn_ci95": list(wilson(fn, nh))}


def _decisions(f: SafetyFilter, items: Sequence[dict[str, str]],
               threshold: float | None = None) -> dict[str, list[bool]]:
    """Each part's verdict on each item: the rules alone, the classifier alone, both (as check() decides)."""
    from tasks.model.encoders import toxicity_scores

    t = f.threshold if threshold is None else threshold
    scores = toxicity_scores([r["text"] for r in items])  # one batch: cheap for a few hundred texts
    rules = [f.rule_hit(r["text"]) is not None for r in items]
    clf = [s >= t for s in scores]
    return {"rules": rules, "classifier": clf, "combined": [a or b for a, b in zip(rules, clf, strict=True)]}


def measure(f: SafetyFilter, items: Sequence[dict[str, str]]) -> dict[str, Any]:
    """FP/FN rates (counts, Wilson 95 % intervals) of the rules, the classifier and the combined filter,
    on each split and on all items, for this filter version."""
    decided = _decisions(f, items)
    out: dict[str, Any] = {"version": f.version, "threshold": f.threshold, "items": len(items)}
    for split in ("calibration", "held_out", "all"):
        idx = [i for i, r in enumerate(items) if split == "all" or r["split"] == split]
        labels = [items[i]["label"] for i in idx]
        out[split] = {part: error_rates(labels, [decided[part][i] for i in idx]) for part in PARTS}
    return out


def metrics_of(m: dict[str, Any]) -> dict[str, float]:
    """The eval report's flat metrics from a measurement: held-out rates, combined and per part."""
    held = m["held_out"]
    out = {"safety_fp_rate": held["combined"]["fp_rate"], "safety_fn_rate": held["combined"]["fn_rate"]}
    for part in ("rules", "classifier"):
        out[f"safety_{part}_fp_rate"] = held[part]["fp_rate"]
        out[f"safety_{part}_fn_rate"] = held[part]["fn_rate"]
    return out


def choose_threshold(cfg: SafetyConfig, items: Sequence[dict[str, str]]) -> dict[str, Any]:
    """The highest classifier threshold at which the combined filter's FN rate on the calibration split is
    at most cfg.target_fn_rate, the FP rate that costs, and the filter version it makes."""
    from tasks.model.encoders import toxicity_scores

    cal = [r for r in items if r["split"] == "calibration"]
    if not any(r["label"] == "harmful" for r in cal) or not any(r["label"] == "benign" for r in cal):
        raise SafetyError("the calibration split needs harmful and benign items (serve.safety.labelled_set)")
    f = SafetyFilter(cfg)
    scores = toxicity_scores([r["text"] for r in cal])
    rules = [f.rule_hit(r["text"]) is not None for r in cal]
    labels = [r["label"] for r in cal]
    # candidates: just at or below each harmful score the rules miss (floored to 4 places so the
    # configured value still blocks it), highest first; the first that meets the target is the answer
    missed = {math.floor(s * 1e4) / 1e4 for s, hit, lab in zip(scores, rules, labels, strict=True)
              if lab == "harmful" and not hit}
    candidates = sorted({0.9999, *missed} - {0.0}, reverse=True)
    for t in candidates:
        blocked = [hit or s >= t for s, hit in zip(scores, rules, strict=True)]
        rates = error_rates(labels, blocked)
        if rates["fn_rate"] <= cfg.target_fn_rate:
            chosen = cfg.model_copy(update={"classifier_threshold": t})
            return {"threshold": t, "target_fn_rate": cfg.target_fn_rate,
                    "version": SafetyFilter(chosen).version,
                    "calibration": rates, "set_override": f"serve.safety.classifier_threshold={t}"}
    best = candidates[-1]
    rates = error_rates(labels, [hit or s >= best for s, hit in zip(scores, rules, strict=True)])
    raise SafetyError(f"no classifier threshold in (0, 1) gives a calibration FN rate <= "
                      f"serve.safety.target_fn_rate={cfg.target_fn_rate}; the lowest reachable is "
                      f"{rates['fn_rate']:.3f} at {best} "
                      "(the rules and the classifier miss the rest): raise the target or add rules")


def calibrate(settings: Settings) -> dict[str, Any]:
    """`llmops safety-calibrate`: the configured filter's rates, the threshold the target FN rate asks for
    and that filter's held-out rates, written to reports/safety/calibration.json."""
    from tasks.atomic import write_json

    cfg = settings.serve.safety
    items = load_labelled(cfg.labelled_set)
    chosen = choose_threshold(cfg, items)
    proposed = SafetyFilter(cfg.model_copy(update={"classifier_threshold": chosen["threshold"]}))
    out = {"configured": measure(SafetyFilter(cfg), items), "chosen": chosen,
           "proposed": measure(proposed, items)}
    path = settings.paths.reports_dir / "safety" / "calibration.json"
    write_json(path, out)
    rates = ("fp_rate", "fn_rate")
    return {"path": str(path), "configured_version": out["configured"]["version"],
            "configured_held_out": {p: {k: out["configured"]["held_out"][p][k] for k in rates}
                                    for p in PARTS},
            **{k: chosen[k] for k in ("threshold", "target_fn_rate", "version", "set_override")},
            "proposed_held_out": {k: out["proposed"]["held_out"]["combined"][k] for k in rates}}
