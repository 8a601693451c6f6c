"""Training benchmark: prints one JSON line of figures, all measured in this one run.

    python bench/train.py [--sizes tiny,small] [--steps 8]

- peak_gflops: fp32 matmul GFLOP/s on this machine with all cores (the MFU denominator)
- <size>.ds_mfu: DeepSpeed (ZeRO-0, one rank, all cores) model FLOP/s / peak (goal >= 0.55)
- <size>.ds0_vs_plain: DeepSpeed ZeRO-0 tokens/s over a plain PyTorch loop's (goal >= 0.9)
- <size>.zero{1,2,3}_vs_ddp: ZeRO step time over plain DDP with the same 2 ranks (goals <= 1.10, 1.10, 1.5)
- <size>.peak_rss_mib: peak RSS per rank for each mode
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tasks.procs import free_port  # noqa: E402


def peak_gflops(n: int = 2048, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e9


def run(mode: str, size: str, world: int, steps: int) -> dict:
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    args = ["--mode", mode, "--size", size, "--steps", str(steps), "--out", str(out)]
    if world == 1 and mode == "plain":
        cmd = [sys.executable, str(HERE / "train_rank.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={world}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               str(HERE / "train_rank.py"), *args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "GLOO_SOCKET_IFNAME": "lo", "PYTHONWARNINGS": "ignore"}
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=900)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    peak = peak_gflops() * 1e9
    out: dict = {"bench": "train", "cpus": os.cpu_count(), "torch": torch.__version__,
                 "peak_gflops": round(peak / 1e9, 1)}
    for size in a.sizes.split(","):
        r = {m: run(m, size, w, a.steps) for m, w in
             (("plain", 1), ("zero0", 1), ("ddp", 2), ("zero1", 2), ("zero2", 2), ("zero3", 2))}
        out[size] = {
            "params": r["plain"]["params"],
            "plain_tok_s": round(r["plain"]["tokens_per_s"]),
            "plain_mfu": round(r["plain"]["flops_per_s"] / peak, 3),
            "ds_tok_s": round(r["zero0"]["tokens_per_s"]),
            "ds_mfu": round(r["zero0"]["flops_per_s"] / peak, 3),
            "ds0_vs_plain": round(r["zero0"]["tokens_per_s"] / r["plain"]["tokens_per_s"], 3),
            "ddp2_tok_s": round(r["ddp"]["tokens_per_s"]),
            **{f"{m}_vs_ddp": round(r[m]["step_s"] / r["ddp"]["step_s"], 3)
               for m in ("zero1", "zero2", "zero3")},
            "peak_rss_mib": {m: round(r[m]["peak_rss_mib_per_rank"]) for m in r},
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
