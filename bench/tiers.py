"""Model tiers benchmark: prints one JSON line of figures, all measured in this one run.

    python bench/tiers.py [--steps 150]

Trains the `tiny` model once (1 rank, ZeRO-0) on synthetic data in a temporary root, distills the
`distill` section's student from it for as many steps, and evaluates every tier with the same
suite one after another on this machine: fp32, int8 (dynamic), int4 (weight-only, group size
`eval.int4_group_size`) and the distilled student. For each tier: the quality metrics, tokens/s at
batch 1 and 8, p99 latency at batch 1 and the model's bytes, each also as a ratio to fp32
(`<metric>_vs_fp32`), plus $ per 1M tokens at serve.gateway.cost_per_hour_usd. The tier report
(tasks/judge/tiers.py) is written too, inside the temporary root.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _tiny import train_tiny  # noqa: E402  (bench/ is this script's own directory on sys.path)

from tasks.judge.evaluate import evaluate, load_chat_model  # noqa: E402
from tasks.judge.quantize import evaluate_int4, evaluate_int8, model_bytes  # noqa: E402
from tasks.judge.tiers import tiers_report  # noqa: E402
from tasks.train.distill import distill, resolve_teacher, student_settings  # noqa: E402

METRICS = ("perplexity", "rouge_l", "bleu", "embedding_similarity", "toxicity_rate", "factuality_fuzzy",
           "tokens_per_s_b1", "tokens_per_s_b8", "latency_p99_ms_b1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="llmops-bench-tiers-"))
    try:
        s, weights = train_tiny(root, a.steps)
        teacher = resolve_teacher(s, weights_dir=weights)
        student_dir = Path(distill(s, teacher, manifest=None, resume=False)["weights"]).parent

        fp32 = evaluate(s, weights)
        evals = {"fp32": fp32, "int8": evaluate_int8(s, weights, fp32),
                 "int4": evaluate_int4(s, weights, fp32),
                 "distilled": evaluate(student_settings(s, weights), student_dir)}
        sizes = {"fp32": model_bytes(load_chat_model(weights)[0]), "int8": evals["int8"]["model_bytes"],
                 "int4": evals["int4"]["model_bytes"],
                 "distilled": model_bytes(load_chat_model(student_dir)[0])}
        report = tiers_report(s, evals, model_bytes=sizes)

        tiers = {}
        for tier, ev in evals.items():
            m = ev["metrics"]
            row = {k: round(m[k], 4) for k in METRICS}
            row["memory_bytes"] = sizes[tier]
            row["cost_per_1m_tokens_usd"] = round(report["values"][tier]["cost_per_1m_tokens_usd"], 4)
            if tier != "fp32":
                row |= {f"{k}_vs_fp32": round(m[k] / fp32["metrics"][k], 3) if fp32["metrics"][k] else None
                        for k in METRICS}
                row["memory_vs_fp32"] = round(sizes[tier] / sizes["fp32"], 3)
                # quantized: against fp32; the student: absolute bounds only
                row["gate"] = ev["gate"]["reason"]
            tiers[tier] = row
        print(json.dumps({
            "bench": "tiers", "cpus": os.cpu_count(), "profile": "tiny", "train_steps": a.steps,
            "int4_group_size": s.eval.int4_group_size,
            "int4_kernel_layers": evals["int4"]["int4"]["kernel_layers"],
            "int4_layers": evals["int4"]["int4"]["layers"],
            "student": {k: getattr(s.distill, k) for k in ("n_layer", "n_head", "d_model")},
            "replies": s.eval.reply_samples, "max_new_tokens": s.eval.max_new_tokens, "tiers": tiers,
        }))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
