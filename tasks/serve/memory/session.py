"""`SessionMemory`: the service the gateway calls (remember, recall, forget) and the worker that
condenses, embeds and stores queued exchanges."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from tasks.config import MemoryConfig
from tasks.credentials import expand_env
from tasks.serve.memory.embedder import Embedder
from tasks.serve.memory.index import Index, LocalIndex, PostgresIndex
from tasks.serve.memory.queue import LocalQueue, RedisQueue
from tasks.serve.memory.records import Job, Memory, condense, exchange_hash, history_hashes

log = logging.getLogger("llmops.memory")


class SessionMemory:
    def __init__(self, cfg: MemoryConfig, pii_kinds: tuple[str, ...], registry=None,
                 clock: Callable[[], float] = time.time, run_worker: bool | None = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.cfg, self.pii_kinds, self.clock = cfg, pii_kinds, clock
        self.embedder = Embedder(cfg.embedding_model, cfg.query_cache)
        # ${NAME} in the URLs is a secret read here (tasks/credentials.py), never written in configs/
        self.queue = (RedisQueue(expand_env(cfg.queue, "serve.memory.queue"), cfg.max_pending) if cfg.queue
                      else LocalQueue(cfg.max_pending))
        self.index: Index | None = None
        self.run_worker = cfg.worker_in_gateway if run_worker is None else run_worker
        self._worker: asyncio.Task | None = None
        self._loading: asyncio.Task | None = None
        self._busy = 0
        r = registry or CollectorRegistry()
        self.m_recall = Histogram("gateway_memory_recall_seconds", "Time memory recall added to a request "
                                  "(query embedding and index search)",
                                  buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1), registry=r)
        self.m_recalled = Counter("gateway_memory_recalls",
                                  "Recalls by outcome (hit: a memory went into the prompt)", ["outcome"],
                                  registry=r)
        self.m_jobs = Counter("gateway_memory_jobs", "Exchanges for long-term memory by outcome", ["outcome"],
                              registry=r)
        self.m_lag = Histogram("gateway_memory_store_lag_seconds",
                               "From the reply to its memory in the index (off the request path)",
                               buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60), registry=r)
        self.m_session_bytes = Histogram("gateway_memory_session_bytes",
                                         "Long-term memory bytes of a session, observed at each write",
                                         buckets=(1e3, 4e3, 16e3, 64e3, 256e3, 1e6, 4e6), registry=r)
        self.m_bytes = Gauge("gateway_memory_bytes", "Long-term memory bytes in the index", ["stat"],
                             registry=r)
        self.m_sessions = Gauge("gateway_memory_sessions", "Sessions with long-term memories", registry=r)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loading = asyncio.get_running_loop().create_task(self._load())
        if self.run_worker:
            self._worker = asyncio.get_running_loop().create_task(self.run())

    async def _load(self) -> None:
        await asyncio.to_thread(self.embedder.load)
        if self.index is None:
            self.index = (PostgresIndex(self.cfg, expand_env(self.cfg.index, "serve.memory.index"),
                                        self.embedder.dim, self.clock)
                          if self.cfg.index else LocalIndex(self.cfg, self.clock))
        log.info("memory: %s ready (%d dims), index %s, queue %s", self.cfg.embedding_model,
                 self.embedder.dim, "postgres" if self.cfg.index else "in-process",
                 "redis stream" if self.cfg.queue else "in-process")

    async def wait_ready(self, timeout: float = 120.0) -> None:
        if self._loading is None:
            await self.start()
        await asyncio.wait_for(asyncio.shield(self._loading), timeout)

    @property
    def ready(self) -> bool:
        return self.embedder.ready and self.index is not None

    async def close(self) -> None:
        for t in (self._worker, self._loading):
            if t is not None:
                t.cancel()
        await self.queue.close()
        if self.index is not None:
            await self.index.close()

    # ------------------------------------------------------------ the request path

    async def remember(self, session: str, user: str | None, user_text: str, reply: str) -> bool:
        """Queue a finished exchange; the embedding happens in a worker. Returns False when dropped."""
        from tasks.data.text import scrub_pii

        text = scrub_pii(condense(user_text, reply, self.cfg.summary_max_chars), self.pii_kinds, Counter())
        ok = await self.queue.put(Job(session, user, text, exchange_hash(user_text, reply)))
        self.m_jobs.labels("queued" if ok else "dropped").inc()
        return ok

    async def recall(self, session: str, user: str | None, query: str,
                     history: Sequence[dict[str, Any]]) -> list[tuple[Memory, float]]:
        """The top_k memories of this session (or user) at least min_similarity to `query`, most
        similar first, leaving out exchanges still in `history`."""
        if not self.ready:  # the embedder is still loading: the request goes on without memories
            return []
        t0 = time.perf_counter()
        vec = await asyncio.to_thread(self.embedder.query, query)
        hits = await self.index.search(session, user if self.cfg.scope == "user" else None, vec,
                                       self.cfg.top_k, self.cfg.min_similarity, history_hashes(history))
        self.m_recall.observe(time.perf_counter() - t0)
        return hits

    async def forget(self, session: str | None = None, user: str | None = None) -> dict[str, int]:
        """Every trace of a session (or user): queued exchanges, the one a worker holds, the index's rows."""
        queued = await self.queue.forget(session, user)
        if self.index is None and self._loading is not None:
            await self.wait_ready()
        stored = await self.index.delete(session, user) if self.index is not None else 0
        return {"queued": queued, "memories": stored}

    # ------------------------------------------------------------ the worker

    async def run(self, batch: int = 16) -> None:
        """Embed queued exchanges and store them, for ever (the gateway's task or `llmops memory-worker`)."""
        await self.wait_ready()
        while True:
            jobs = await self.queue.get(batch, timeout=1.0)
            if jobs:
                self._busy += 1
                try:
                    await self.process(jobs)
                except Exception:  # noqa: BLE001 - one bad batch must not end the worker
                    log.exception("memory: a batch of %d exchanges failed", len(jobs))
                    self.m_jobs.labels("error").inc(len(jobs))
                finally:
                    self._busy -= 1

    async def process(self, jobs: list[Job]) -> int:
        live = [j for j in jobs if not await self.queue.forgotten(j)]
        self.m_jobs.labels("forgotten").inc(len(jobs) - len(live))
        stored = 0
        if live:
            vectors = await asyncio.to_thread(self.embedder.encode, [j.text for j in live])
            for j, v in zip(live, vectors, strict=True):
                now = self.clock()
                await self.index.add(Memory(j.id, j.session, j.user, j.text, v, now, now))
                kind = await self.queue.forgotten(j)
                if kind:  # deleted while we embedded: it stays deleted
                    await self.index.delete(**{kind: j.user if kind == "user" else j.session})
                    self.m_jobs.labels("forgotten").inc()
                    continue
                stored += 1
                self.m_jobs.labels("stored").inc()
                self.m_lag.observe(max(0.0, time.time() - j.ts))
                self.m_session_bytes.observe(await self.index.session_bytes(j.session))
        await self.queue.ack(jobs)
        return stored

    async def drain(self, timeout: float = 60.0) -> None:
        """Wait until every queued exchange is stored (tests, benchmarks, a clean shutdown)."""
        deadline = time.monotonic() + timeout
        while await self.queue.pending() or self._busy:
            if time.monotonic() > deadline:
                raise TimeoutError(f"memory queue not drained within {timeout:.0f}s")
            await asyncio.sleep(0.02)

    STATS_TTL_S = 5.0  # a scrape reads the index's totals at most this often (they scan the whole index)

    async def update_gauges(self, now: float | None = None) -> dict[str, int]:
        """The memory gauges; the index's totals are computed at most every STATS_TTL_S seconds, so
        frequent /metrics scrapes do not scan the index under the lock recall needs."""
        if self.index is None:
            return {}
        now = time.monotonic() if now is None else now
        cached = getattr(self, "_stats", None)
        if cached is not None and now - cached[0] < self.STATS_TTL_S:
            return cached[1]
        s = await self.index.stats()
        self._stats = (now, s)
        self.m_bytes.labels("total").set(s["bytes"])
        self.m_bytes.labels("max_session").set(s["max_session_bytes"])
        self.m_sessions.set(s["sessions"])
        return s
