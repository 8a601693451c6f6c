"""Process supervision: the servers this project starts (Airflow, MLflow, tritonserver, the gateway).

Each server runs in its own session; its process-group id is kept in var/run/<name>.pid with the
process's start time, so any later process (`llmops stack down`, `llmops serve down`, a DAG task) can
tell whether it is up and stop the whole group: SIGTERM, then SIGKILL after a grace period. A pid file
whose process has gone, or whose pid now belongs to another process (its start time differs), is
stale: removed, never signalled.

A `Component` is everything needed to start one server: its command, environment, working directory,
log file and health URLs. `spawn` starts it in its own session and writes its pid file; `llmops stack
up`, `llmops serve up` and the supervisor (tasks/ops/supervisor.py) all start servers through it, so
a restarted server runs exactly as the first one did.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tasks.config import Settings
from tasks.errors import ServiceError


class NotAnswering(ServiceError):
    """A server did not answer its health URL in time."""


def venv_bin(name: str) -> str:
    """An executable of this interpreter's environment (airflow, mlflow, deepspeed), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Component:
    """One server: how to start it and how to tell it answers (every URL in `health` gives 200)."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    log: Path
    cwd: Path
    health: tuple[str, ...] = ()
    umask: int = -1  # -1: the caller's
    headers: dict[str, str] = field(default_factory=dict)  # sent with the health requests


def launch(c: Component) -> subprocess.Popen:
    """Start `c` in its own session (process group), its output appended to its log."""
    c.log.parent.mkdir(parents=True, exist_ok=True)
    with open(c.log, "ab") as out:
        return subprocess.Popen(c.cmd, env=c.env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=c.cwd, umask=c.umask)


def spawn(settings: Settings, c: Component) -> subprocess.Popen:
    """`launch` and keep its pid (with its start time) in var/run/<name>.pid."""
    proc = launch(c)
    write_pidfile(settings, c.name, proc.pid)
    return proc


def healthy(c: Component, timeout: float = 2.0) -> bool:
    """Every health URL of `c` answers 200 (a component without one: True)."""
    try:
        return all(httpx.get(u, timeout=timeout, headers=c.headers).status_code == 200 for u in c.health)
    except httpx.HTTPError:
        return False


def pidfile(settings: Settings, name: str) -> Path:
    return settings.paths.var_dir / "run" / f"{name}.pid"


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on, None if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()  # the command name before it may hold spaces


def start_time(pid: int) -> str | None:
    """The process's start time (clock ticks after boot, /proc/<pid>/stat field 22), None if it is gone."""
    fields = _stat(pid)
    return fields[19] if fields else None


def exited(pid: int) -> bool:
    """The process is gone or a zombie (dead, waiting for its parent to collect its status)."""
    fields = _stat(pid)
    return fields is None or fields[0] in ("Z", "X")


def read_pidfile(settings: Settings, name: str) -> tuple[int, str] | None:
    """(pid, start time) as the pid file says, None without one."""
    pf = pidfile(settings, name)
    try:
        pid_text, _, started = pf.read_text().strip().partition(" ")
        return int(pid_text), started
    except (OSError, ValueError):
        return None


def write_pidfile(settings: Settings, name: str, pid: int) -> None:
    pf = pidfile(settings, name)
    pf.parent.mkdir(parents=True, exist_ok=True)
    pf.write_text(f"{pid} {start_time(pid) or ''}".strip())


def alive(settings: Settings, name: str) -> int | None:
    """The process-group id of the named server when it runs, else None (a stale pid file is removed:
    its process is gone, or the pid was reused by another process since)."""
    pf = pidfile(settings, name)
    entry = read_pidfile(settings, name)
    if entry is None:
        pf.unlink(missing_ok=True)
        return None
    pgid, started = entry
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        pf.unlink(missing_ok=True)
        return None
    if started and start_time(pgid) != started:  # not the process that wrote this file: never signal it
        pf.unlink(missing_ok=True)
        return None
    return pgid


def kill_leftovers(pgid: int, started: str) -> bool:
    """SIGKILL what is left of a server's process group after its leader died (a kill -9 of tritonserver
    leaves its backend stubs, of MLflow its worker holding the port). Only when the group is still the
    one whose leader started at `started`: a process-group id is not given to a new process while the
    group has members, so a group whose leader is gone is still ours; a live leader with another start
    time means the number now belongs to another process, which is left alone. True if it signalled."""
    now = start_time(pgid)
    if now is not None and now != started:
        return False
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    reap(pgid)
    return True


def wait_http(url: str, timeout: float, name: str, log: Path) -> None:
    """Poll `url` until it answers below 500; else raise with the tail of the server's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise NotAnswering(f"{name} did not answer {url} within {timeout:.0f}s; last log lines ({log}):\n{tail}")


def reap(pgid: int) -> None:
    """Collect our exited children in process group `pgid` (a zombie still counts as a group member)."""
    try:
        while os.waitpid(-pgid, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def stop_groups(settings: Settings, names: list[str], grace: float = 20.0) -> list[str]:
    """SIGTERM the process groups of the named servers, SIGKILL what is left after `grace` s."""
    stopped = []
    groups = {n: g for n in names if (g := alive(settings, n))}
    for g in groups.values():
        os.killpg(g, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for name, g in groups.items():
        while time.monotonic() < deadline:
            reap(g)
            try:
                os.killpg(g, 0)
                time.sleep(0.2)
            except ProcessLookupError:
                break
        else:
            try:
                os.killpg(g, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pidfile(settings, name).unlink(missing_ok=True)
        stopped.append(name)
    return stopped


# ---------------------------------------------------------------- the supervisor, seen from `up` and `down`
# One supervisor process per project root (tasks/ops/supervisor.py, `llmops stack supervise`) restarts
# the components marked in var/run/supervised/ (one empty file per name: `up` marks what it starts, `down`
# unmarks what it stops) and records what it did in var/run/supervisor.json.

SUPERVISOR = "supervisor"


def _run_dir(settings: Settings) -> Path:
    return settings.paths.var_dir / "run"


def supervision_lock(settings: Settings, wait: bool = True) -> contextlib.AbstractContextManager[None]:
    """Held while `up` checks and starts components, and by the supervisor while it restarts one: never
    two of the same server. wait False: raise tasks.atomic.Busy when another process holds it."""
    from tasks.atomic import file_lock

    return file_lock(_run_dir(settings) / "supervisor.lock", wait=wait, what="starting the stack's servers")


def watch(settings: Settings, name: str) -> None:
    d = _run_dir(settings) / "supervised"
    d.mkdir(parents=True, exist_ok=True)
    (d / name).touch()


def watched(settings: Settings) -> list[str]:
    d = _run_dir(settings) / "supervised"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def state_file(settings: Settings) -> Path:
    return _run_dir(settings) / "supervisor.json"


def settings_file(settings: Settings) -> Path:
    return _run_dir(settings) / "supervisor.settings.json"


def ensure_supervisor(settings: Settings) -> bool:
    """Start the supervisor in the background unless it runs. It gets these settings as they are (a JSON
    file: the config keeps secrets as ${NAME}, read from the environment it inherits). True if started."""
    from tasks.atomic import atomic_file
    from tasks.config import PROJECT_DIR

    if alive(settings, SUPERVISOR):
        return False
    f = settings_file(settings)
    with atomic_file(f) as tmp:
        tmp.write_text(settings.model_dump_json(by_alias=True))
    log = settings.paths.var_dir / "log" / "supervisor.log"
    spawn(settings, Component(SUPERVISOR, [sys.executable, "-m", "tasks", "stack", "supervise",
                                           "--settings-file", str(f)],
                              dict(os.environ), log, PROJECT_DIR))
    return True


@contextlib.contextmanager
def unsupervised(settings: Settings, names: list[str]) -> Iterator[None]:
    """For `down`: stop the supervisor first (it would start again what is being stopped), unmark `names`,
    and when the block is done start it again for the components still marked."""
    stop_groups(settings, [SUPERVISOR], grace=10.0)
    d = _run_dir(settings) / "supervised"
    for n in names:
        (d / n).unlink(missing_ok=True)
    try:
        yield
    finally:
        if watched(settings):
            ensure_supervisor(settings)


def supervision(settings: Settings, names: list[str]) -> dict[str, Any]:
    """What the supervisor did for `names`: whether it runs, and per component its restarts, the last
    one's time, exit and time to healthy, and whether it gave up."""
    import json

    try:
        state = json.loads(state_file(settings).read_text())
    except (OSError, ValueError):
        state = {}
    comps = state.get("components", {})
    return {"running": bool(alive(settings, SUPERVISOR)),
            "components": {n: comps[n] for n in names if n in comps}}
