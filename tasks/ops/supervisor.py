"""The stack's supervisor: starts again, with backoff, a server of the embedded stack that died.

    llmops stack supervise --settings-file var/run/supervisor.settings.json   # what `up` starts

`llmops stack up` and `llmops serve up` start one supervisor per project root in the background
(var/run/supervisor.pid) and mark each server they start in var/run/supervised/. Every `poll_s` the
supervisor checks those servers' pid files (pid and start time: a file naming another process is
stale, never signalled). When a server's main process is gone it kills what is left of its process
group (a kill -9 of tritonserver leaves the backend stubs, of MLflow the worker that holds the port),
waits the backoff (1 s, 2 s, 4 s ... at most 30 s; back to 1 s once a server has stayed up for a
minute) and starts it again exactly as `up` did (the same `Component`, built afresh: tritonserver
loads what is exported now). After 10 restarts in 10 minutes it gives up on that server and says so.

Each restart is recorded in var/run/supervisor.json: per server the restarts, the last one's time,
how the process ended (its exit status when the supervisor started it, else unknown), how long it was
down and how long the new one took to answer its health URLs. `llmops stack status` and
`llmops status` show them. `down` stops the supervisor before the servers, so nothing comes back.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tasks.atomic import Busy, write_json
from tasks.config import Settings
from tasks.procs import (
    Component,
    alive,
    exited,
    healthy,
    kill_leftovers,
    read_pidfile,
    spawn,
    start_time,
    state_file,
    supervision_lock,
    watched,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    first_s: float = 1.0
    cap_s: float = 30.0
    stable_s: float = 60.0  # up this long: the next crash waits first_s again
    max_restarts: int = 10  # within window_s, then give up on the server
    window_s: float = 600.0

    def delay(self, failures: int) -> float:
        """Seconds to wait before the restart that follows `failures` restarts in a row: none before the
        first, then first_s, doubling up to cap_s."""
        return 0.0 if failures == 0 else min(self.cap_s, self.first_s * 2 ** (failures - 1))


@dataclass
class Watch:
    """What the supervisor knows of one server."""

    pid: int | None = None  # the process group it last saw running, and its start time
    started: str = ""
    failures: int = 0  # restarts since it last stayed up stable_s
    down_at: float | None = None  # when it was found gone (monotonic)
    restart_at: float = 0.0
    restarted_at: float | None = None
    spec: Component | None = None  # as last started, for its health URLs
    restarts: list[float] = field(default_factory=list)  # monotonic times, within window_s
    record: dict[str, Any] = field(default_factory=lambda: {"restarts": 0, "gave_up": False, "history": []})


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"signal {sig}"
    return f"exit {os.WEXITSTATUS(status)}"


class Supervisor:
    def __init__(self, settings: Settings, spec: Callable[[str], Component], backoff: Backoff = Backoff(),
                 poll_s: float = 1.0):
        self.settings, self.spec, self.backoff, self.poll_s = settings, spec, backoff, poll_s
        self.watches: dict[str, Watch] = {}
        self.exits: dict[int, str] = {}  # pid of a child of ours -> how it ended
        self.stopping = False

    def run(self) -> None:
        """Until SIGTERM or SIGINT. The servers are in their own sessions: they outlive the supervisor."""
        def stop(*_: Any) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        log.info("supervising %s (pid %d)", ", ".join(watched(self.settings)) or "nothing yet", os.getpid())
        while not self.stopping:
            self.tick()
            time.sleep(self.poll_s)
        log.info("supervisor stopped")

    def tick(self) -> None:
        self._reap()
        names = watched(self.settings)
        changed = False
        for name in names:
            w = self.watches.setdefault(name, Watch())
            try:
                changed |= self._check(name, w)
            except Exception:  # noqa: BLE001 - one server's trouble never stops the supervision of the others
                log.exception("supervising %s", name)
        for gone in set(self.watches) - set(names):
            del self.watches[gone]
            changed = True
        if changed:
            self._save()

    def _reap(self) -> None:
        """Collect the exit status of servers this supervisor started (else they stay zombies)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            self.exits[pid] = describe(status)

    def _check(self, name: str, w: Watch) -> bool:
        now = time.monotonic()
        entry = read_pidfile(self.settings, name)
        pgid = alive(self.settings, name)
        if pgid and not exited(pgid):
            if (pgid, entry[1] if entry else "") != (w.pid, w.started):  # a new process: ours or `up`'s
                w.pid, w.started = pgid, entry[1] if entry else ""
                w.down_at = None
            if w.restarted_at is not None and "healthy_s" not in w.record and self._healthy(name, w):
                w.record["healthy_s"] = round(now - w.restarted_at, 1)
                w.record["recovery_s"] = round(now - w.record.pop("_down_at"), 1)
                w.record["history"][-1].update(healthy_s=w.record["healthy_s"],
                                               recovery_s=w.record["recovery_s"])
                log.info("%s answers again, %.1f s after its restart", name, w.record["healthy_s"])
                return True
            if w.failures and w.restarted_at is not None and now - w.restarted_at >= self.backoff.stable_s:
                w.failures = 0
            return False
        if w.record["gave_up"]:
            return False
        if w.down_at is None:  # just found gone
            w.down_at = now
            if entry is not None:  # its pid file as it was (`alive` removes a stale one)
                w.pid, w.started = entry
            how = self.exits.pop(w.pid, None) if w.pid else None
            w.record["last_exit"] = how or "unknown (not started by the supervisor)"
            if w.pid and kill_leftovers(w.pid, w.started):
                log.info("%s: killed what was left of its process group %d", name, w.pid)
            delay = self.backoff.delay(w.failures)
            w.restart_at = now + delay
            w.record["next_delay_s"] = delay
            log.warning("%s is gone (%s); restarting it in %.0f s", name, w.record["last_exit"], delay)
            return True
        if now < w.restart_at:
            return False
        w.restarts = [t for t in w.restarts if now - t < self.backoff.window_s]
        if len(w.restarts) >= self.backoff.max_restarts:
            w.record["gave_up"] = True
            log.error("%s died %d times within %.0f s: not restarting it again; see its log, then "
                      "`llmops stack up` / `llmops serve up`", name, len(w.restarts), self.backoff.window_s)
            return True
        try:
            with supervision_lock(self.settings, wait=False):
                pg = alive(self.settings, name)
                if pg and not exited(pg):
                    return False  # `up` started it meanwhile
                spec = self.spec(name)
                proc = spawn(self.settings, spec)
        except Busy:
            return False  # `up` is starting servers: look again next time
        except Exception as e:  # noqa: BLE001 - e.g. a config that no longer resolves: a failed restart
            w.failures += 1
            w.restarts.append(now)
            w.restart_at = now + self.backoff.delay(w.failures)
            w.record["last_error"] = f"{type(e).__name__}: {e}"
            log.error("%s could not be started (%s); next try in %.0f s", name, w.record["last_error"],
                      w.restart_at - now)
            return True
        w.pid, w.started, w.spec = proc.pid, start_time(proc.pid) or "", spec
        w.failures += 1
        w.restarts.append(now)
        w.restarted_at = now
        w.record.pop("healthy_s", None)
        w.record.pop("recovery_s", None)
        w.record["_down_at"] = w.down_at
        w.record["restarts"] += 1
        w.record["last_restart"] = _now_iso()
        w.record["history"] = [*w.record["history"], {
            "at": w.record["last_restart"], "exit": w.record["last_exit"],
            "delay_s": w.record["next_delay_s"], "down_s": round(now - w.down_at, 1)}][-10:]
        w.down_at = None
        log.info("%s restarted (pid %d, restart %d)", name, proc.pid, w.record["restarts"])
        return True

    def _healthy(self, name: str, w: Watch) -> bool:
        return healthy(w.spec or self.spec(name), timeout=1.0)

    def _save(self) -> None:
        comps = {n: {k: v for k, v in w.record.items() if not k.startswith("_")}
                 for n, w in self.watches.items()}
        write_json(state_file(self.settings),
                   {"pid": os.getpid(), "updated": _now_iso(), "components": comps})


def stack_spec(settings: Settings) -> Callable[[str], Component]:
    """A server of the embedded stack by name: Airflow's, MLflow, tritonserver, the gateway, the memory
    worker."""
    def spec(name: str) -> Component:
        from tasks.ops import stack
        from tasks.serve import server

        comps = stack.components(settings) if name in stack.names(settings) else server.components(settings)
        if name not in comps:
            raise KeyError(f"{name!r} is not a server of this stack")
        return comps[name]

    return spec


def supervise(settings: Settings, poll_s: float = 1.0) -> None:
    # imported now, not at the first restart: a server that died waits for no imports
    import tasks.ops.stack
    import tasks.serve.gateway
    import tasks.serve.server  # noqa: F401

    Supervisor(settings, stack_spec(settings), poll_s=poll_s).run()
