"""Chaos on the shared running stack (after tests/e2e/test_stack.py has trained and deployed a champion):
during live gateway traffic and chat_ingest runs, `kill -9` in turn tritonserver, the gateway, the Airflow
scheduler and MLflow. Each must be back by itself (the stack's supervisor) and answering; the DAG runs end
in success (retries allowed); clients see only 200, 429 or 503 while a server is out; every
200 has its request-log line.

How fast each comes back is a figure, printed and kept in README Security against the 30 s goal: on a
shared 2-core machine a restarted tritonserver or MLflow spends most of that time in its own start-up
(importing torch per Python-backend instance; MLflow's imports), which the supervisor cannot shorten.
The test fails only when a server is not back within RECOVERY_LIMIT_S ($LLMOPS_CHAOS_LIMIT_S).

A client cannot get a 503 from a gateway that is itself dead: while the gateway is out, its port refuses
connections (and a request in flight at the kill loses its connection). Those are counted apart and
allowed only inside the gateway's own outage.

The embedded default keeps session memories in the gateway (serve.memory index and queue ""): there is
no separate memory worker to kill, and a gateway kill loses what it held in memory. The production
setting (a Redis queue, a Postgres index, worker_in_gateway false) runs `llmops memory-worker` as its own
process, which `serve up` starts and the supervisor restarts like the others."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from tasks.ops import stack
from tasks.ops.airflow_client import AirflowClient
from tasks.procs import alive, healthy, supervision
from tasks.serve import server
from tasks.serve.gateway import auth_headers

pytestmark = [pytest.mark.slow, pytest.mark.services]

GOAL_S = 30.0  # issue 22's goal; measured and printed, not asserted (machine-dependent)
RECOVERY_LIMIT_S = float(os.environ.get("LLMOPS_CHAOS_LIMIT_S", "150"))
ORDER = ("tritonserver", "gateway", "airflow-scheduler", "mlflow")


class Traffic(threading.Thread):
    """One client sending chat requests through the gateway back to back, recording each outcome."""

    def __init__(self, base: str, headers: dict[str, str]):
        super().__init__(daemon=True)
        self.base, self.headers = base, headers
        self.results: list[tuple[float, int | str, str | None]] = []  # (time, status or error, request id)
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        with httpx.Client(timeout=30.0) as http:
            while not self.stop.is_set():
                i += 1
                body = {"model": "chat-gpt", "max_tokens": 8, "temperature": 0,
                        "messages": [{"role": "user", "content": f"Where is my order {i}?"}]}
                t = time.monotonic()
                try:
                    r = http.post(f"{self.base}/chat/completions", json=body, headers=self.headers)
                    rid = r.json().get("id") if r.status_code == 200 else None
                    self.results.append((t, r.status_code, rid))
                except httpx.TransportError as e:  # refused, or the connection dropped by a dying gateway
                    self.results.append((t, type(e).__name__, None))
                    time.sleep(0.2)
                time.sleep(0.05)


def _component(s, name: str):
    return (stack.components(s) if name in stack.names(s) else server.components(s))[name]


def _recover(s, name: str) -> tuple[float, float]:
    """kill -9 the server's main process; seconds until a new one runs, and until it answers."""
    old = alive(s, name)
    assert old, f"{name} is not running before the kill"
    spec = _component(s, name)
    t0 = time.monotonic()
    os.kill(old, signal.SIGKILL)
    running = None
    while time.monotonic() - t0 < RECOVERY_LIMIT_S:
        pid = alive(s, name)
        if pid and pid != old:
            running = running or time.monotonic() - t0
            if healthy(spec, timeout=2.0):
                return running, time.monotonic() - t0
        time.sleep(0.2)
    raise AssertionError(f"{name} was not back within {RECOVERY_LIMIT_S:.0f} s (running after {running} s); "
                         f"supervisor: {supervision(s, [name])}")


def test_every_server_killed_with_minus_9_is_back_by_itself_and_nothing_is_lost(running):
    s, _ = running
    base = server.urls(s)["gateway"]
    headers = auth_headers(s)
    r = httpx.post(f"{base}/chat/completions", headers=headers, timeout=60, json={
        "model": "chat-gpt", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    if r.status_code != 200:
        pytest.skip(f"no model served yet ({r.status_code}): run it after tests/e2e/test_stack.py, "
                    "as `make test` does")
    client = AirflowClient(s)
    client.unpause("chat_ingest")
    traffic = Traffic(base, headers)
    traffic.start()
    runs, times, outage = [], {}, {}
    try:
        for name in ORDER:
            # a chat_ingest run in flight during each kill (queued behind each other: one run at a time)
            runs.append(client.trigger("chat_ingest", {"day": "2026-11-02"}))
            time.sleep(1.0)
            t0 = time.monotonic()
            times[name] = _recover(s, name)
            outage[name] = (t0, time.monotonic())
            time.sleep(3.0)  # traffic through the healthy stack before the next kill
    finally:
        traffic.stop.set()
        traffic.join(60)
    states = {rid: client.wait_run("chat_ingest", rid, timeout=600) for rid in runs}
    report = {n: {"running_s": round(a, 1), "answering_s": round(b, 1), "within_goal": b <= GOAL_S}
              for n, (a, b) in times.items()}
    print(f"recovery after kill -9 (goal {GOAL_S:.0f} s):", json.dumps(report))

    # each server came back by itself (_recover raised otherwise), answering; the supervisor counted it
    restarts = {**stack.status(s)["supervisor"]["components"], **server.status(s)["supervisor"]["components"]}
    assert all(restarts[n]["restarts"] >= 1 for n in ORDER), restarts

    # the DAG runs in flight end in success (a task that died with the scheduler is retried)
    assert set(states.values()) == {"success"}, {rid: (st, client.task_states("chat_ingest", rid))
                                                 for rid, st in states.items()}

    # clients saw only 200, 429 or 503; refused or dropped connections only while the gateway itself was out
    statuses = {x for _, x, _ in traffic.results}
    assert 200 in statuses, statuses
    assert {x for x in statuses if isinstance(x, int)} <= {200, 429, 503}, statuses
    g0, g1 = outage["gateway"]
    errors = [(t, x) for t, x, _ in traffic.results if isinstance(x, str)]
    assert all(g0 - 1.0 <= t <= g1 + 1.0 for t, _ in errors), (errors, outage["gateway"])

    # every 200 has its request-log line (the gateway writes it before it answers)
    logged = set()
    for f in s.paths.requests.glob("dt=*/gateway-*.jsonl"):
        logged |= {json.loads(line)["request_id"] for line in f.read_text().splitlines() if line.strip()}
    ok = [rid for _, x, rid in traffic.results if x == 200]
    assert ok and not set(ok) - logged, f"{len(set(ok) - logged)} of {len(ok)} answered requests not logged"
