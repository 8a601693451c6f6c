"""Progress for long work as log lines with rate and ETA (readable in Airflow task logs)."""

from __future__ import annotations

import logging
import time


class Progress:
    def __init__(self, what: str, total: float, unit: str, log: logging.Logger, every_s: float = 2.0):
        self.what, self.total, self.unit, self.log, self.every = what, total, unit, log, every_s
        self.done = 0.0
        self.t0 = self.last = time.perf_counter()

    def update(self, n: float) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self._emit(now)

    def close(self) -> None:
        self._emit(time.perf_counter())

    def _emit(self, now: float) -> None:
        secs = max(now - self.t0, 1e-9)
        rate = self.done / secs
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 and self.total else 0.0
        self.log.info("%s: %5.1f%% %s %s in %.1fs (%.3g %s/s, ETA %.0fs)", self.what, pct,
                      f"{self.done:,.0f}", self.unit, secs, rate, self.unit, eta)
