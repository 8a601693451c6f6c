"""`llmops serve up` after a crash: a tritonserver killed with -9 leaves its process group (the backend
stubs) and its pid file behind; `up` must restart it, not fail with a connection traceback."""

import shutil
import subprocess
import sys

import httpx
import yaml

from tasks.procs import alive, free_port, write_pidfile
from tasks.serve import server
from tests.helpers.project import REPO, make_settings


def test_serve_up_restarts_a_tritonserver_whose_group_outlived_it(tmp_path, monkeypatch):
    configs = tmp_path / "configs"  # free ports, as an operator's configs/ would set them: the gateway
    shutil.copytree(REPO / "configs", configs)  # `up` starts reads its settings from there too
    serve = yaml.safe_load((configs / "serve.yaml").read_text())
    for key in ("http_port", "grpc_port", "metrics_port"):
        serve["triton"][key] = free_port()
    serve["gateway"]["port"] = free_port()
    serve["memory"]["enabled"] = False
    (configs / "serve.yaml").write_text(yaml.safe_dump(serve))
    monkeypatch.setenv("LLMOPS_CONFIG_DIR", str(configs))
    s = make_settings(tmp_path)
    # what a kill -9 of tritonserver leaves: a live process group under its pid file, nothing listening
    remnant = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    write_pidfile(s, "tritonserver", remnant.pid)
    try:
        out = server.up(s, timeout=90)
        assert "tritonserver (restarted)" in out["started"] and "tritonserver" in out["started"]
        assert remnant.wait(10) is not None  # the remnant group was stopped
        assert alive(s, "tritonserver") not in (None, remnant.pid)
        assert httpx.get(f"http://{out['triton_http']}/v2/health/live", timeout=5).status_code == 200
        assert httpx.get(f"{out['gateway']}/models", timeout=5).status_code == 200
    finally:
        server.down(s)
        remnant.kill()
