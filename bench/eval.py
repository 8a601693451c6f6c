"""Evaluation benchmark: prints one JSON line of figures, all measured in this one run.

    python bench/eval.py [--steps 150]

Trains the `tiny` model once (1 rank, ZeRO-0) on synthetic data in a temporary root, then:
- eval_suite_s: wall time of the whole evaluation suite (fp32) on `tiny`
- int8 vs fp32: tokens/s at batch 1 and 8, model bytes, and the metric deltas (int8 - fp32)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _tiny import train_tiny  # noqa: E402  (bench/ is this script's own directory on sys.path)

from tasks.judge.evaluate import evaluate  # noqa: E402
from tasks.judge.quantize import evaluate_int8  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="llmops-bench-eval-"))
    try:
        s, weights = train_tiny(root, a.steps)
        t0 = time.perf_counter()
        fp32 = evaluate(s, weights)
        suite_s = time.perf_counter() - t0
        q = evaluate_int8(s, weights, fp32)
        cmp = q["int8"]
        print(json.dumps({
            "bench": "eval", "cpus": os.cpu_count(), "profile": "tiny", "train_steps": a.steps,
            "eval_suite_s": round(suite_s, 2), "replies": s.eval.reply_samples,
            "max_new_tokens": s.eval.max_new_tokens,
            "fp32_tokens_per_s_b1": round(fp32["metrics"]["tokens_per_s_b1"], 1),
            "fp32_tokens_per_s_b8": round(fp32["metrics"]["tokens_per_s_b8"], 1),
            "int8_tokens_per_s_b1": round(q["metrics"]["tokens_per_s_b1"], 1),
            "int8_tokens_per_s_b8": round(q["metrics"]["tokens_per_s_b8"], 1),
            "int8_speedup_b1": round(cmp["speedup_b1"], 3), "int8_speedup_b8": round(cmp["speedup_b8"], 3),
            "fp32_mb": round(cmp["fp32_bytes"] / 1e6, 2), "int8_mb": round(cmp["int8_bytes"] / 1e6, 2),
            "int8_memory_ratio": round(cmp["memory_ratio"], 3),
            "fp32_metrics": {k: round(v, 4) for k, v in fp32["metrics"].items()},
            "int8_deltas": {k: round(v, 4) for k, v in cmp["deltas"].items()},
            "int8_gate": q["gate"]["reason"],
        }))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
