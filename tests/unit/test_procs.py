"""Pid files: a server is ours only while its pid still names the process that wrote the file."""

import subprocess
import sys

from tasks.procs import alive, pidfile, start_time, write_pidfile
from tests.helpers.project import make_settings


def test_a_pid_file_whose_pid_was_reused_is_stale_and_never_signalled(tmp_path):
    s = make_settings(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        write_pidfile(s, "gateway", proc.pid)
        assert pidfile(s, "gateway").read_text() == f"{proc.pid} {start_time(proc.pid)}"
        assert alive(s, "gateway") == proc.pid
        # the same pid, another process (as after a reboot or a wrap of the pid counter)
        pidfile(s, "gateway").write_text(f"{proc.pid} 1")
        assert alive(s, "gateway") is None and not pidfile(s, "gateway").exists()
        assert proc.poll() is None  # left alone
        pidfile(s, "gateway").write_text(str(proc.pid))  # a file from before start times: the pid alone
        assert alive(s, "gateway") == proc.pid
    finally:
        proc.kill()
        proc.wait()
    assert alive(s, "gateway") is None and start_time(proc.pid) is None


def test_one_definition_per_server_and_a_memory_worker_only_when_it_is_separate(tmp_path):
    from tasks.ops import stack
    from tasks.serve import server

    s = make_settings(tmp_path)
    assert list(stack.components(s)) == stack.names(s)
    assert set(server.components(s)) == {"tritonserver", "gateway"}  # the gateway embeds memories itself
    prod = make_settings(tmp_path, "serve.memory.worker_in_gateway=false",
                         "serve.memory.queue=redis://127.0.0.1:6379/15")
    worker = server.components(prod)["memory-worker"]
    assert worker.cmd[-3:] == ["memory-worker", "--profile", "tiny"] and not worker.health
    assert "memory-worker" in server.status(prod)["running"]
    assert "memory-worker" not in server.status(s)["running"]
