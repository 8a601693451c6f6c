"""The session context store: the turns of a conversation, kept between requests.

    store = open_store(settings.serve.gateway)   # in-process LRU, or Redis when context_store is a URL
    await store.append("s1", [{"role": "user", ...}, {"role": "assistant", ...}])
    await store.get("s1")
    await store.delete("s1")
    await store.append("s2", turns, user="u1")   # s2 is one of u1's sessions ...
    await store.delete_user("u1")                # ... gone with u1's other sessions

Each session keeps at most `session_max_turns` messages and expires `session_ttl_s` after its last
write; the in-process store also holds at most `max_sessions` sessions (least recently used go
first). What fits into a prompt is decided by `chat_template.fit_turns` with the model's budget.
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from typing import Protocol

from tasks.config import GatewayConfig
from tasks.credentials import expand_env
from tasks.errors import ConfigError

SESSION_ID = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")


class ContextStore(Protocol):
    async def get(self, session: str) -> list[dict]: ...
    async def append(self, session: str, messages: list[dict], user: str | None = None) -> None: ...
    async def delete(self, session: str) -> bool: ...
    async def delete_user(self, user: str) -> int: ...
    async def close(self) -> None: ...


class MemoryStore:
    def __init__(self, max_turns: int, ttl_s: float, max_sessions: int):
        self.max_turns, self.ttl_s, self.max_sessions = max_turns, ttl_s, max_sessions
        self._data: OrderedDict[str, tuple[float, list[dict]]] = OrderedDict()
        self._users: dict[str, set[str]] = {}  # user -> the sessions that named it

    async def get(self, session: str) -> list[dict]:
        item = self._data.get(session)
        if item is None:
            return []
        if time.monotonic() - item[0] > self.ttl_s:
            del self._data[session]
            return []
        self._data.move_to_end(session)
        return list(item[1])

    async def append(self, session: str, messages: list[dict], user: str | None = None) -> None:
        turns = (await self.get(session) + list(messages))[-self.max_turns:]
        self._data[session] = (time.monotonic(), turns)
        self._data.move_to_end(session)
        if user is not None:
            self._users.setdefault(user, set()).add(session)
        while len(self._data) > self.max_sessions:
            self._data.popitem(last=False)
        if len(self._users) > self.max_sessions:  # users whose sessions were all evicted or deleted
            self._users = {u: live for u, ss in self._users.items() if (live := ss & self._data.keys())}

    async def delete(self, session: str) -> bool:
        return self._data.pop(session, None) is not None

    async def delete_user(self, user: str) -> int:
        return sum([await self.delete(s) for s in self._users.pop(user, ())])

    async def close(self) -> None:
        pass


class RedisStore:
    """One Redis list per session (`llmops:session:<id>`), trimmed and expired on every write, and one
    set per user of the sessions that named it (`llmops:user-sessions:<user>`)."""

    def __init__(self, url: str, max_turns: int, ttl_s: int):
        import redis.asyncio as redis

        self.r = redis.from_url(url, decode_responses=True)
        self.max_turns, self.ttl_s = max_turns, ttl_s

    @staticmethod
    def _key(session: str) -> str:
        return f"llmops:session:{session}"

    @staticmethod
    def _user_key(user: str) -> str:
        return f"llmops:user-sessions:{user}"

    async def get(self, session: str) -> list[dict]:
        return [json.loads(x) for x in await self.r.lrange(self._key(session), 0, -1)]

    async def append(self, session: str, messages: list[dict], user: str | None = None) -> None:
        key = self._key(session)
        async with self.r.pipeline(transaction=True) as p:
            p.rpush(key, *[json.dumps(m, ensure_ascii=False) for m in messages])
            p.ltrim(key, -self.max_turns, -1)
            p.expire(key, self.ttl_s)
            if user is not None:  # the user's sessions, kept as long as the newest of them
                p.sadd(self._user_key(user), session)
                p.expire(self._user_key(user), self.ttl_s)
            await p.execute()

    async def delete(self, session: str) -> bool:
        return bool(await self.r.delete(self._key(session)))

    async def delete_user(self, user: str) -> int:
        sessions = await self.r.smembers(self._user_key(user))
        if not sessions:
            return 0
        n = await self.r.delete(*[self._key(s) for s in sessions])
        await self.r.delete(self._user_key(user))
        return int(n)

    async def close(self) -> None:
        await self.r.aclose()


def open_store(cfg: GatewayConfig) -> ContextStore:
    if cfg.context_store.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(expand_env(cfg.context_store, "serve.gateway.context_store"), cfg.session_max_turns,
                          cfg.session_ttl_s)
    if cfg.context_store:
        raise ConfigError(f"serve.gateway.context_store: {cfg.context_store!r} "
                          "is neither empty nor a redis:// URL")
    return MemoryStore(cfg.session_max_turns, cfg.session_ttl_s, cfg.max_sessions)
