"""The model tiers side by side: fp32, int8, int4 and the distilled student, one table and one plot.

    from tasks.judge.tiers import tiers_report
    tiers_report(settings, {"fp32": ev, "int8": q8, "int4": q4, "distilled": ev_student},
                 model_bytes={"fp32": 4_208_405, "int4": 1_559_525})
    python bench/tiers.py          # trains, quantizes and distills the tiny model, then writes this report

The evaluations are tasks.judge.evaluate.evaluate()'s dicts (tasks.judge.quantize.evaluate_variant's for the
quantized tiers), keyed by tier name; any subset. Writes reports/eval/<run>-tiers/{tiers.json,report.html}:
quality (perplexity, ROUGE-L, embedding similarity, toxicity, factuality), speed (tokens/s at batch 1
and 8, p99 latency), memory and serving cost per 1M generated tokens
(serve.gateway.cost_per_hour_usd / 3600 / tokens_per_s_b8 * 1e6), each also as a ratio to fp32.
Speed ratios mean something only between evaluations run on the same machine at the same time:
bench/tiers.py evaluates every tier in one run for that reason.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

from tasks.atomic import atomic_file, write_json
from tasks.config import Settings
from tasks.errors import InputError

log = logging.getLogger(__name__)

ORDER = ("fp32", "int8", "int4", "distilled")
# (key, label, better); cost and memory are derived, the rest are evaluate()'s metrics
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("perplexity", "perplexity", "lower"),
    ("rouge_l", "ROUGE-L", "higher"),
    ("embedding_similarity", "embedding similarity", "higher"),
    ("toxicity_rate", "toxicity rate", "lower"),
    ("factuality_fuzzy", "factuality (fuzzy)", "higher"),
    ("tokens_per_s_b1", "tokens/s, batch 1", "higher"),
    ("tokens_per_s_b8", "tokens/s, batch 8", "higher"),
    ("latency_p99_ms_b1", "p99 latency, batch 1 (ms)", "lower"),
    ("memory_mb", "memory (MB)", "lower"),
    ("cost_per_1m_tokens_usd", "$ per 1M tokens", "lower"),
)


class TiersError(InputError):
    """The tiers report has nothing to compare."""


def _bytes_of(tier: str, ev: dict[str, Any], given: dict[str, int],
              evaluations: dict[str, dict[str, Any]]) -> int | None:
    """A tier's model bytes: given, else what its evaluation recorded (evaluate_variant records its own
    and its parent's), else measured from its weights directory and recipe, else unknown."""
    if tier in given:
        return int(given[tier])
    if ev.get("model_bytes") is not None:
        return int(ev["model_bytes"])
    if tier == "fp32":
        for other in evaluations.values():
            for cmp in (other.get(v) for v in ("int8", "int4")):
                if (isinstance(cmp, dict) and "fp32_bytes" in cmp
                        and other.get("weights") == ev.get("weights")):
                    return int(cmp["fp32_bytes"])
    weights = Path(str(ev.get("weights", "")))
    if (weights / "model.safetensors").is_file():
        from tasks.judge.evaluate import load_chat_model
        from tasks.judge.quantize import apply_recipe, model_bytes

        model, _, _ = load_chat_model(weights)
        return model_bytes(apply_recipe(model, ev.get("recipe") or {"variant": "fp32"}))
    return None


def tier_rows(settings: Settings, evaluations: dict[str, dict[str, Any]],
              model_bytes: dict[str, int] | None = None) -> tuple[dict[str, dict[str, float | None]],
                                                                   dict[str, dict[str, float | None]]]:
    """({tier: {column: value}}, {tier: {column: value / fp32's}}); a ratio is None without an fp32 tier or
    where fp32's value is 0 (e.g. a toxicity rate of 0)."""
    cost_h = settings.serve.gateway.cost_per_hour_usd
    values: dict[str, dict[str, float | None]] = {}
    for tier, ev in evaluations.items():
        m = ev.get("metrics")
        if not isinstance(m, dict):
            raise TiersError(f"evaluation of tier {tier!r} has no 'metrics': "
                             "pass tasks.judge.evaluate.evaluate()'s result")
        b = _bytes_of(tier, ev, model_bytes or {}, evaluations)
        tps8 = m.get("tokens_per_s_b8")
        row: dict[str, float | None] = {k: (float(m[k]) if m.get(k) is not None else None)
                                        for k, _, _ in COLUMNS}
        row["memory_mb"] = None if b is None else b / 1e6
        row["cost_per_1m_tokens_usd"] = cost_h / 3600 / tps8 * 1e6 if tps8 else None
        values[tier] = row
    base = values.get("fp32")
    ratios = {tier: {k: (v / base[k] if base is not None and v is not None and base.get(k) else None)
                     for k, v in row.items()} for tier, row in values.items()}
    return values, ratios


def _ordered(names) -> list[str]:
    return [t for t in ORDER if t in names] + sorted(t for t in names if t not in ORDER)


def _plot(values: dict[str, dict[str, float | None]]) -> str | None:
    """Quality against tokens/s at batch 8, one point per tier (base64 PNG), or None with no speeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.judge.evaluate import figure_png

    pts = {t: r for t, r in values.items() if r.get("tokens_per_s_b8")}
    if not pts:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, (key, label) in zip(axes, (("perplexity", "perplexity (lower is better)"),
                                       ("rouge_l", "ROUGE-L (higher is better)")), strict=True):
        for tier, r in pts.items():
            if r.get(key) is not None:
                ax.scatter(r["tokens_per_s_b8"], r[key], s=40)
                ax.annotate(tier, (r["tokens_per_s_b8"], r[key]), textcoords="offset points", xytext=(5, 4))
        ax.set_xlabel("tokens/s at batch 8")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    src = figure_png(fig)
    plt.close(fig)
    return src


def _render(result: dict[str, Any], plot: str | None) -> str:
    e = html.escape
    tiers = result["tiers"]

    def cell(tier: str, key: str) -> str:
        v, r = result["values"][tier][key], result["ratios"][tier][key]
        if v is None:
            return "<td>–</td>"
        ratio = "" if tier == "fp32" or r is None else f" <span class='r'>×{r:.3g}</span>"
        return f"<td>{v:.4g}{ratio}</td>"

    head = "".join(f"<th>{e(t)}</th>" for t in tiers)
    rows = "".join(f"<tr><td>{e(label)} <span class='r'>({better} is better)</span></td>"
                   f"{''.join(cell(t, key) for t in tiers)}</tr>" for key, label, better in COLUMNS)
    src = "".join(f"<tr><td>{e(t)}</td><td>{e(str(s.get('run_id')))}</td><td>{e(str(s.get('gate')))}</td>"
                  f"<td>{e(str(s.get('report') or ''))}</td></tr>" for t, s in result["sources"].items())
    img = f"<h2>Quality vs speed</h2><img src='{plot}'>" if plot else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Model tiers {e(result['run'])}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}.r{{color:#666;font-size:90%}}\
</style></head><body>
<h1>Model tiers of {e(result['run'])}</h1>
<p>Each value with its ratio to fp32 (×). $ per 1M generated tokens = serve.gateway.cost_per_hour_usd
(${result['cost_per_hour_usd']:g}/h) / 3600 / tokens/s at batch 8 × 10⁶. Speed ratios compare evaluations
run on the same machine in the same run.</p>
<table><tr><th>metric</th>{head}</tr>{rows}</table>
{img}
<h2>Evaluations</h2><table><tr><th>tier</th><th>evaluation</th><th>gate</th><th>report</th></tr>{src}</table>
</body></html>"""


def tiers_report(settings: Settings, evaluations: dict[str, dict[str, Any]],
                 out_dir: Path | str | None = None,
                 model_bytes: dict[str, int] | None = None) -> dict[str, Any]:
    """Write the tier comparison (default reports/eval/<fp32 run>-tiers/) and return what tiers.json holds."""
    if not evaluations:
        raise TiersError("tiers_report needs at least one evaluation (e.g. {'fp32': evaluate(...)})")
    tiers = _ordered(evaluations)
    values, ratios = tier_rows(settings, evaluations, model_bytes)
    run = str(evaluations["fp32" if "fp32" in evaluations else tiers[0]].get("run_id", "tiers"))
    out = Path(out_dir) if out_dir is not None else settings.paths.reports_dir / "eval" / f"{run}-tiers"
    sources = {t: {"run_id": evaluations[t].get("run_id"), "report": evaluations[t].get("report"),
                   "gate": (None if not evaluations[t].get("gate") else
                            "passed" if evaluations[t]["gate"]["passed"] else "failed"),
                   "recipe": evaluations[t].get("recipe")} for t in tiers}
    result = {"run": run, "tiers": tiers, "columns": [k for k, _, _ in COLUMNS],
              "values": {t: values[t] for t in tiers}, "ratios": {t: ratios[t] for t in tiers},
              "cost_per_hour_usd": settings.serve.gateway.cost_per_hour_usd, "sources": sources,
              "json": str(out / "tiers.json"), "report": str(out / "report.html")}
    write_json(out / "tiers.json", result)
    with atomic_file(out / "report.html") as tmp:
        tmp.write_text(_render(result, _plot(values)), encoding="utf-8")
    log.info("tiers %s: %s", ", ".join(tiers), json.dumps(
        {t: {k: round(v, 3) for k, v in ratios[t].items()
             if v is not None and k in ("perplexity", "tokens_per_s_b8", "memory_mb")}
         for t in tiers if t != "fp32"}))
    return result
