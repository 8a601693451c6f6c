"""Latency by phase: where served requests spent their time, from the gateway's request logs.

    llmops latency                      # reports/latency/<UTC time>/latency.json + latency.png
    llmops latency --since-hours 1

Every answered request's log line carries `phases` (tasks/serve/gateway/metrics.py `phases`): the
gateway's own time (before sending to the model server and after its final answer), the network
(the round trip to Triton less the engine's time: gRPC, Triton's frontend), and the engine's queue,
prefill and decode. They sum to the request's `latency_ms`; the report says how closely (the
largest relative gap over the window).

At p50, p90 and p99 of the total latency the report shows the mean phases of the requests around
that percentile (a band of 5 % of the requests by rank, at least one): a stacked bar per percentile
whose height is that percentile's total, so one sees what a slow request is slow at. Per phase it
gives its own p50/p90/p99 as well.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np

from tasks.atomic import atomic_dir, write_json
from tasks.config import Settings
from tasks.errors import InputError
from tasks.loop.rollout import read_requests

PHASES = ("gateway_ms", "network_ms", "queue_ms", "prefill_ms", "decode_ms")
PERCENTILES = (50, 90, 99)


def breakdown(records: list[dict[str, Any]], band: float = 0.05) -> dict[str, Any]:
    """The phases of requests (log lines with `phases` and `latency_ms`) at p50/p90/p99 of the total."""
    rows = [r for r in records if isinstance(r.get("phases"), dict) and r.get("latency_ms") is not None
            and all(k in r["phases"] for k in PHASES)]
    if not rows:
        raise InputError("no request in the window has latency phases (the gateway logs them for answers "
                         "from a model exported with the engine)")
    rows.sort(key=lambda r: r["latency_ms"])
    total = np.array([r["latency_ms"] for r in rows], dtype=float)
    table = np.array([[r["phases"][k] for k in PHASES] for r in rows], dtype=float)
    gap = np.abs(table.sum(axis=1) - total) / np.maximum(total, 1e-9)
    half = max(0, int(len(rows) * band / 2))
    at = {}
    for q in PERCENTILES:
        i = min(len(rows) - 1, int(round(q / 100 * (len(rows) - 1))))
        lo, hi = max(0, i - half), min(len(rows), i + half + 1)
        at[f"p{q}"] = {"total_ms": round(float(np.percentile(total, q)), 3), "requests": hi - lo,
                       **{k: round(float(table[lo:hi, j].mean()), 3) for j, k in enumerate(PHASES)}}
    return {"requests": len(rows), "at": at,
            "per_phase": {k: {f"p{q}": round(float(np.percentile(table[:, j], q)), 3) for q in PERCENTILES}
                          for j, k in enumerate(PHASES)},
            "sum_gap": {"max": round(float(gap.max()), 4), "p99": round(float(np.percentile(gap, 99)), 4)}}


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(report["at"])
    bottom = np.zeros(len(names))
    for k in PHASES:
        vals = np.array([report["at"][n][k] for n in names])
        ax.bar(names, vals, bottom=bottom, label=k[:-3])
        bottom += vals
    for i, n in enumerate(names):
        ax.text(i, bottom[i], f"{report['at'][n]['total_ms']:.0f} ms", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("ms")
    ax.set_title(f"Latency by phase: {report['requests']} requests, {report['window']['since'][:16]} to "
                 f"{report['window']['until'][:16]} UTC", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def latency_report(settings: Settings, since_hours: float = 24.0,
                   now: dt.datetime | None = None) -> dict[str, Any]:
    """Read the window's request logs and write reports/latency/<UTC time>/latency.json and .png."""
    now = now or dt.datetime.now(dt.UTC)
    since = now - dt.timedelta(hours=since_hours)
    report = {"window": {"since": since.isoformat(), "until": now.isoformat(), "hours": since_hours},
              **breakdown(read_requests(settings, since, now))}
    out = settings.paths.reports_dir / "latency" / now.strftime("%Y%m%dT%H%M%SZ")
    with atomic_dir(out) as tmp:
        write_json(tmp / "latency.json", report)
        _plot(report, tmp / "latency.png")
    report["files"] = {"json": str(out / "latency.json"), "png": str(out / "latency.png")}
    return report


def summary(report: dict[str, Any]) -> dict[str, Any]:
    return {"requests": report["requests"], "at": report["at"], "sum_gap": report["sum_gap"],
            "report": report["files"]}
