"""Process supervision: the servers this project starts (Airflow, MLflow, tritonserver, the gateway).

Each server runs in its own session; its process-group id is kept in var/run/<name>.pid with the
process's start time, so any later process (`llmops stack down`, `llmops serve down`, a DAG task) can
tell whether it is up and stop the whole group: SIGTERM, then SIGKILL after a grace period. A pid file
whose process has gone, or whose pid now belongs to another process (its start time differs), is
stale: removed, never signalled.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

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


def pidfile(settings: Settings, name: str) -> Path:
    return settings.paths.var_dir / "run" / f"{name}.pid"


def start_time(pid: int) -> str | None:
    """The process's start time (clock ticks after boot, /proc/<pid>/stat field 22), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]  # fields after the command name, which may hold spaces


def write_pidfile(settings: Settings, name: str, pid: int) -> None:
    pf = pidfile(settings, name)
    pf.parent.mkdir(parents=True, exist_ok=True)
    pf.write_text(f"{pid} {start_time(pid) or ''}".strip())


def alive(settings: Settings, name: str) -> int | None:
    """The process-group id of the named server when it runs, else None (a stale pid file is removed:
    its process is gone, or the pid was reused by another process since)."""
    pf = pidfile(settings, name)
    if not pf.is_file():
        return None
    pid_text, _, started = pf.read_text().strip().partition(" ")
    pgid = int(pid_text)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        pf.unlink(missing_ok=True)
        return None
    if started and start_time(pgid) != started:  # not the process that wrote this file
        pf.unlink(missing_ok=True)
        return None
    return pgid


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
