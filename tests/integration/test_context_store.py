"""The session context store on the machine's real Redis (production path) and in-process (default)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tasks.config import GatewayConfig
from tasks.serve.sessions import MemoryStore, RedisStore, open_store
from tests.helpers.services import REDIS_URL, redis_up

pytestmark = pytest.mark.services


def test_redis_store_keeps_trims_expires_and_deletes_sessions():
    redis_up()

    async def scenario():
        store = open_store(GatewayConfig(context_store=REDIS_URL, session_max_turns=4, session_ttl_s=2))
        assert isinstance(store, RedisStore)
        sid = f"test-{uuid.uuid4().hex[:8]}"
        await store.append(sid, [{"role": "user", "content": "héllo"},
                                 {"role": "assistant", "content": "hi"}])
        await store.append(sid, [{"role": "user", "content": f"q{i}"} for i in range(3)])
        turns = await store.get(sid)
        assert [t["content"] for t in turns] == ["hi", "q0", "q1", "q2"]  # trimmed to the newest 4
        # a second client (another gateway process, or one restarted) sees the same session
        other = RedisStore(REDIS_URL, 4, 2)
        assert await other.get(sid) == turns
        assert 0 < await other.r.ttl(f"llmops:session:{sid}") <= 2
        assert await store.delete(sid) is True and await other.get(sid) == []
        await store.append(sid, [{"role": "user", "content": "x"}])
        await asyncio.sleep(2.5)
        assert await store.get(sid) == []  # expired
        await store.close()
        await other.close()

    asyncio.run(scenario())


def test_memory_store_lru_ttl_and_bad_urls():
    async def scenario():
        store = MemoryStore(max_turns=3, ttl_s=0.5, max_sessions=2)
        for sid in ("a", "b", "c"):
            await store.append(sid, [{"role": "user", "content": sid}])
        assert await store.get("a") == []  # least recently used, evicted
        assert [t["content"] for t in await store.get("c")] == ["c"]
        await asyncio.sleep(0.6)
        assert await store.get("c") == []

    asyncio.run(scenario())
    with pytest.raises(ValueError, match="context_store"):
        open_store(GatewayConfig(context_store="postgres://x"))


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_deleting_a_user_deletes_every_session_that_named_it_and_no_other(kind):
    if kind == "redis":
        redis_up()

    async def scenario():
        store = (RedisStore(REDIS_URL, 8, 60) if kind == "redis" else MemoryStore(8, 60, 100))
        tag = uuid.uuid4().hex[:8]
        turn = [{"role": "user", "content": "hi"}]
        for sid in ("s1", "s2"):
            await store.append(f"a/{tag}-{sid}", turn, user=f"a/{tag}-u1")
        await store.append(f"a/{tag}-s3", turn, user=f"a/{tag}-u2")
        await store.append(f"b/{tag}-s1", turn, user=f"b/{tag}-u1")  # another principal's u1
        assert await store.delete_user(f"a/{tag}-u1") == 2
        assert await store.get(f"a/{tag}-s1") == [] == await store.get(f"a/{tag}-s2")
        assert await store.get(f"a/{tag}-s3") == turn and await store.get(f"b/{tag}-s1") == turn
        assert await store.delete_user(f"a/{tag}-u1") == 0  # nothing left to delete
        for k in (f"a/{tag}-u2", f"b/{tag}-u1"):
            assert await store.delete_user(k) == 1
        await store.close()

    asyncio.run(scenario())
