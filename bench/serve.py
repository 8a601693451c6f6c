"""Serving benchmark: prints one JSON line of figures, all measured in this one run.

    python bench/serve.py [--profile tiny] [--max-tokens 32] [--device cpu|gpu] [--tune]

Builds a tokenizer from synthetic data (the real pipeline: synth -> ingest -> snapshot -> shard),
gives the profile's GPT shape random weights (serving cost does not depend on the values, and with
them every request runs to max_tokens, so all figures compare like for like), exports it twice
into one Triton repository (dynamic batching on, and off), starts the real tritonserver and the
gateway, then measures from a client in this process:
- Triton direct (tritonclient gRPC, asyncio): throughput and p50/p99 latency at concurrency 1, 4,
  16, dynamic batching on and off; the mean Triton batch size seen
- streaming through the gateway (server-sent events): time to first token p50/p99 at concurrency 4
- gateway overhead: p50 latency through the gateway vs tritonclient direct at concurrency 1
  (4 interleaved rounds each, medians)
- cost per 1M completion tokens at the best measured throughput and serve.gateway.cost_per_hour_usd
- with --tune: `llmops tune-serving`'s grid on chat-gpt; the chosen setting against the default
  (serve.triton's), throughput ratio and p99 of both, and the best throughput at the default's p99 or better
The client shares the machine with the servers; on 2 cores that costs the server some CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.config import PROJECT_DIR, load_settings  # noqa: E402
from tasks.serve import triton  # noqa: E402
from tasks.serve.export import export_dir  # noqa: E402
from tasks.serve.loadgen import PROMPTS, direct  # noqa: E402
from tasks.serve.loadgen import pct as _pct  # noqa: E402
from tasks.serve.server import wait_gateway  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build(root: Path, profile: str, overrides: list[str], tokenizer: Path | None) -> tuple:
    import torch
    from safetensors.torch import save_file

    from tasks.model.gpt import GPT, GPTConfig

    s = load_settings(profile, [f"paths.root={root}", *overrides])
    if tokenizer is None:  # the real data path: synth -> ingest -> snapshot -> shard trains the tokenizer
        from tasks.data.ingest import ingest
        from tasks.data.shard import shard
        from tasks.data.snapshot import snapshot
        from tasks.data.synth import synth

        synth(s, days=1, start="2026-11-01", records=300, faults=False, chatterbot=True)
        ingest("2026-11-01", s)
        snapshot(s)
        manifest = json.loads(Path(shard(s)["manifest"]).read_text())
        tok_path = Path(manifest["tokenizer"]["path"])
    else:
        tok_path = tokenizer
    from tokenizers import Tokenizer

    vocab = -(-Tokenizer.from_file(str(tok_path)).get_vocab_size() // 64) * 64
    cfg = GPTConfig(vocab_size=vocab, n_layer=s.model.n_layer, n_head=s.model.n_head, d_model=s.model.d_model,
                    block_size=s.model.block_size, pos=s.model.pos)
    torch.manual_seed(0)
    model = GPT(cfg)
    w = root / "weights"
    w.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(w / "model.safetensors"))
    (w / "config.json").write_text(json.dumps({"model": cfg.to_dict()}))
    (w / "_lineage.json").write_text(json.dumps({"id": "bench-random-init",
                                                 "tokenizer": {"path": str(tok_path)}}))
    shutil.copy2(tok_path, w / "tokenizer.json")
    export_dir(s, w, "chat-gpt", 1, aliases={"champion": 1})
    nb = load_settings(profile, [f"paths.root={root}", *overrides, "serve.triton.dynamic_batching=false"])
    export_dir(nb, w, "chat-gpt-nobatch", 1)
    return s, cfg.n_params(non_embedding=False)


async def through_gateway(base: str, concurrency: int, n: int, max_tokens: int, stream: bool) -> dict:
    import httpx

    lat, ttft = [], []
    counter = iter(range(n))
    async with httpx.AsyncClient(timeout=300) as http:
        async def worker():
            for i in counter:
                body = {"model": "chat-gpt", "max_tokens": max_tokens, "temperature": 0, "stream": stream,
                        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
                t0 = time.perf_counter()
                if stream:
                    first = None
                    async with http.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
                        async for line in r.aiter_lines():
                            if first is None and line.startswith("data: ") and '"content": "' in line and \
                                    '"content": ""' not in line:
                                first = time.perf_counter() - t0
                    ttft.append(first if first is not None else time.perf_counter() - t0)
                else:
                    r = await http.post(f"{base}/v1/chat/completions", json=body)
                    r.raise_for_status()
                lat.append(time.perf_counter() - t0)

        await asyncio.gather(*[worker() for _ in range(min(concurrency, 2))])
        lat.clear(), ttft.clear()
        counter = iter(range(n))
        await asyncio.gather(*[worker() for _ in range(concurrency)])
    out = {"p50_ms": round(_pct(lat, 50) * 1e3, 1), "p99_ms": round(_pct(lat, 99) * 1e3, 1)}
    if stream:
        out |= {"ttft_p50_ms": round(_pct(ttft, 50) * 1e3, 1), "ttft_p99_ms": round(_pct(ttft, 99) * 1e3, 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--dtype", default=None,
                    help="float32 | bfloat16 | float16 (default: float32 on cpu, bfloat16 on gpu)")
    ap.add_argument("--requests", type=int, default=8, help="requests per concurrent client per setting")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="a tokenizer.json to use instead of building one")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated client concurrencies")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="config override, e.g. serve.triton.instances=2")
    ap.add_argument("--tune", action="store_true",
                    help="also run the tuner (serve.tune's grid, `llmops tune-serving`) on "
                    "chat-gpt and report its chosen setting against the default")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="llmops-bench-serve-"))
    dtype = a.dtype or ("bfloat16" if a.device == "gpu" else "float32")
    ports = {k: free_port() for k in ("http", "grpc", "metrics", "gateway")}
    overrides = [f"serve.triton.http_port={ports['http']}", f"serve.triton.grpc_port={ports['grpc']}",
                 f"serve.triton.metrics_port={ports['metrics']}", f"serve.gateway.port={ports['gateway']}",
                 f"serve.triton.device={a.device}", f"serve.triton.dtype={dtype}",
                 "serve.gateway.log_requests=false",
                 "serve.gateway.max_inflight=64", "serve.gateway.max_queue=256", *a.overrides]
    tp = gw = None
    try:
        s, n_params = build(root, a.profile, overrides, a.tokenizer)
        tp = triton.start(s, models=("chat-gpt", "chat-gpt-stream", "chat-gpt-nobatch"))
        args = [sys.executable, "-m", "tasks.serve.gateway", "--profile", a.profile,
                *[x for o in (f"paths.root={root}", *overrides) for x in ("--set", o)]]
        log = root / "gateway.log"
        with open(log, "ab") as out:
            gw = subprocess.Popen(args, cwd=PROJECT_DIR, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True, env={**os.environ, "NO_PROXY": "127.0.0.1"})
        base = f"http://127.0.0.1:{ports['gateway']}"
        wait_gateway(f"{base}/v1", 60, log)

        grpc_url = f"127.0.0.1:{ports['grpc']}"
        results: dict[str, dict] = {}
        for model, label in (("chat-gpt", "batched"), ("chat-gpt-nobatch", "unbatched")):
            for c in [int(x) for x in a.concurrency.split(",")]:
                results[f"{label}_c{c}"] = asyncio.run(direct(grpc_url, model, c, a.requests * c,
                                                              a.max_tokens))
                print(f"{label} c{c}: {results[f'{label}_c{c}']}", file=sys.stderr, flush=True)
        gw_c1, direct_c1 = {"p50_ms": [], "p99_ms": []}, {"p50_ms": [], "p99_ms": []}
        for _ in range(4):  # interleaved rounds, so drift in the machine's load hits both sides alike
            for out, r in (
                    (gw_c1, asyncio.run(through_gateway(base, 1, a.requests, a.max_tokens, stream=False))),
                    (direct_c1, asyncio.run(direct(grpc_url, "chat-gpt", 1, a.requests, a.max_tokens)))):
                out["p50_ms"].append(r["p50_ms"])
                out["p99_ms"].append(r["p99_ms"])
        gw_c1 = {k: float(np.median(v)) for k, v in gw_c1.items()}
        direct_c1 = {k: float(np.median(v)) for k, v in direct_c1.items()}
        streaming = asyncio.run(through_gateway(base, 4, a.requests * 4, a.max_tokens, stream=True))
        b1 = results["unbatched_c1"]
        top = max(int(x) for x in a.concurrency.split(","))
        c16 = results[f"batched_c{top}"]
        best_tps = max(r["tokens_per_s"] for r in results.values())
        cost_h = s.serve.gateway.cost_per_hour_usd
        tuned = None
        # last: it reloads chat-gpt with each setting of the grid (and its own configuration at the end)
        if a.tune:
            from tasks.serve.tune import compare, tune

            # the load shape of the figures above (top concurrency, --max-tokens) unless --set says otherwise
            shape = {k: v for k, v in (("concurrency", top), ("max_tokens", a.max_tokens))
                     if not any(o.startswith(f"serve.tune.{k}=") for o in a.overrides)}
            ts = s.model_copy(update={"serve": s.serve.model_copy(
                update={"tune": s.serve.tune.model_copy(update=shape)})})
            report = tune(ts, tp.http_url, tp.grpc_url, "chat-gpt", out_dir=root / "tune")
            tuned = {**compare(report), "points": len(report["points"]), "load": report["load"],
                     "warnings": report["warnings"]}
        print(json.dumps({
            "bench": "serve", "device": a.device, "dtype": dtype, "cpus": os.cpu_count(),
            "profile": a.profile, "params": n_params, "max_tokens": a.max_tokens, "overrides": a.overrides,
            "instances": s.serve.triton.instances, "max_queue_delay_us": s.serve.triton.max_queue_delay_us,
            "triton_direct": results,
            "top_concurrency": top,
            "c16_batched_vs_b1_throughput": round(c16["tokens_per_s"] / b1["tokens_per_s"], 2),
            "c16_batched_p99_vs_b1_p99": round(c16["p99_ms"] / b1["p99_ms"], 2),
            "c16_unbatched_vs_b1_throughput": round(results[f"unbatched_c{top}"]["tokens_per_s"]
                                                    / b1["tokens_per_s"], 2),
            "streaming_c4": streaming,
            "gateway_c1": gw_c1, "direct_c1": direct_c1,
            "gateway_overhead_p50": round(gw_c1["p50_ms"] / direct_c1["p50_ms"] - 1, 3),
            "cost_per_hour_usd": cost_h,
            "cost_per_1m_tokens_usd": round(cost_h / (best_tps * 3600) * 1e6, 4),
            **({"tune": tuned} if tuned is not None else {}),
        }))
    finally:
        if gw is not None:
            triton.stop_group(gw.pid)
        if tp is not None:
            tp.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
