"""The runtime safety filter on prompts and replies: configured rules, then the packaged classifier.

    f = SafetyFilter(settings.serve.safety)
    v = f.check("some text")      # Verdict(blocked=False, rule=None, score=0.02)
    f.version                     # "2026.11.1+3fa2c1d0": configured version + hash of the rules

The version goes out on every gateway response (X-Safety-Version) and into every request log
line, so a verdict can always be traced to the rules that made it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass

from tasks.config import SafetyConfig


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
        self.patterns = [re.compile(p, re.IGNORECASE) for p in cfg.blocked_patterns]
        rules = json.dumps({"patterns": list(cfg.blocked_patterns), "threshold": cfg.classifier_threshold,
                            "classifier": "alt-profanity-check"}, sort_keys=True)
        self.version = f"{cfg.version}+{hashlib.sha256(rules.encode()).hexdigest()[:8]}"

    def check(self, text: str) -> Verdict:
        from tasks.model.encoders import toxicity_scores

        score = toxicity_scores([text])[0] if text.strip() else 0.0
        for i, pat in enumerate(self.patterns):
            if pat.search(text):
                return Verdict(True, f"pattern:{i}", score)
        if score >= self.cfg.classifier_threshold:
            return Verdict(True, "classifier", score)
        return Verdict(False, None, score)
