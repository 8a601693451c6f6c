"""The queue of exchanges waiting to be embedded: `LocalQueue` (in this process) and `RedisQueue`
(a Redis stream read by a consumer group of workers)."""

from __future__ import annotations

import asyncio
import collections
import time
import uuid

from tasks.serve.memory.records import FORGET_KEEP_S, Job


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
        _, stale, _ = await self.r.xautoclaim(self.STREAM, self.GROUP, self.consumer, min_idle_time=60_000,
                                              count=n)
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
        stamps = await self.r.mget([self._forget_key(k, job.user if k == "user" else job.session)
                                    for k in kinds])
        return next((k for k, t in zip(kinds, stamps, strict=True) if t is not None and float(t) >= job.ts),
                    None)

    async def pending(self) -> int:
        return int(await self.r.xlen(self.STREAM))

    async def close(self) -> None:
        await self.r.aclose()
