"""What the gateway records: its Prometheus metrics (served at GET /metrics) and the request log
(one JSON line per request, PII scrubbed)."""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any


class Metrics:
    """The gateway's Prometheus metrics, in a registry of its own (what GET /metrics serves)."""

    def __init__(self, window_s: float, cost_per_hour: float):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        lat = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.requests = Counter("gateway_requests", "Chat completion requests by model and HTTP status",
                                ["model", "status"], registry=r)
        self.latency = Histogram("gateway_request_latency_seconds", "Request latency", ["model"], buckets=lat,
                                 registry=r)
        self.ttft = Histogram("gateway_ttft_seconds", "Time to first token", ["model"], buckets=lat,
                              registry=r)
        self.tokens = Counter("gateway_tokens", "Tokens by kind", ["model", "kind"], registry=r)
        self.phase = Histogram(
            "gateway_phase_seconds", "Where a request's time went: gateway (before sending to the model "
            "server and after its final answer), network (to the model server and back, Triton's own "
            "handling), and the engine's queue, prefill and decode", ["model", "phase"],
            buckets=(0.0005, 0.001, 0.0025, *lat), registry=r)
        self.batch = Histogram("gateway_triton_batch_size", "Size of the Triton batch a request ran in",
                               buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.queue = Gauge("gateway_queue_depth", "Requests waiting for a slot", registry=r)
        self.inflight = Gauge("gateway_inflight", "Requests at the model server", registry=r)
        self.tps = Gauge("gateway_tokens_per_second",
                         f"Completion tokens per second over the last {window_s:.0f}s", registry=r)
        self.cost = Gauge("gateway_cost_per_million_tokens_usd",
                          "Serving cost per 1M completion tokens at the measured throughput", registry=r)
        self.safety = Counter("gateway_safety_blocked", "Requests the safety filter blocked",
                              ["stage", "rule"], registry=r)
        self.safety_error = Gauge("gateway_safety_error_rate", "The safety filter's false positive (kind=fp) "
                                  "and false negative (kind=fn) rate on the labelled set's held-out split, "
                                  "per part (rules, classifier, combined), measured at gateway start",
                                  ["kind", "part", "version"], registry=r)
        self.rejected = Counter("gateway_rejected", "Requests refused before inference", ["reason"],
                                registry=r)
        self.shadow = Counter("gateway_shadow_requests", "Requests mirrored to the challenger, by outcome",
                              ["outcome"], registry=r)
        self.cancelled = Counter("gateway_cancelled_streams", "Streams cancelled at the model server before "
                                 "their end (the client went away, a stop string, an error)", registry=r)
        self.coalesced = Counter("gateway_coalesced_requests", "Requests answered by an identical request's "
                                 "inference already in flight (no inference of their own)", registry=r)
        self.routes = Counter("gateway_route", "Requests by the tier they were routed to and the kind of "
                              "reason (header, model, light, heavy, small-tier-not-served, routing-disabled)",
                              ["tier", "reason_kind"], registry=r)
        self.window_s, self.cost_per_hour = window_s, cost_per_hour
        self._recent: deque[tuple[float, int]] = deque()

    def completed(self, tokens: int) -> None:
        now = time.monotonic()
        self._recent.append((now, tokens))
        while self._recent and now - self._recent[0][0] > self.window_s:
            self._recent.popleft()
        span = max(now - self._recent[0][0], 1.0)
        tps = sum(n for _, n in self._recent) / span
        self.tps.set(tps)
        if tps > 0:
            self.cost.set(self.cost_per_hour / (tps * 3600) * 1e6)


class RequestLog:
    """One JSON line per request under data/requests/dt=YYYY-MM-DD/, PII scrubbed as in ingest; session
    and user ids only as keyed pseudonyms (tenancy.Pseudonyms), which is what `forget` matches.

    Each write holds an exclusive flock on its file, and `forget` rewrites a file (atomically, under
    the same lock) without the lines it removes; a writer that finds its file replaced reopens it,
    so no line is lost between the two, whichever gateway process wrote the file."""

    def __init__(self, root: Path, enabled: bool, pii_kinds: tuple[str, ...]):
        self.root, self.enabled, self.pii_kinds = root, enabled, pii_kinds
        self._file = None
        self._path: Path | None = None

    def scrub(self, text: str) -> str:
        from tasks.data.text import scrub_pii

        return scrub_pii(text, self.pii_kinds, Counter())

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        now = dt.datetime.now(dt.UTC)
        path = self.root / f"dt={now.strftime('%Y-%m-%d')}" / f"gateway-{os.getpid()}.jsonl"
        line = json.dumps({"ts": now.isoformat(), **record}, ensure_ascii=False) + "\n"
        while True:
            if path != self._path or self._file is None:
                self.close()
                path.parent.mkdir(parents=True, exist_ok=True)
                self._file, self._path = open(path, "a", encoding="utf-8"), path  # noqa: SIM115
            fcntl.flock(self._file, fcntl.LOCK_EX)
            try:
                if _replaced(self._file, path):  # `forget` rewrote it since it was opened: use the new one
                    self.close()
                    continue
                self._file.write(line)
                self._file.flush()
                return
            finally:
                if self._file is not None:
                    fcntl.flock(self._file, fcntl.LOCK_UN)

    def forget(self, match: dict[str, set[str]]) -> int:
        """Remove every line in which some field of `match` holds one of its values, from every
        partition; returns how many lines went."""
        from tasks.atomic import atomic_file

        removed = 0
        for path in sorted(self.root.glob("dt=*/*.jsonl")):
            with open(path, "a", encoding="utf-8") as held:
                fcntl.flock(held, fcntl.LOCK_EX)  # writers wait; the lock goes with the old file
                if _replaced(held, path):
                    continue  # rewritten meanwhile by another `forget`, which saw the same lines
                lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
                keep = [x for x in lines if not _matches(x, match)]
                if len(keep) == len(lines):
                    continue
                with atomic_file(path) as tmp:
                    tmp.write_text("".join(keep), encoding="utf-8")
                removed += len(lines) - len(keep)
        return removed

    def close(self) -> None:
        if self._file:
            self._file.close()
        self._file = self._path = None


def _replaced(f, path: Path) -> bool:
    try:
        return os.fstat(f.fileno()).st_ino != os.stat(path).st_ino
    except FileNotFoundError:
        return True


def _matches(line: str, match: dict[str, set[str]]) -> bool:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return False  # a torn last line: kept as it is
    return isinstance(rec, dict) and any(rec.get(k) in v for k, v in match.items())


PHASES = ("gateway_ms", "network_ms", "queue_ms", "prefill_ms", "decode_ms")


def phases(total_ms: float, out: dict[str, Any]) -> dict[str, float] | None:
    """A request's latency by phase (the seed's L_total = L_network + L_queue + L_prefill + L_decode,
    with the gateway's own time beside them): `out` is the final answer with the model server's round
    trip (`server_ms`) and the engine's phases (`engine`). gateway = before sending + after the answer;
    network = the round trip less the engine's phases. The gateway's intervals partition its own
    timeline exactly; the engine's phases are measured by the model server's clock, so `network` is
    where the two meet: never negative when they agree (it is not clamped, so a disagreement shows).
    None when the answer has no engine phases."""
    engine, server = out.get("engine"), out.get("server_ms")
    if not engine or server is None:
        return None
    in_engine = engine["queue_ms"] + engine["prefill_ms"] + engine["decode_ms"]
    return {"gateway_ms": round(total_ms - server, 3),
            "network_ms": round(server - in_engine, 3),
            **{k: round(engine[k], 3) for k in ("queue_ms", "prefill_ms", "decode_ms")}}
