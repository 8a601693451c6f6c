"""bench/gpu/serve_gpu.sh --dry: the GPU serving benchmark runs end to end on CPU (tiny shape, a few
requests) and prints its one JSON line with every figure of issue 21's goals table."""

import json
import subprocess
import sys

from tests.helpers.project import REPO


def test_serve_gpu_script_dry_mode_prints_the_goal_figures():
    r = subprocess.run(["bash", "bench/gpu/serve_gpu.sh", "--dry"], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "HOME": "/tmp"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["bench"] == "serve" and out["engine"]["scheduler"] == "continuous"
    g = out["goals"]
    for key in ("c4_vs_c1_throughput", "c4_p99_vs_c1_p99", "served_c1_vs_in_process_b1", "open_loop_max_rate",
                "gateway_overhead_p50", "gateway_overhead_p50_blocks", "rss_per_version_mb"):
        assert key in g, key
    assert g["served_c1_vs_in_process_b1"] > 0 and out["in_process"]["b1_tokens_per_s"] > 0
    # both schedulers measured in the same run, and one served version's backend processes found
    assert {"continuous_c1", "static_c1", "continuous_c4", "static_c4"} <= set(out["closed_loop"])
    assert out["memory"]["continuous"]["processes"] == 1 and out["memory"]["continuous"]["rss_mb"] > 50
