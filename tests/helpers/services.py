"""The machine's own services (Redis, PostgreSQL): used where running, started where not, or a clear
failure."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

REDIS_URL = "redis://127.0.0.1:6379/15"


def redis_up() -> None:
    """Use the machine's Redis; start it as ../shared/FACTS.md says if it is not running; fail clearly."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
        return
    except redis.ConnectionError:
        pass
    if shutil.which("redis-server"):
        subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379",
                        "--save", "", "--appendonly", "no"], check=False, capture_output=True)
        for _ in range(20):
            try:
                redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.25)
    pytest.fail("Redis is not reachable at 127.0.0.1:6379 and could not be started (redis-server)")


def postgres_up() -> None:
    import psycopg

    for attempt in range(2):
        try:
            psycopg.connect("postgresql://127.0.0.1:5432/postgres", connect_timeout=3).close()
            return
        except psycopg.OperationalError:
            if attempt == 0 and shutil.which("pg_ctlcluster") and os.path.isdir("/etc/postgresql"):
                version = sorted(os.listdir("/etc/postgresql"))[-1]
                subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
                               capture_output=True, check=False)
                time.sleep(3)
    pytest.fail("PostgreSQL is not reachable at 127.0.0.1:5432 and could not be started (pg_ctlcluster)")
