"""The stack's supervisor over trivial real servers (`python -m http.server`), for
tests/integration/test_supervisor.py: the same loop, pid files, backoff and state file as `llmops stack
supervise`, with Airflow and Triton replaced by servers that start in a fraction of a second.

    python -m tests.helpers.supervised <project root> <name>=<port> ...
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from tasks.ops.supervisor import Supervisor
from tasks.procs import Component
from tests.helpers.project import make_settings


def web(root: Path, name: str, port: int) -> Component:
    """An HTTP server on 127.0.0.1:`port`, healthy once it answers /."""
    return Component(name, [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                     dict(os.environ), root / "var" / "log" / f"{name}.log", root,
                     (f"http://127.0.0.1:{port}/",))


def main(root: Path, ports: dict[str, int]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    Supervisor(make_settings(root), lambda name: web(root, name, ports[name]), poll_s=0.5).run()


if __name__ == "__main__":
    main(Path(sys.argv[1]), {k: int(v) for k, v in (a.split("=") for a in sys.argv[2:])})
