"""reports/index.html: one page linking every report the stages wrote, newest first.

    llmops reports            # (re)writes reports/index.html and prints what it links

Each stage writes its own report where it belongs (Great Expectations Data Docs per day, the
evaluation report per training run, the shadow report and the rollout decision records per
deploy, Evidently drift reports, cost reports, autoscale recommendations, serving tune reports,
the quarantine of rejected records). This page only finds them: nothing is copied, links are
relative, so the folder can be served or zipped as it is. `make run` writes it at the end;
`llmops reports` and `llmops status` refresh it.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
from pathlib import Path
from typing import Any

from tasks.atomic import atomic_file
from tasks.config import Settings

# (section, title, glob under the root, what it is); each glob's newest files first
KINDS: tuple[tuple[str, str, str, str], ...] = (
    ("data", "Data Docs", "reports/data_docs/dt=*/index.html", "Great Expectations validation of a day's "
     "clean partition"),
    ("data", "Quarantine", "data/quarantine/dt=*/rejects.jsonl", "rejected raw records of a day, verbatim, "
     "with file, line and reason"),
    ("data", "Validation results", "reports/validation/dt=*.json", "the suite's verdict per day (JSON)"),
    ("model", "Evaluation", "reports/eval/*/report.html", "perplexity, ROUGE-L, BLEU, embedding similarity, "
     "toxicity, factuality, latency; the gate"),
    ("model", "Evaluation (int8)", "reports/eval/*-int8/report.html", "the int8 tier against its "
     "fp32 parent"),
    ("model", "Evaluation (int4)", "reports/eval/*-int4/report.html", "the weight-only int4 tier against its "
     "fp32 parent"),
    ("model", "Model tiers", "reports/eval/*-tiers/report.html", "fp32, int8, int4, distilled side by side: "
     "quality, speed, memory, $ per 1M tokens"),
    ("rollout", "Shadow", "reports/shadow/*/shadow.html", "mirrored champion/challenger pairs: reply "
     "similarity, safety, latency"),
    ("rollout", "Rollout decisions", "reports/rollout/*.json", "promote / roll back / inconclusive, with the "
     "evidence of every window"),
    ("monitoring", "Drift", "reports/drift/*/report.html", "Evidently: served prompts vs the training "
     "corpus, SLOs"),
    ("monitoring", "Drift (embeddings)", "reports/drift/*/embeddings.html", "embedding drift of the prompts"),
    ("monitoring", "Cost", "reports/cost/*/cost.html", "$ per 1M tokens, training and serving, per version"),
    ("monitoring", "Autoscale", "reports/autoscale/recommendations.jsonl", "scale-out / scale-in "
     "recommendations with their signals"),
    ("monitoring", "Serving tune", "reports/tune/*/tune.png", "the engine's batch settings under load: "
     "throughput vs p99 per setting, the SLO, the chosen one and the default (tune.json, chosen.pbtxt "
     "beside it)"),
    ("monitoring", "Latency by phase", "reports/latency/*/latency.png", "gateway, network, queue, prefill "
     "and decode at p50/p90/p99 of served requests (latency.json beside it)"),
)
# the fp32 evaluation's glob also matches the quantized tiers' and the tier comparison's directories
SKIP = {"Evaluation": lambda p: p.parent.name.endswith(("-int8", "-int4", "-tiers"))}
SECTIONS = {"data": "Data", "model": "Models", "rollout": "Rollout", "monitoring": "Monitoring"}


def collect(settings: Settings, per_kind: int = 5) -> list[dict[str, Any]]:
    """Every report found, newest first within its kind: [{section, title, what, path, mtime}]."""
    root = settings.paths.root
    bases = {"reports": settings.paths.reports_dir, "data": settings.paths.data_dir}
    out = []
    for section, title, pattern, what in KINDS:
        top, rest = pattern.split("/", 1)
        skip = SKIP.get(title, lambda p: False)
        found = sorted((p for p in bases.get(top, root / top).glob(rest) if p.is_file() and not skip(p)),
                       key=lambda p: p.stat().st_mtime, reverse=True)
        for p in found[:per_kind]:
            out.append({"section": section, "title": title, "what": what, "path": p,
                        "mtime": dt.datetime.fromtimestamp(p.stat().st_mtime, dt.UTC)})
    return out


def latest(settings: Settings) -> dict[str, Path]:
    """{title: newest file} for each kind that has one."""
    out: dict[str, Path] = {}
    for r in collect(settings, per_kind=1):
        out.setdefault(r["title"], r["path"])
    return out


def write_index(settings: Settings, links: dict[str, str] | None = None) -> Path:
    """Write reports/index.html; `links` adds named URLs at the top (the Airflow and MLflow UIs)."""
    index = settings.paths.reports_dir / "index.html"
    index.parent.mkdir(parents=True, exist_ok=True)
    e = html.escape
    rows = collect(settings)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>llmops reports</title>"
             "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}td,th{padding:.2em .8em;"
             "text-align:left}tr:nth-child(even){background:#f4f4f4}.what{color:#555}</style></head><body>",
             "<h1>llmops reports</h1>",
             f"<p>Written {e(dt.datetime.now(dt.UTC).isoformat(timespec='seconds'))} from "
             f"{e(str(settings.paths.root))}; newest first.</p>"]
    if links:
        parts.append("<p>" + " · ".join(f"<a href='{e(u)}'>{e(n)}</a>" for n, u in links.items()) + "</p>")
    for section, heading in SECTIONS.items():
        mine = [r for r in rows if r["section"] == section]
        parts.append(f"<h2>{e(heading)}</h2>")
        if not mine:
            parts.append("<p class='what'>nothing yet</p>")
            continue
        parts.append("<table><tr><th>report</th><th>file</th><th>written (UTC)</th></tr>")
        for r in mine:
            rel = Path(os.path.relpath(r["path"], index.parent)).as_posix()
            parts.append(f"<tr><td title='{e(r['what'])}'>{e(r['title'])}</td>"
                         f"<td><a href='{e(rel)}'>{e(rel)}</a></td>"
                         f"<td>{r['mtime']:%Y-%m-%d %H:%M:%S}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    with atomic_file(index) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    return index


def summary(settings: Settings) -> dict[str, Any]:
    index = write_index(settings)
    return {"index": str(index), "latest": {k: str(v) for k, v in latest(settings).items()}}


def last_drift(settings: Settings) -> dict[str, Any] | None:
    """The newest drift verdict (reports/drift/<time>/verdict.json), if any."""
    last = last_drift_at(settings)
    return last[1] if last else None


def last_drift_at(settings: Settings) -> tuple[dt.datetime, dict[str, Any]] | None:
    """(when, verdict) of the newest drift check, when from its directory's UTC stamp."""
    verdicts = sorted(settings.paths.reports_dir.glob("drift/*/verdict.json"))
    if not verdicts:
        return None
    when = dt.datetime.strptime(verdicts[-1].parent.name, "%Y%m%dT%H%M%S").replace(tzinfo=dt.UTC)
    return when, json.loads(verdicts[-1].read_text())
