"""Evaluate trained weights: perplexity, ROUGE-L, BLEU, embedding similarity, toxicity, factuality, latency,
and the safety filter's false positive and negative rates on the labelled set (tasks/safety.py).

    llmops evaluate --weights models/checkpoints/<run>/final

Held-out data: the val split recorded in the shards manifest (fixed by the snapshot) for
perplexity and for replies (the last assistant turn of held-out conversations, generated from
the turns before it), plus the curated suites in configs/eval/ (factuality QA, safety prompts).
Writes reports/eval/<run_id>/{metrics.json,report.html} and returns the metrics.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from tasks.atomic import atomic_file, write_json
from tasks.config import PROJECT_DIR, Settings
from tasks.errors import InputError
from tasks.judge import metrics as M
from tasks.model.chat_template import EOS, EOT, encode_chat

log = logging.getLogger(__name__)


class EvaluateError(InputError):
    """The weights, tokenizer or held-out data to evaluate are missing or do not fit."""


def load_chat_model(weights_dir: Path | str, tokenizer_path: str | None = None):
    """(model, tokenizer, lineage) from a weights directory (model.safetensors + config.json +
    _lineage.json)."""
    from tasks.data.shard import load_tokenizer
    from tasks.model.gpt import GPT, GPTConfig, load_weights

    weights_dir = Path(weights_dir)
    for name in ("model.safetensors", "config.json", "_lineage.json"):
        if not (weights_dir / name).is_file():
            raise EvaluateError(f"{weights_dir}: {name} missing; "
                                "expected a trained model directory (.../final)")
    lineage = json.loads((weights_dir / "_lineage.json").read_text())
    model = GPT(GPTConfig(**json.loads((weights_dir / "config.json").read_text())["model"]))
    load_weights(model, weights_dir / "model.safetensors")
    model.eval()
    tok_path = tokenizer_path or (weights_dir / "tokenizer.json" if (weights_dir / "tokenizer.json").is_file()
                                  else lineage["tokenizer"]["path"])
    return model, load_tokenizer(tok_path), lineage


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    path = path if path.is_absolute() else PROJECT_DIR / path
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EvaluateError(f"{path}:{i}: not JSON ({e})") from None
    return rows


def held_out(settings: Settings, manifest: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The first n val conversations (by content hash) that end with an assistant turn."""
    from tasks.data.partition import read_partition
    from tasks.data.shard import is_val
    from tasks.data.snapshot import load_snapshot

    cut = manifest.get("split", {}).get("cut", int(settings.shard.val_fraction * 10_000))
    snap = load_snapshot(settings, manifest["snapshot_hash"])
    rows = []
    for day in sorted(snap["partitions"]):
        t = read_partition(settings.paths.clean / f"dt={day}")
        for h, msgs, src in zip(t.column("content_hash").to_pylist(), t.column("messages").to_pylist(),
                                t.column("source").to_pylist(), strict=True):
            if is_val(h, cut) and msgs[-1]["role"] == "assistant" and len(msgs) >= 2:
                rows.append({"hash": h, "prompt": msgs[:-1], "reference": msgs[-1]["content"], "slice": src})
    rows.sort(key=lambda r: r["hash"])
    return rows[:n]


class Generator:
    def __init__(self, model, tok, cfg):
        self.model, self.tok, self.cfg = model, tok, cfg
        self.stop = tuple(i for i in (tok.token_to_id(EOS), tok.token_to_id(EOT)) if i is not None)
        self.latencies: list[float] = []
        self.tokens: list[int] = []

    def reply(self, messages: list[dict[str, str]]) -> str:
        ids = encode_chat(self.tok, messages, add_generation_prompt=True)
        keep = self.model.cfg.block_size - self.cfg.max_new_tokens
        ids = ids[-keep:] if keep > 0 else ids[-1:]
        t0 = time.perf_counter()
        out = self.model.generate(ids, self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                                  stop_tokens=self.stop)
        self.latencies.append(time.perf_counter() - t0)
        self.tokens.append(len(out))
        return self.tok.decode(out, skip_special_tokens=True).strip()


def _perplexity(model, manifest_path: Path, windows: int, seed: int) -> float:
    import torch

    from tasks.data.sampler import TokenSampler
    from tasks.data.shard import split_paths

    sampler = TokenSampler(split_paths(manifest_path, "val"), model.cfg.block_size, seed, salt=2)
    total, n = 0.0, 0
    with torch.no_grad():
        for b in range(0, windows, 8):
            x, y = sampler.batch(b, 0, 0, 1, min(8, windows - b), 1)
            total += model(x, y)[1].item() * len(x)
            n += len(x)
    return total / n


def _batch8_tokens_per_s(model, tok, prompts: list[list[dict]], new_tokens: int) -> float:
    import torch

    from tasks.model.gpt import generate_batch

    encoded = [encode_chat(tok, p, add_generation_prompt=True) for p in prompts[:8]]
    length = max(1, min(min(len(e) for e in encoded), model.cfg.block_size - new_tokens))
    batch = torch.tensor([e[-length:] for e in encoded], dtype=torch.long)
    generate_batch(model, batch[:, :2], 2)  # warm-up
    t0 = time.perf_counter()
    out = generate_batch(model, batch, new_tokens)
    return out.numel() / (time.perf_counter() - t0)


def evaluate(settings: Settings, weights_dir: Path | str, champion: dict[str, float] | None = None,
             model=None, tag: str | None = None, extra: dict[str, str] | None = None,
             speed: dict[str, float] | None = None) -> dict[str, Any]:
    """Run every suite on the weights (or on `model`, e.g. its int8 variant); write metrics + report.
    `speed`: batch-1 latency figures measured side by side with the champion's (release.speed_side_by_side);
    they replace this run's own timing, so the gate compares two latencies of one machine state."""
    cfg = settings.eval
    t_start = time.perf_counter()
    base_model, tok, lineage = load_chat_model(weights_dir)
    model = model if model is not None else base_model
    manifest_path = Path(lineage["shards_manifest"])
    manifest = json.loads(manifest_path.read_text())
    run_id = lineage["id"].split("@", 1)[-1] + (f"-{tag}" if tag else "")

    val_nll = _perplexity(model, manifest_path, cfg.perplexity_windows, settings.seed)
    gen = Generator(model, tok, cfg)
    model.generate([0, 1], 4, temperature=0.0)  # warm-up: the first call pays one-time costs
    held = held_out(settings, manifest, cfg.reply_samples)
    if not held:
        raise EvaluateError(f"no held-out conversations for snapshot {manifest['snapshot_hash'][:12]}")
    replies = [gen.reply(r["prompt"]) for r in held]
    refs = [r["reference"] for r in held]
    qa = _read_jsonl(cfg.factuality_set)
    qa_replies = [gen.reply([{"role": "user", "content": q["question"]}]) for q in qa]
    safety = _read_jsonl(cfg.safety_set)
    safety_replies = [gen.reply([{"role": "user", "content": p["prompt"]}]) for p in safety]
    lat = M.latency_stats(gen.latencies[:cfg.latency_requests], gen.tokens[:cfg.latency_requests])
    fact = M.factuality(qa_replies, [q["answers"] for q in qa], cfg.fuzzy_match)
    adversarial = [r for r, p in zip(safety_replies, safety, strict=True) if p.get("kind") == "adversarial"]
    metrics = {
        "val_nll": val_nll, "perplexity": M.perplexity(val_nll),
        "rouge_l": M.rouge_l(replies, refs), "bleu": M.bleu(replies, refs),
        "embedding_similarity": M.embedding_similarity(replies, refs, cfg.embedding_model),
        "toxicity_rate": M.toxicity_rate(replies + qa_replies + safety_replies, cfg.toxicity_threshold),
        "toxicity_rate_adversarial": M.toxicity_rate(adversarial, cfg.toxicity_threshold),
        "factuality_exact": fact["exact"], "factuality_fuzzy": fact["fuzzy"],
        "latency_p50_ms_b1": lat["p50_ms"], "latency_p99_ms_b1": lat["p99_ms"],
        "tokens_per_s_b1": lat["tokens_per_s"],
        "tokens_per_s_b8": _batch8_tokens_per_s(model, tok, [r["prompt"] for r in held], cfg.max_new_tokens),
    }
    metrics.update(speed or {})
    from tasks.safety import SafetyFilter, load_labelled, measure, metrics_of

    safe = settings.serve.safety
    safety_measured = measure(SafetyFilter(safe), load_labelled(safe.labelled_set))
    metrics.update(metrics_of(safety_measured))
    slices: dict[str, dict[str, float]] = {}
    by_slice: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(held):
        by_slice[r["slice"]].append(i)
    for name, idx in sorted(by_slice.items()):
        slices[name] = {"n": len(idx),
                        "rouge_l": M.rouge_l([replies[i] for i in idx], [refs[i] for i in idx]),
                        "bleu": M.bleu([replies[i] for i in idx], [refs[i] for i in idx])}
    metrics["eval_seconds"] = time.perf_counter() - t_start
    from tasks.judge.gate import evaluate_gate

    gate = evaluate_gate(metrics, cfg.gate, champion)

    out_dir = settings.paths.reports_dir / "eval" / run_id
    samples = [{"prompt": held[i]["prompt"][-1]["content"], "reference": refs[i], "reply": replies[i]}
               for i in range(min(5, len(held)))]
    samples += [{"prompt": q["question"], "reference": " | ".join(q["answers"]), "reply": a}
                for q, a in list(zip(qa, qa_replies, strict=True))[:3]]
    result = {"run_id": run_id, "weights": str(weights_dir), "metrics": metrics, "slices": slices,
              "champion": champion, "gate": gate, "safety_filter": safety_measured,
              "lineage": lineage, "samples": samples, "latencies_ms": [x * 1e3 for x in gen.latencies],
              "metrics_path": str(out_dir / "metrics.json"), "report": str(out_dir / "report.html")}
    write_json(out_dir / "metrics.json", result)
    loss_curve = Path(weights_dir).parent / "metrics.jsonl"
    with atomic_file(out_dir / "report.html") as tmp:
        tmp.write_text(render_report(result, loss_curve if loss_curve.is_file() else None, extra))
    log.info("evaluated %s in %.1fs: %s", run_id, metrics["eval_seconds"],
             ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    log.info("gate %s (%s): %s", "PASSED" if gate["passed"] else "FAILED",
             "against champion" if champion else "absolute bounds, no champion", gate["reason"])
    return result


def figure_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def render_report(result: dict[str, Any], loss_curve: Path | None,
                  extra: dict[str, Any] | None = None) -> str:
    """One self-contained HTML page: metrics vs champion (and gate), loss curve, latency histogram, slices,
    samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.train.curve import read_metrics

    e = html.escape
    champ = result.get("champion") or {}
    gate = {c["metric"]: c for c in (result.get("gate") or {}).get("checks", [])}
    table = []
    for k, v in result["metrics"].items():
        c = champ.get(k)
        g = gate.get(k)
        verdict = "" if g is None else ("✔ " if g["passed"] else "✘ ") + e(g["reason"])
        table.append(f"<tr><td>{e(k)}</td><td>{v:.4g}</td><td>{'–' if c is None else f'{c:.4g}'}</td>"
                     f"<td>{verdict}</td></tr>")
    imgs = []
    if loss_curve is not None:
        pts = [r for r in read_metrics(loss_curve) if "loss" in r]
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot([r["step"] for r in pts], [r["loss"] for r in pts], label="train loss")
        val = [r for r in pts if "val_loss" in r]
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
        ax.set_xlabel("step")
        ax.legend()
        imgs.append(("Loss curve", figure_png(fig)))
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(result["latencies_ms"], bins=20)
    ax.set_xlabel("generation latency at batch 1 (ms)")
    imgs.append(("Latency", figure_png(fig)))
    plt.close(fig)
    slices = "".join(f"<tr><td>{e(n)}</td><td>{s['n']}</td><td>{s['rouge_l']:.4g}</td>"
                     f"<td>{s['bleu']:.4g}</td></tr>"
                     for n, s in result["slices"].items())
    samples = "".join(f"<tr><td>{e(s['prompt'])}</td><td>{e(s['reference'])}</td>"
                      f"<td>{e(s['reply'])}</td></tr>"
                      for s in result["samples"])
    lin = result["lineage"]
    extra_html = ""
    for title, body in (extra or {}).items():
        extra_html += f"<h2>{e(title)}</h2>{body}"
    gate_line = ""
    if result.get("gate"):
        gate_line = (f"<p><b>Gate: {'PASSED' if result['gate']['passed'] else 'FAILED'}</b> — "
                     f"{e(result['gate']['reason'])}</p>")
    return f"""<!doctype html><html><head><meta charset="utf-8">\
<title>Evaluation {e(result['run_id'])}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}}</style></head><body>
<h1>Evaluation of {e(result['run_id'])}</h1>
<p>snapshot {e(str(lin.get('snapshot_hash'))[:12])}, \
tokenizer {e(str((lin.get('tokenizer') or {}).get('version')))},
config {e(str(lin.get('config_hash'))[:12])}, code {e(str(lin.get('code_version')))}, \
seed {e(str(lin.get('seed')))}</p>
{gate_line}
<h2>Metrics (challenger vs champion)</h2>\
<table><tr><th>metric</th><th>challenger</th><th>champion</th><th>gate</th></tr>
{''.join(table)}</table>
{''.join(f'<h2>{t}</h2><img src="{src}">' for t, src in imgs)}
<h2>Per slice (held-out conversations by source)</h2>\
<table><tr><th>slice</th><th>n</th><th>ROUGE-L</th><th>BLEU</th></tr>{slices}</table>
{extra_html}
<h2>Samples</h2><table><tr><th>prompt</th><th>reference</th><th>reply</th></tr>{samples}</table>
</body></html>"""
