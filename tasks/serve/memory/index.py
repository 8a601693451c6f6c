"""Where memories live and are searched: the `Index` protocol, `LocalIndex` (numpy, in this
process) and `PostgresIndex` (a pgvector column, or float32 bytea scored here)."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import numpy as np

from tasks.config import MemoryConfig
from tasks.serve.memory.records import Memory


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
            has = await (await conn.execute(
                "SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")).fetchone()
            if has:
                await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            col = f"vector({self.dim})" if has else "bytea"
            await conn.execute(f"""CREATE TABLE IF NOT EXISTS llmops_memory (
                id text NOT NULL, session text NOT NULL, user_id text, text text NOT NULL,
                embedding {col} NOT NULL, bytes integer NOT NULL, created double precision NOT NULL,
                last_used double precision NOT NULL,
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
        if self.pgvector:
            return "[" + ",".join(f"{x:.7g}" for x in v.tolist()) + "]"
        return v.astype(np.float32).tobytes()

    async def add(self, mem: Memory) -> None:
        now = self.clock()
        size = mem.bytes
        async with self._lock:
            db = await self._db()
            async with db.transaction():
                await db.execute(
                    "INSERT INTO llmops_memory VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (session, id) DO UPDATE SET last_used = EXCLUDED.last_used",
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
                    "DELETE FROM llmops_memory_sessions WHERE session IN (SELECT session "
                    "FROM llmops_memory_sessions ORDER BY last_used DESC OFFSET %s) RETURNING session",
                    (self.cfg.max_sessions,))).fetchall()
                if gone:
                    await db.execute("DELETE FROM llmops_memory WHERE session = ANY(%s)",
                                     ([g[0] for g in gone],))

    async def search(self, session, user, vector, k, min_similarity, exclude):
        now = self.clock()
        where, args = (("(session = %s OR user_id = %s)", [session, user]) if user is not None
                       else ("session = %s", [session]))
        async with self._lock:
            db = await self._db()
            if self.pgvector:
                q = self._vec(vector)
                rows = await (await db.execute(
                    f"SELECT id, session, user_id, text, created, 1 - (embedding <=> %s::vector) "
                    f"FROM llmops_memory WHERE {where} AND last_used >= %s "
                    f"ORDER BY embedding <=> %s::vector LIMIT %s",
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
                scored = sorted(((r, float(s)) for r, s in zip(rows, scores, strict=True)),
                                key=lambda x: -x[1])
            hits = [(r, s) for r, s in scored[:k] if s >= min_similarity]
            for r, _ in hits:
                await db.execute("UPDATE llmops_memory SET last_used = %s WHERE session = %s AND id = %s",
                                 (now, r[1], r[0]))
        return [(Memory(r[0], r[1], r[2], r[3], np.zeros(0, np.float32), r[4], now), s) for r, s in hits]

    async def delete(self, session=None, user=None) -> int:
        async with self._lock:
            db = await self._db()
            cur = await db.execute("DELETE FROM llmops_memory WHERE session = %s OR user_id = %s",
                                   (session, user))
            if session is not None:
                await db.execute("DELETE FROM llmops_memory_sessions WHERE session = %s", (session,))
            return cur.rowcount

    async def session_bytes(self, session: str) -> int:
        async with self._lock:
            db = await self._db()
            row = await (await db.execute(
                "SELECT COALESCE(SUM(bytes), 0) FROM llmops_memory WHERE session = %s",
                (session,))).fetchone()
        return int(row[0])

    async def stats(self) -> dict[str, int]:
        async with self._lock:
            db = await self._db()
            row = await (await db.execute(
                "SELECT COUNT(*), COALESCE(SUM(n), 0), COALESCE(SUM(b), 0), COALESCE(MAX(b), 0) FROM "
                "(SELECT session, COUNT(*) AS n, SUM(bytes) AS b FROM llmops_memory GROUP BY session) t"
            )).fetchone()
        return {"sessions": int(row[0]), "memories": int(row[1]), "bytes": int(row[2]),
                "max_session_bytes": int(row[3])}

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
