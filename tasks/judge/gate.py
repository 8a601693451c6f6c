"""The composite promotion gate: absolute bounds per metric and allowed regression vs the champion.

    result = evaluate_gate(metrics, settings.eval.gate, champion_metrics)   # champion may be None
    result["passed"], [c["reason"] for c in result["checks"]]

With no champion, only the absolute bounds apply. Every check says why it passed or failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tasks.config import GateRule


def check(rule: GateRule, value: float | None, champion: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {"metric": rule.metric, "value": value, "champion": champion, "passed": True,
                           "reason": "ok"}

    def fail(reason: str) -> dict[str, Any]:
        out.update(passed=False, reason=reason)
        return out

    if value is None:
        return fail(f"{rule.metric} missing from the evaluation")
    if rule.min is not None and value < rule.min:
        return fail(f"{rule.metric}={value:.4g} below the minimum {rule.min:g}")
    if rule.max is not None and value > rule.max:
        return fail(f"{rule.metric}={value:.4g} above the maximum {rule.max:g}")
    if champion is not None and rule.max_regression is not None:
        if rule.better == "lower":
            limit = champion * (1 + rule.max_regression)
            if value > limit:
                return fail(f"{rule.metric}={value:.4g} worse than champion {champion:.4g} by more than "
                            f"{rule.max_regression:.0%} (limit {limit:.4g})")
        else:
            limit = champion - rule.max_regression
            if value < limit:
                return fail(f"{rule.metric}={value:.4g} worse than champion {champion:.4g} by more than "
                            f"{rule.max_regression:g} (limit {limit:.4g})")
        out["reason"] = f"within {rule.max_regression:g} of champion {champion:.4g}"
    elif champion is None:
        out["reason"] = "within absolute bounds (no champion)"
    return out


def evaluate_gate(metrics: dict[str, float], rules: Sequence[GateRule],
                  champion: dict[str, float] | None) -> dict[str, Any]:
    checks = [check(r, metrics.get(r.metric), (champion or {}).get(r.metric)) for r in rules]
    failed = [c for c in checks if not c["passed"]]
    return {"passed": not failed, "checks": checks, "against_champion": champion is not None,
            "reason": "; ".join(c["reason"] for c in failed) if failed else "all checks passed"}
