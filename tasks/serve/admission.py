"""Admission control: at most `max_inflight` requests at the model server, a bounded queue behind
it served by priority (interactive before batch, first come first served within a class), and a
clear "no" when the queue is full: the caller answers 429 with Retry-After.

    adm = Admission(max_inflight=16, max_queue=64, batch_share=0.5)
    async with adm.slot(INTERACTIVE):
        ...
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from contextlib import asynccontextmanager

INTERACTIVE, BATCH = 0, 1
PRIORITIES = {"interactive": INTERACTIVE, "batch": BATCH}


class Overloaded(Exception):
    pass


class Admission:
    def __init__(self, max_inflight: int, max_queue: int, batch_share: float = 0.5, timeout_s: float = 0.0):
        self.max_inflight, self.max_queue = max_inflight, max_queue
        self.timeout_s = timeout_s  # the longest wait in the queue (0: no limit); then Overloaded
        self.batch_limit = int(max_queue * batch_share)
        self.inflight = 0
        self._waiters: list[tuple[int, int, asyncio.Future]] = []
        self._seq = itertools.count()

    @property
    def queued(self) -> int:
        return sum(1 for *_, f in self._waiters if not f.done())

    async def acquire(self, priority: int = INTERACTIVE) -> None:
        if self.inflight < self.max_inflight and not self.queued:
            self.inflight += 1
            return
        limit = self.max_queue if priority == INTERACTIVE else self.batch_limit
        if self.queued >= limit:
            raise Overloaded(f"{self.inflight} requests in flight and {self.queued} queued (limit {limit})")
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._seq), fut))
        try:
            # resolved by release(): the slot is handed over, inflight stays the same
            done, _ = await asyncio.wait({fut}, timeout=self.timeout_s or None)
            if not done and fut.cancel():  # (a slot handed over at this very moment is kept)
                raise Overloaded(f"no slot within {self.timeout_s:g}s ({self.inflight} requests in flight, "
                                 f"{self.queued} queued)")
        except asyncio.CancelledError:
            if not fut.cancel():  # got the slot just as the caller went away: pass it on
                self.release()
            raise

    def release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
                return
        self.inflight -= 1

    @asynccontextmanager
    async def slot(self, priority: int = INTERACTIVE):
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()
