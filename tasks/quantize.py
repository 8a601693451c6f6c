"""The int8 tier: dynamic int8 quantization (torch.ao) of the linear layers, evaluated by the same suite.

    llmops quantize [--weights DIR]

The variant is a recipe applied to the same safetensors weights at load time (dynamic
quantization is deterministic), so it is registered with its parent's lineage and nothing
quantized is ever pickled. It is registered only if it passes its own gate, with the fp32
parent's metrics in the champion's place: its quality drop must stay within the configured
regressions. Its report puts the quality drop beside the measured speed and memory gain.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import torch

from tasks.config import Settings

log = logging.getLogger(__name__)


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the model with every nn.Linear dynamically quantized to int8 (weights int8, activations fp32)."""
    import copy

    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(copy.deepcopy(model).eval(), {torch.nn.Linear}, dtype=torch.qint8)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's state (int8 packed weights count as int8) — serialised in memory only."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def evaluate_int8(settings: Settings, weights_dir: Path | str, fp32_eval: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the int8 variant; its gate compares it with its fp32 parent."""
    from tasks.evaluate import evaluate, load_chat_model
    from tasks.gate import evaluate_gate

    model, _, _ = load_chat_model(weights_dir)
    qmodel = quantize_int8(model)
    fp32_m = fp32_eval["metrics"]
    sizes = {"fp32_bytes": model_bytes(model), "int8_bytes": model_bytes(qmodel)}
    ev = evaluate(settings, weights_dir, champion=fp32_m, model=qmodel, tag="int8")
    q = ev["metrics"]
    comparison = {
        **sizes, "memory_ratio": sizes["int8_bytes"] / sizes["fp32_bytes"],
        "speedup_b1": q["tokens_per_s_b1"] / fp32_m["tokens_per_s_b1"],
        "speedup_b8": q["tokens_per_s_b8"] / fp32_m["tokens_per_s_b8"],
        "deltas": {k: q[k] - fp32_m[k] for k in q if k in fp32_m and k != "eval_seconds"},
    }
    ev["int8"] = comparison
    ev["gate"] = evaluate_gate(q, settings.eval.gate, fp32_m)  # its own gate, against its parent
    _rewrite_report(ev, weights_dir, comparison)
    log.info("int8: %.2fx memory, %.2fx tokens/s at batch 1, %.2fx at batch 8; gate %s: %s", comparison["memory_ratio"],
             comparison["speedup_b1"], comparison["speedup_b8"], "PASSED" if ev["gate"]["passed"] else "FAILED",
             ev["gate"]["reason"])
    return ev


def _rewrite_report(ev: dict[str, Any], weights_dir: Path | str, cmp: dict[str, Any]) -> None:
    import html

    from tasks.atomic import atomic_file, write_json
    from tasks.evaluate import render_report

    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:+.4g}</td></tr>" for k, v in cmp["deltas"].items())
    body = (f"<p>memory {cmp['fp32_bytes'] / 1e6:.2f} MB → {cmp['int8_bytes'] / 1e6:.2f} MB "
            f"(×{cmp['memory_ratio']:.2f}); tokens/s ×{cmp['speedup_b1']:.2f} at batch 1, "
            f"×{cmp['speedup_b8']:.2f} at batch 8 (measured in this evaluation)</p>"
            f"<table><tr><th>metric</th><th>int8 − fp32</th></tr>{rows}</table>")
    loss = Path(weights_dir).parent / "metrics.jsonl"
    with atomic_file(ev["report"]) as tmp:
        tmp.write_text(render_report(ev, loss if loss.is_file() else None, {"int8 vs fp32: quality drop beside speed and memory": body}))
    write_json(ev["metrics_path"], ev)
