"""Long-term session memory on its production stores, over real connections to the machine's
Postgres and Redis: the Postgres index honours each eviction limit; `DELETE /v1/sessions/{id}`
(the gateway app itself) removes the session's turns, summaries, vectors and queued exchanges from
every store, in-process and in production alike; and a separate `llmops memory-worker` process
embeds what a gateway queued on the Redis stream into Postgres."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid

import pytest

from tasks.config import MemoryConfig
from tasks.serve.gateway.tenancy import LOCAL
from tasks.serve.memory import PostgresIndex, RedisQueue
from tests.helpers.memory import Clock, make_memory, unit_vector
from tests.helpers.project import REPO, make_settings
from tests.helpers.services import postgres_up, redis_up

pytestmark = pytest.mark.services
REDIS_URL = "redis://127.0.0.1:6379/12"


@pytest.fixture(scope="module")
def pg():
    """A database of its own, dropped afterwards."""
    import psycopg
    from psycopg import sql

    postgres_up()
    redis_up()
    name = f"llmops_memory_{uuid.uuid4().hex[:8]}"
    admin = "postgresql://127.0.0.1:5432/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield f"postgresql://127.0.0.1:5432/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def redis_db():
    import redis

    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    r.flushdb()
    yield r
    r.flushdb()


def _rows(url: str, session: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("SELECT COUNT(*) FROM llmops_memory WHERE session = %s", (session,)).fetchone()[0]


def test_postgres_index_honours_ttl_bytes_and_session_limits(pg):
    async def scenario():
        clock = Clock()
        one = make_memory("s", 0).bytes
        idx = PostgresIndex(MemoryConfig(ttl_s=100, max_bytes_per_session=1300, max_sessions=2),
                            pg, 16, clock)
        try:
            # max bytes: three memories fit; the least recently used goes when a fourth comes
            for i in range(3):
                clock.t += 1
                await idx.add(make_memory("s", i))
            clock.t += 1
            assert [m.id for m, _ in await idx.search("s", None, unit_vector(0), 1, 0.5, set())] == ["m0"]
            clock.t += 1
            await idx.add(make_memory("s", 3))
            assert await idx.session_bytes("s") == 3 * one
            assert {m.id for m, _ in await idx.search("s", None, unit_vector(1), 4, -1.0, set())} == \
                {"m0", "m2", "m3"}
            # TTL: unused for longer than ttl_s, gone; a recalled one lives on
            clock.t += 60
            await idx.search("s", None, unit_vector(3), 1, 0.5, set())
            clock.t += 60
            assert [m.id for m, _ in await idx.search("s", None, unit_vector(1), 4, -1.0, set())] == ["m3"]
            # sessions: past max_sessions the least recently used one goes whole
            for s in ("a", "b"):
                clock.t += 1
                await idx.add(make_memory(s, 5))
            assert _rows(pg, "s") == 0 and _rows(pg, "a") == 1 and _rows(pg, "b") == 1
            assert (await idx.stats())["sessions"] == 2
            # this machine's Postgres has no pgvector: bytea vectors, scored here
            assert idx.pgvector is False
        finally:
            await idx.close()
    asyncio.run(scenario())


def _settings(tmp_path, mode: str, pg: str):
    prod = [f"serve.gateway.context_store={REDIS_URL}", f"serve.memory.index={pg}",
            f"serve.memory.queue={REDIS_URL}"]
    return make_settings(tmp_path, "serve.memory.worker_in_gateway=false",
                         *(prod if mode == "production" else []))


@pytest.mark.parametrize("mode", ["embedded", "production"])
def test_deleting_a_session_removes_turns_summaries_vectors_and_queued_exchanges_everywhere(
        tmp_path, pg, redis_db, mode):
    from fastapi.testclient import TestClient

    from tasks.serve.gateway import create_app

    s = _settings(tmp_path, mode, pg)
    # kept as the chat handler keeps them: under the caller's principal (`local` without keys)
    name, other = f"del-{uuid.uuid4().hex[:6]}", LOCAL.scoped(f"keep-{uuid.uuid4().hex[:6]}")
    sid = LOCAL.scoped(name)
    with TestClient(create_app(s), base_url="http://127.0.0.1") as client:
        gw = client.app.state.gateway
        memory = gw.memory

        async def write():
            await memory.wait_ready()
            for who in (sid, other):
                await gw.store.append(who, [{"role": "user", "content": "I live in Lisbon"},
                                            {"role": "assistant", "content": "Lovely city"}])
                await memory.remember(who, None, "I live in Lisbon near the river.", "Lovely city.")
                await memory.remember(who, None, "My cat is called Miso.", "Cute!")
            await memory.process(await memory.queue.get(16, timeout=2))  # stored
            # still queued at the deletion
            await memory.remember(sid, None, "My phone is 555 0100.", "Noted.")
            # queued, and stays queued
            await memory.remember(other, None, "I like green tea.", "Tea is nice.")
        client.portal.call(write)

        async def state(who):
            hits = await memory.index.search(who, None, memory.embedder.query("Where do I live?"),
                                             5, -1.0, set())
            return {"turns": len(await gw.store.get(who)), "memories": len(hits),
                    "bytes": await memory.index.session_bytes(who)}
        before = client.portal.call(state, sid)
        assert before["turns"] == 2 and before["memories"] == 2 and before["bytes"] > 0

        r = client.delete(f"/v1/sessions/{name}")
        assert r.status_code == 200, r.text
        assert r.json() == {"id": name, "object": "session", "deleted": True, "turns": True, "memories": 2,
                            "queued": 1, "log_lines": 0}
        assert client.portal.call(state, sid) == {"turns": 0, "memories": 0, "bytes": 0}
        assert client.portal.call(state, other)["memories"] == 2  # another session keeps its own
        if mode == "production":  # and nothing is left in the stores themselves
            assert not redis_db.exists(f"llmops:session:{sid}") and redis_db.exists(f"llmops:session:{other}")
            entries = redis_db.xrange(RedisQueue.STREAM)
            assert [f["session"] for _, f in entries] == [other]
            assert _rows(pg, sid) == 0 and _rows(pg, other) == 2
        assert client.delete("/v1/sessions/..%2Fx").status_code in (400, 404)
        assert client.delete("/v1/sessions/a b").json()["error"]["param"] == "session_id"


def test_a_memory_worker_process_embeds_what_the_gateway_queued(tmp_path, pg, redis_db):
    s = _settings(tmp_path, "production", pg)
    sid = f"w-{uuid.uuid4().hex[:6]}"
    args = [sys.executable, "-m", "tasks", "memory-worker", "--set", f"paths.root={tmp_path}",
            *[a for x in (f"serve.memory.index={pg}", f"serve.memory.queue={REDIS_URL}")
              for a in ("--set", x)]]
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        async def queue():
            q = RedisQueue(s.serve.memory.queue, 100)
            from tasks.serve.memory import Job, condense, exchange_hash

            await q.put(Job(sid, None, condense("My dog is called Biscuit.", "Nice!", 240),
                            exchange_hash("My dog is called Biscuit.", "Nice!")))
            await q.close()
        asyncio.run(queue())
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if _table(pg) and _rows(pg, sid):
                break
            time.sleep(0.5)
        assert _rows(pg, sid) == 1, log.read_text()[-2000:]
        assert redis_db.xlen(RedisQueue.STREAM) == 0  # acknowledged and deleted once stored
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=10)


def _table(url: str) -> bool:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("SELECT to_regclass('llmops_memory') IS NOT NULL").fetchone()[0]


@pytest.mark.parametrize("mode", ["embedded", "production"])
def test_deleting_a_user_removes_their_memories_from_every_session(tmp_path, pg, redis_db, mode):
    from fastapi.testclient import TestClient

    from tasks.serve.gateway import create_app

    s = _settings(tmp_path, mode, pg)
    name, tag = f"u-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex[:6]
    user = LOCAL.scoped(name)  # as the chat handler keeps it: under the caller's principal
    a, b, c = (LOCAL.scoped(f"{x}-{tag}") for x in "abc")
    with TestClient(create_app(s), base_url="http://127.0.0.1") as client:
        memory = client.app.state.gateway.memory

        async def write():
            await memory.wait_ready()
            for sid in (a, b):
                await memory.remember(sid, user, "My sister lives in Oslo.", "Oslo is beautiful.")
            await memory.remember(c, None, "My sister lives in Oslo.", "Oslo is beautiful.")  # no user
            await memory.process(await memory.queue.get(16, timeout=2))

        client.portal.call(write)
        r = client.delete(f"/v1/users/{name}")
        assert r.status_code == 200 and r.json()["memories"] == 2, r.text

        async def left(sid):
            return await memory.index.session_bytes(sid)
        assert client.portal.call(left, a) == client.portal.call(left, b) == 0
        assert client.portal.call(left, c) > 0  # another person's memory of the same words stays
        assert client.delete("/v1/users/a%20b").status_code == 400
