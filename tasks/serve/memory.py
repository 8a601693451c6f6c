"""Long-term session memory: older exchanges, condensed and embedded, recalled when relevant.

    memory = SessionMemory(settings.serve.memory, pii_kinds)
    await memory.start()                          # loads the embedder, starts the worker (in-process mode)
    memory.remember("s1", None, "My dog is called Biscuit.", "Nice name!")   # queued: returns at once
    await memory.recall("s1", None, "What is my dog called?", history)       # [(Memory, cosine), ...]
    await memory.forget_session("s1")             # every memory, queued job and vector of the session

The request path only queues a finished exchange (`remember`) and, for a new request, embeds the
question and searches the index (`recall`); condensing, scrubbing and embedding the exchange happen
in a worker (the gateway's own task, or `llmops memory-worker` processes reading a Redis stream).

Where things live, by `serve.memory`:
- index "" : a numpy index in this process. Exact cosine search: a session holds at most
  max_bytes_per_session (~150 memories at the default), where a scan beats any ANN structure.
- index postgresql://... : table llmops_memory; the pgvector column type and its `<=>` cosine
  operator when the extension is installed, else the vectors as float32 bytea scored here.
- queue "" : an in-process queue; queue redis://... : the stream llmops:memory:jobs with the
  consumer group "embedders" (entries acknowledged and deleted once stored).

Eviction (each limit on its own): a memory unused (neither written nor recalled) for ttl_s is
gone; past max_bytes_per_session the session's least recently used memories go first; past
max_sessions the least recently used sessions go whole. A memory's size is its summary text, its
vector and a fixed 64 bytes of record.

Deleting a session (or a user) drops its queued exchanges, marks it forgotten for any exchange a
worker holds at that moment (checked again after the write, so none comes back), and deletes its
memories and vectors from the index.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import re
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from tasks.config import MemoryConfig

log = logging.getLogger("llmops.memory")
RECORD_BYTES = 64  # fixed per-memory overhead counted against max_bytes_per_session
FORGET_KEEP_S = 86_400  # how long a deletion is remembered against jobs queued before it


def exchange_hash(user: str, reply: str) -> str:
    """Identity of one exchange (a user turn and the reply to it): its memory's id within a session."""
    return hashlib.sha256(json.dumps([user, reply], ensure_ascii=False).encode()).hexdigest()[:20]


def history_hashes(history: Sequence[dict[str, Any]]) -> set[str]:
    """The exchanges still in the short-term turns: recalling them again would only repeat them."""
    return {exchange_hash(a["content"], b["content"]) for a, b in zip(history, history[1:], strict=False)
            if a["role"] == "user" and b["role"] == "assistant"}


_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def _clip(text: str, limit: int) -> str:
    """Whole sentences up to `limit` characters; a first sentence longer than that is cut at a word."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    out = ""
    for s in _SENTENCE.split(text):
        if len(out) + len(s) + 1 > limit:
            break
        out = f"{out} {s}".strip()
    return out or text[:limit].rsplit(" ", 1)[0] + "…"


def condense(user: str, reply: str, max_chars: int) -> str:
    """The memory of an exchange: the user's words (what later questions are about) get two thirds
    of the room, the reply the rest; labelled with the chat template's role names, which every
    tokenizer trained on our shards holds as single tokens."""
    u = _clip(user, max_chars * 2 // 3)
    return f"user: {u} | assistant: {_clip(reply, max(16, max_chars - len(u) - 22))}"


@dataclass
class Memory:
    id: str            # exchange_hash, unique within its session
    session: str
    user: str | None
    text: str          # condensed and PII-scrubbed
    vector: np.ndarray  # float32, unit length
    created: float
    last_used: float

    @property
    def bytes(self) -> int:
        return len(self.text.encode()) + int(self.vector.nbytes) + RECORD_BYTES


# ---------------------------------------------------------------- the index


class Index(Protocol):
    async def add(self, mem: Memory) -> None: ...
    async def search(self, session: str, user: str | None, vector: np.ndarray, k: int, min_similarity: float,
                     exclude: set[str]) -> list[tuple[Memory, float]]: ...
    async def delete(self, session: str | None = None, user: str | None = None) -> int: ...
    async def session_bytes(self, session: str) -> int: ...
    async def stats(self) -> dict[str, int]: ...
    async def close(self) -> None: ...


class LocalIndex:
    """Memories in this process: per session an LRU of memories, sessions themselves in an LRU."""

    def __init__(self, cfg: MemoryConfig, clock: Callable[[], float] = time.time):
        self.cfg, self.clock = cfg, clock
        self._sessions: OrderedDict[str, OrderedDict[str, Memory]] = OrderedDict()
        self._bytes: dict[str, int] = {}
        self._users: dict[str, set[str]] = {}  # user -> sessions that held their memories (pruned when read)

    def _owners(self, session: str | None, user: str | None) -> list[str]:
        """The live sessions that may hold memories of this session or user: a lookup, not a scan of all."""
        if user is not None and user in self._users:
            self._users[user] = {s for s in self._users[user] if s in self._sessions}
        owners = set(self._users.get(user, ())) if user is not None else set()
        if session is not None:
            owners.add(session)
        return [s for s in owners if s in self._sessions]

    def _expire(self, session: str, now: float) -> None:
        mems = self._sessions.get(session)
        if mems is None:
            return
        for mid in [m.id for m in mems.values() if now - m.last_used > self.cfg.ttl_s]:
            self._bytes[session] -= mems.pop(mid).bytes
        if not mems:
            del self._sessions[session], self._bytes[session]

    async def add(self, mem: Memory) -> None:
        now = self.clock()
        mems = self._sessions.setdefault(mem.session, OrderedDict())
        self._bytes.setdefault(mem.session, 0)
        if mem.id in mems:  # the same exchange again: one memory, used now
            self._bytes[mem.session] -= mems.pop(mem.id).bytes
        mem.last_used = now
        mems[mem.id] = mem
        if mem.user is not None:
            self._users.setdefault(mem.user, set()).add(mem.session)
        self._bytes[mem.session] += mem.bytes
        self._sessions.move_to_end(mem.session)
        self._expire(mem.session, now)
        while mem.session in self._bytes and self._bytes[mem.session] > self.cfg.max_bytes_per_session:
            _, old = mems.popitem(last=False)
            self._bytes[mem.session] -= old.bytes
            if not mems:
                del self._sessions[mem.session], self._bytes[mem.session]
        while len(self._sessions) > self.cfg.max_sessions:
            gone, _ = self._sessions.popitem(last=False)
            del self._bytes[gone]

    async def search(self, session, user, vector, k, min_similarity, exclude):
        now = self.clock()
        owners = self._owners(session, user)
        for s in owners:
            self._expire(s, now)
        cands = [m for s in owners for m in self._sessions.get(s, {}).values()
                 if m.id not in exclude and (s == session or m.user == user)]
        if not cands:
            return []
        scores = np.stack([m.vector for m in cands]) @ vector
        order = np.argsort(-scores)[:k]
        hits = [(cands[i], float(scores[i])) for i in order if scores[i] >= min_similarity]
        for m, _ in hits:
            m.last_used = now
            self._sessions[m.session].move_to_end(m.id)
            self._sessions.move_to_end(m.session)
        return hits

    async def delete(self, session=None, user=None) -> int:
        n = 0
        for s in self._owners(session, user):
            mems = self._sessions[s]
            gone = [mid for mid, m in mems.items() if s == session or (user is not None and m.user == user)]
            for mid in gone:
                self._bytes[s] -= mems.pop(mid).bytes
            n += len(gone)
            if not mems:
                del self._sessions[s], self._bytes[s]
        return n

    async def session_bytes(self, session: str) -> int:
        return self._bytes.get(session, 0)

    async def stats(self) -> dict[str, int]:
        return {"sessions": len(self._sessions), "memories": sum(len(m) for m in self._sessions.values()),
                "bytes": sum(self._bytes.values()), "max_session_bytes": max(self._bytes.values(), default=0)}

    async def close(self) -> None:
        pass


class PostgresIndex:
    """Memories in Postgres: table llmops_memory (and llmops_memory_sessions for the session LRU)."""

    def __init__(self, cfg: MemoryConfig, url: str, dim: int, clock: Callable[[], float] = time.time):
        self.cfg, self.url, self.dim, self.clock = cfg, url, dim, clock
        self._conn = None
        self._lock = asyncio.Lock()
        self.pgvector = False

    async def _db(self):
        if self._conn is None:
            import psycopg

            conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
            has = await (await conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")).fetchone()
            if has:
                await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            col = f"vector({self.dim})" if has else "bytea"
            await conn.execute(f"""CREATE TABLE IF NOT EXISTS llmops_memory (
                id text NOT NULL, session text NOT NULL, user_id text, text text NOT NULL, embedding {col} NOT NULL,
                bytes integer NOT NULL, created double precision NOT NULL, last_used double precision NOT NULL,
                PRIMARY KEY (session, id))""")
            await conn.execute("CREATE INDEX IF NOT EXISTS llmops_memory_user ON llmops_memory (user_id)")
            await conn.execute("CREATE TABLE IF NOT EXISTS llmops_memory_sessions (session text PRIMARY KEY, "
                               "last_used double precision NOT NULL)")
            kind = await (await conn.execute(
                "SELECT udt_name FROM information_schema.columns WHERE table_name = 'llmops_memory' "
                "AND column_name = 'embedding'")).fetchone()
            self.pgvector = kind[0] == "vector"  # a table made before the extension came keeps bytea
            self._conn = conn
        return self._conn

    def _vec(self, v: np.ndarray):
        return "[" + ",".join(f"{x:.7g}" for x in v.tolist()) + "]" if self.pgvector else v.astype(np.float32).tobytes()

    async def add(self, mem: Memory) -> None:
        now = self.clock()
        size = mem.bytes
        async with self._lock:
            db = await self._db()
            async with db.transaction():
                await db.execute(
                    "INSERT INTO llmops_memory VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (session, id) "
                    "DO UPDATE SET last_used = EXCLUDED.last_used",
                    (mem.id, mem.session, mem.user, mem.text, self._vec(mem.vector), size, mem.created, now))
                await db.execute("DELETE FROM llmops_memory WHERE session = %s AND last_used < %s",
                                 (mem.session, now - self.cfg.ttl_s))
                await db.execute(
                    "DELETE FROM llmops_memory m USING (SELECT id, SUM(bytes) OVER (ORDER BY last_used DESC, "
                    "created DESC, id) AS upto FROM llmops_memory WHERE session = %s) t "
                    "WHERE m.session = %s AND m.id = t.id AND t.upto > %s",
                    (mem.session, mem.session, self.cfg.max_bytes_per_session))
                await db.execute("INSERT INTO llmops_memory_sessions VALUES (%s, %s) ON CONFLICT (session) "
                                 "DO UPDATE SET last_used = EXCLUDED.last_used", (mem.session, now))
                gone = await (await db.execute(
                    "DELETE FROM llmops_memory_sessions WHERE session IN (SELECT session FROM llmops_memory_sessions "
                    "ORDER BY last_used DESC OFFSET %s) RETURNING session", (self.cfg.max_sessions,))).fetchall()
                if gone:
                    await db.execute("DELETE FROM llmops_memory WHERE session = ANY(%s)", ([g[0] for g in gone],))

    async def search(self, session, user, vector, k, min_similarity, exclude):
        now = self.clock()
        where, args = ("(session = %s OR user_id = %s)", [session, user]) if user is not None else ("session = %s", [session])
        async with self._lock:
            db = await self._db()
            if self.pgvector:
                q = self._vec(vector)
                rows = await (await db.execute(
                    f"SELECT id, session, user_id, text, created, 1 - (embedding <=> %s::vector) FROM llmops_memory "
                    f"WHERE {where} AND last_used >= %s ORDER BY embedding <=> %s::vector LIMIT %s",
                    (q, *args, now - self.cfg.ttl_s, q, k + len(exclude)))).fetchall()
                scored = [(r, float(r[5])) for r in rows if r[0] not in exclude]
            else:
                rows = await (await db.execute(
                    f"SELECT id, session, user_id, text, created, embedding FROM llmops_memory "
                    f"WHERE {where} AND last_used >= %s", (*args, now - self.cfg.ttl_s))).fetchall()
                rows = [r for r in rows if r[0] not in exclude]
                if not rows:
                    return []
                scores = np.stack([np.frombuffer(r[5], dtype=np.float32) for r in rows]) @ vector
                scored = sorted(((r, float(s)) for r, s in zip(rows, scores, strict=True)), key=lambda x: -x[1])
            hits = [(r, s) for r, s in scored[:k] if s >= min_similarity]
            for r, _ in hits:
                await db.execute("UPDATE llmops_memory SET last_used = %s WHERE session = %s AND id = %s", (now, r[1], r[0]))
        return [(Memory(r[0], r[1], r[2], r[3], np.zeros(0, np.float32), r[4], now), s) for r, s in hits]

    async def delete(self, session=None, user=None) -> int:
        async with self._lock:
            db = await self._db()
            cur = await db.execute("DELETE FROM llmops_memory WHERE session = %s OR user_id = %s", (session, user))
            if session is not None:
                await db.execute("DELETE FROM llmops_memory_sessions WHERE session = %s", (session,))
            return cur.rowcount

    async def session_bytes(self, session: str) -> int:
        async with self._lock:
            db = await self._db()
            row = await (await db.execute("SELECT COALESCE(SUM(bytes), 0) FROM llmops_memory WHERE session = %s",
                                          (session,))).fetchone()
        return int(row[0])

    async def stats(self) -> dict[str, int]:
        async with self._lock:
            db = await self._db()
            row = await (await db.execute(
                "SELECT COUNT(*), COALESCE(SUM(n), 0), COALESCE(SUM(b), 0), COALESCE(MAX(b), 0) FROM "
                "(SELECT session, COUNT(*) AS n, SUM(bytes) AS b FROM llmops_memory GROUP BY session) t")).fetchone()
        return {"sessions": int(row[0]), "memories": int(row[1]), "bytes": int(row[2]), "max_session_bytes": int(row[3])}

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


# ---------------------------------------------------------------- the queue of exchanges to embed


@dataclass
class Job:
    session: str
    user: str | None
    text: str          # condensed, scrubbed: the queue never holds the raw turns
    id: str
    ts: float = field(default_factory=time.time)
    ref: str | None = None  # the queue's own handle (a stream entry id)

    def to_fields(self) -> dict[str, str]:
        return {"session": self.session, "user": self.user or "", "text": self.text, "id": self.id, "ts": repr(self.ts)}

    @classmethod
    def from_fields(cls, f: dict[str, str], ref: str | None = None) -> Job:
        return cls(f["session"], f["user"] or None, f["text"], f["id"], float(f["ts"]), ref)


class LocalQueue:
    def __init__(self, max_pending: int):
        self.max_pending = max_pending
        self._jobs: collections.deque[Job] = collections.deque()
        self._ready = asyncio.Event()
        self._forgotten: dict[tuple[str, str], float] = {}

    async def put(self, job: Job) -> bool:
        if len(self._jobs) >= self.max_pending:
            return False
        self._jobs.append(job)
        self._ready.set()
        return True

    async def get(self, n: int, timeout: float) -> list[Job]:
        if not self._jobs:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                return []
        return [self._jobs.popleft() for _ in range(min(n, len(self._jobs)))]

    async def ack(self, jobs: list[Job]) -> None:
        pass

    async def forget(self, session: str | None, user: str | None) -> int:
        now = time.time()
        self._forgotten = {k: t for k, t in self._forgotten.items() if now - t < FORGET_KEEP_S}
        for kind, who in (("session", session), ("user", user)):
            if who is not None:
                self._forgotten[(kind, who)] = now
        keep = [j for j in self._jobs if not _of(j, session, user)]
        dropped = len(self._jobs) - len(keep)
        self._jobs = collections.deque(keep)
        return dropped

    async def forgotten(self, job: Job) -> str | None:
        """"session" or "user" when that was deleted after the job was queued, else None."""
        return next((k[0] for k in (("session", job.session), ("user", job.user))
                     if self._forgotten.get(k, 0.0) >= job.ts), None)

    async def pending(self) -> int:
        return len(self._jobs)

    async def close(self) -> None:
        pass


def _of(job: Job, session: str | None, user: str | None) -> bool:
    return (session is not None and job.session == session) or (user is not None and job.user == user)


class RedisQueue:
    """A Redis stream with one consumer group: every worker process reads new entries, acknowledges
    and deletes them once stored; entries a dead worker held are claimed again after 60 s."""

    STREAM, GROUP = "llmops:memory:jobs", "embedders"

    def __init__(self, url: str, max_pending: int):
        import redis.asyncio as redis

        self.r = redis.from_url(url, decode_responses=True)
        self.max_pending = max_pending
        self.consumer = f"worker-{uuid.uuid4().hex[:8]}"
        self._group = False

    @staticmethod
    def _forget_key(kind: str, who: str) -> str:
        return f"llmops:memory:forgotten:{kind}:{who}"

    async def put(self, job: Job) -> bool:
        if await self.r.xlen(self.STREAM) >= self.max_pending:
            return False
        await self.r.xadd(self.STREAM, job.to_fields())
        return True

    async def _ensure_group(self) -> None:
        if not self._group:
            import redis

            try:
                await self.r.xgroup_create(self.STREAM, self.GROUP, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
            self._group = True

    async def get(self, n: int, timeout: float) -> list[Job]:
        await self._ensure_group()
        _, stale, _ = await self.r.xautoclaim(self.STREAM, self.GROUP, self.consumer, min_idle_time=60_000, count=n)
        entries = [(i, f) for i, f in stale if f]
        if not entries:
            got = await self.r.xreadgroup(self.GROUP, self.consumer, {self.STREAM: ">"}, count=n,
                                          block=max(1, int(timeout * 1000)))
            entries = [(i, f) for _, items in got for i, f in items if f]
        return [Job.from_fields(f, ref=i) for i, f in entries]

    async def ack(self, jobs: list[Job]) -> None:
        refs = [j.ref for j in jobs if j.ref]
        if refs:
            await self.r.xack(self.STREAM, self.GROUP, *refs)
            await self.r.xdel(self.STREAM, *refs)

    async def forget(self, session: str | None, user: str | None) -> int:
        now = repr(time.time())
        for kind, who in (("session", session), ("user", user)):
            if who is not None:
                await self.r.set(self._forget_key(kind, who), now, ex=FORGET_KEEP_S)
        gone, last = [], "-"
        while True:  # the stream is bounded by max_pending: a scan is cheap
            batch = await self.r.xrange(self.STREAM, min=last, max="+", count=500)
            gone += [i for i, f in batch if (session is not None and f.get("session") == session)
                     or (user is not None and f.get("user") == user)]
            if len(batch) < 500:
                break
            last = "(" + batch[-1][0]
        if gone:
            await self.r.xdel(self.STREAM, *gone)
        return len(gone)

    async def forgotten(self, job: Job) -> str | None:
        kinds = ["session"] + (["user"] if job.user else [])
        stamps = await self.r.mget([self._forget_key(k, job.user if k == "user" else job.session) for k in kinds])
        return next((k for k, t in zip(kinds, stamps, strict=True) if t is not None and float(t) >= job.ts), None)

    async def pending(self) -> int:
        return int(await self.r.xlen(self.STREAM))

    async def close(self) -> None:
        await self.r.aclose()


# ---------------------------------------------------------------- the embedder


class Embedder:
    """The packaged sentence-embedding model (tasks.judge.metrics), unit-length float32 vectors, with an
    LRU of query embeddings by content hash (repeated questions skip the encoder)."""

    def __init__(self, model: str, cache_size: int):
        self.model_name, self.cache_size = model, cache_size
        self._model = None
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.dim = 0

    def load(self) -> None:
        import torch

        from tasks.model.encoders import embedder, embedding_model_dir

        torch.set_num_threads(1)  # beside the model server on a few cores: one thread, no oversubscription
        self._model = embedder(embedding_model_dir(self.model_name))
        self.dim = int(self._model.get_embedding_dimension())

    @property
    def ready(self) -> bool:
        return self._model is not None

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        v = self._model.encode(list(texts), batch_size=32, convert_to_numpy=True, normalize_embeddings=True,
                               show_progress_bar=False)
        return np.asarray(v, dtype=np.float32)

    def query(self, text: str) -> np.ndarray:
        key = hashlib.sha256(text.encode()).hexdigest()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        v = self.encode([text])[0]
        if self.cache_size:
            self._cache[key] = v
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return v


# ---------------------------------------------------------------- the service


class SessionMemory:
    def __init__(self, cfg: MemoryConfig, pii_kinds: tuple[str, ...], registry=None,
                 clock: Callable[[], float] = time.time, run_worker: bool | None = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.cfg, self.pii_kinds, self.clock = cfg, pii_kinds, clock
        self.embedder = Embedder(cfg.embedding_model, cfg.query_cache)
        self.queue = RedisQueue(cfg.queue, cfg.max_pending) if cfg.queue else LocalQueue(cfg.max_pending)
        self.index: Index | None = None
        self.run_worker = cfg.worker_in_gateway if run_worker is None else run_worker
        self._worker: asyncio.Task | None = None
        self._loading: asyncio.Task | None = None
        self._busy = 0
        r = registry or CollectorRegistry()
        self.m_recall = Histogram("gateway_memory_recall_seconds", "Time memory recall added to a request "
                                  "(query embedding and index search)", buckets=(0.001, 0.0025, 0.005, 0.01, 0.025,
                                                                                  0.05, 0.1, 0.25, 1), registry=r)
        self.m_recalled = Counter("gateway_memory_recalls", "Recalls by outcome (hit: a memory went into the prompt)",
                                  ["outcome"], registry=r)
        self.m_jobs = Counter("gateway_memory_jobs", "Exchanges for long-term memory by outcome", ["outcome"],
                              registry=r)
        self.m_lag = Histogram("gateway_memory_store_lag_seconds", "From the reply to its memory in the index "
                               "(off the request path)", buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60),
                               registry=r)
        self.m_session_bytes = Histogram("gateway_memory_session_bytes", "Long-term memory bytes of a session, "
                                         "observed at each write", buckets=(1e3, 4e3, 16e3, 64e3, 256e3, 1e6, 4e6),
                                         registry=r)
        self.m_bytes = Gauge("gateway_memory_bytes", "Long-term memory bytes in the index", ["stat"], registry=r)
        self.m_sessions = Gauge("gateway_memory_sessions", "Sessions with long-term memories", registry=r)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loading = asyncio.get_running_loop().create_task(self._load())
        if self.run_worker:
            self._worker = asyncio.get_running_loop().create_task(self.run())

    async def _load(self) -> None:
        await asyncio.to_thread(self.embedder.load)
        if self.index is None:
            self.index = PostgresIndex(self.cfg, self.cfg.index, self.embedder.dim, self.clock) if self.cfg.index \
                else LocalIndex(self.cfg, self.clock)
        log.info("memory: %s ready (%d dims), index %s, queue %s", self.cfg.embedding_model, self.embedder.dim,
                 "postgres" if self.cfg.index else "in-process", "redis stream" if self.cfg.queue else "in-process")

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
        hits = await self.index.search(session, user if self.cfg.scope == "user" else None, vec, self.cfg.top_k,
                                       self.cfg.min_similarity, history_hashes(history))
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

    async def update_gauges(self) -> dict[str, int]:
        if self.index is None:
            return {}
        s = await self.index.stats()
        self.m_bytes.labels("total").set(s["bytes"])
        self.m_bytes.labels("max_session").set(s["max_session_bytes"])
        self.m_sessions.set(s["sessions"])
        return s
