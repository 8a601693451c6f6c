"""The stack's supervisor with real processes: a server killed with -9 is back by itself, its restart is
counted where `llmops stack status` reads it, the backoff grows when it keeps dying, a pid file that names
another process is never signalled, and `down` stops the supervisor before the servers, for good.

The servers here are `python -m http.server` (tests/helpers/supervised.py) so that this runs in seconds;
tests/e2e/test_chaos.py does the same to the real stack."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tasks.procs import (
    SUPERVISOR,
    Component,
    alive,
    free_port,
    read_pidfile,
    spawn,
    stop_groups,
    supervision,
    unsupervised,
    watch,
)
from tests.helpers.project import REPO, make_settings
from tests.helpers.supervised import web

pytestmark = pytest.mark.services


def _back(settings, name: str, port: int, old: int, deadline: float) -> float:
    """Seconds until `name` runs under a new pid and answers, at most `deadline`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline:
        pid = alive(settings, name)
        if pid and pid != old:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"{name} was not back within {deadline} s")


def _restarts(settings, name: str, n: int, timeout: float = 10.0) -> dict:
    """The supervisor's record of `name` once it counts `n` restarts and the last one answered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = supervision(settings, [name])["components"].get(name, {})
        if r.get("restarts") == n and r.get("recovery_s") is not None:
            return r
        time.sleep(0.1)
    raise AssertionError(f"no record of restart {n} of {name}: {supervision(settings, [name])}")


def test_a_killed_server_comes_back_with_backoff_and_down_stops_it_for_good(tmp_path):
    s = make_settings(tmp_path)
    port, other_port = free_port(), free_port()
    srv = web(tmp_path, "web", port)
    first = spawn(s, srv)  # as `up` does: start, mark supervised, start the supervisor
    watch(s, "web")
    spawn(s, Component(SUPERVISOR, [sys.executable, "-m", "tests.helpers.supervised", str(tmp_path),
                                    f"web={port}", f"other={other_port}"],
                       dict(os.environ), tmp_path / "var" / "log" / "supervisor.log", REPO))
    # another process (not ours) whose pid an old pid file of "other" names: a pid reused since
    foreign = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    try:
        assert _back(s, "web", port, 0, 10) >= 0

        # kill -9: back by itself within the deadline; the restart is counted with how long it was out
        os.kill(first.pid, signal.SIGKILL)
        assert _back(s, "web", port, first.pid, 30) <= 30
        r = _restarts(s, "web", 1)
        assert r["history"][-1]["delay_s"] == 0.0 and r["last_exit"].startswith("unknown")  # `up`'s child
        assert r["gave_up"] is False and r["recovery_s"] <= 30

        # it keeps dying: the first restart was at once, then each waits twice as long (1, 2 s)
        for n in (2, 3):
            pid = alive(s, "web")
            os.kill(pid, signal.SIGKILL)
            _back(s, "web", port, pid, 30)
            r = _restarts(s, "web", n)
            assert r["last_exit"] == "killed by SIGKILL"  # the supervisor started this one: it knows
        assert [h["delay_s"] for h in r["history"]] == [0.0, 1.0, 2.0]
        assert [h["down_s"] >= h["delay_s"] for h in r["history"]] == [True] * 3

        # a pid file naming a process that is not the one which wrote it (another start time): "other" is
        # taken as gone and started afresh; the foreign process is never signalled
        (s.paths.var_dir / "run" / "other.pid").write_text(f"{foreign.pid} 1")
        watch(s, "other")
        _back(s, "other", other_port, foreign.pid, 30)
        assert read_pidfile(s, "other")[0] != foreign.pid
        assert _restarts(s, "other", 1)["restarts"] == 1
        assert foreign.poll() is None, "the foreign process was signalled"

        # down: the supervisor stops first, then the servers; nothing comes back
        sup = alive(s, SUPERVISOR)
        with unsupervised(s, ["web", "other"]):
            assert alive(s, SUPERVISOR) is None
            assert stop_groups(s, ["web", "other"], grace=5) == ["web", "other"]
        with pytest.raises(ProcessLookupError):
            os.kill(sup, 0)
        time.sleep(3)  # three times the supervisor's poll: it would have restarted them by now
        assert alive(s, "web") is None and alive(s, "other") is None and alive(s, SUPERVISOR) is None
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
        assert foreign.poll() is None
    finally:
        stop_groups(s, [SUPERVISOR, "web", "other"], grace=5)
        foreign.kill()
        first.wait(5)
