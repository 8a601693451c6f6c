"""Serving benchmark: prints one JSON line of figures, all measured in this one run.

    python bench/serve.py [--profile tiny] [--max-tokens 32] [--requests 200] [--device cpu|gpu]

Builds a tokenizer from synthetic data (the real pipeline: synth -> ingest -> snapshot -> shard),
gives the profile's GPT shape random weights (serving cost does not depend on the values), and
exports it twice into one Triton repository: `chat-gpt` with the continuous-batching engine
(serve.engine: sequences join and leave the running batch at every step) and `chat-gpt-static`
with the per-execute() scheduler (each dynamic batch runs to its end: the engine before). Starts the
real tritonserver and the gateway, then measures from a client in this process:
- the ceiling: the same weights in process, `GPT.generate()` at batch 1 and `generate_batch` at
  the top concurrency (a plain eager torch.cat KV-cache loop, one forward per token), with as many
  torch threads as the served instances have in all;
- closed loop, Triton direct (tritonclient gRPC streams, `stream` false), c1/c4/c16/c32, both
  engines interleaved point by point, `--requests` per point, `--rounds` rounds (the ratios are
  given per round: their spread is the run-to-run noise);
- open loop: Poisson arrivals at `--rates` per second, both engines interleaved per rate; the
  highest rate each sustains within the p99 SLO (monitor.slo_p99_ms, or --slo-p99-ms) without
  errors or falling behind (achieved >= 90 % of the rate);
- gateway vs direct at c1: `--requests` each, in interleaved blocks of 10; p50 overhead with the
  spread over blocks;
- streaming through the gateway at c4: time to first token p50/p99;
- memory: RSS and PSS of each served model's backend processes (both instances), per version;
- cost per 1M completion tokens at the best measured throughput and serve.gateway.cost_per_hour_usd.
Random weights may emit a stop token early: every figure is in completion tokens actually produced.
The client shares the machine with the servers; on 2 cores that costs the servers some CPU.
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

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.config import PROJECT_DIR, load_settings  # noqa: E402
from tasks.serve import triton  # noqa: E402
from tasks.serve.export import export_dir  # noqa: E402
from tasks.serve.loadgen import PROMPTS, measure, open_loop  # noqa: E402
from tasks.serve.loadgen import pct as _pct  # noqa: E402
from tasks.serve.server import wait_gateway  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


STATIC = "chat-gpt-static"  # the same weights, per-execute() scheduling


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
    static = load_settings(profile, [f"paths.root={root}", *overrides, "serve.engine.scheduler=execute"])
    export_dir(static, w, STATIC, 1)
    return s, cfg, w


async def through_gateway(base: str, concurrency: int, n: int, max_tokens: int, stream: bool) -> dict:
    import httpx

    lat: list[float] = []
    ttft: list[float] = []
    async with httpx.AsyncClient(timeout=300) as http:
        async def worker():
            for i in counter:  # the iterator of the phase under way (warm-up, then measured)
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

        counter = iter(range(min(n, 8)))
        await asyncio.gather(*[worker() for _ in range(min(concurrency, 2))])
        lat.clear(), ttft.clear()
        counter = iter(range(n))
        await asyncio.gather(*[worker() for _ in range(concurrency)])
    out = {"p50_ms": round(_pct(lat, 50) * 1e3, 2), "p99_ms": round(_pct(lat, 99) * 1e3, 2),
           "latencies_ms": [round(x * 1e3, 3) for x in lat]}
    if stream:
        out |= {"ttft_p50_ms": round(_pct(ttft, 50) * 1e3, 1), "ttft_p99_ms": round(_pct(ttft, 99) * 1e3, 1)}
    return out


def ceiling(weights: Path, cfg, threads: int, batches: list[int], max_tokens: int, repeats: int,
            device: str = "cpu", dtype: str = "float32") -> dict:
    """Tokens/s of the same weights in process: generate() at batch 1, generate_batch at `batches` (the
    plain eager anchor: a torch.cat KV cache, one forward per token, no graphs), on the serving
    device and dtype."""
    import torch
    from tokenizers import Tokenizer

    from tasks.model.chat_template import encode_chat
    from tasks.model.gpt import GPT, generate_batch, load_weights

    torch.set_num_threads(threads)
    model = GPT(cfg)
    load_weights(model, weights / "model.safetensors")
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    model.to(dev, dtype=getattr(torch, dtype)).eval()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()
    tok = Tokenizer.from_file(str(weights / "tokenizer.json"))
    prompt = encode_chat(tok, [{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True)
    out = {}
    model.generate(prompt, 4, temperature=0.0)  # warm-up
    for b in sorted({1, *batches}):
        rates = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            if b == 1:
                n = len(model.generate(prompt, max_tokens, temperature=0.0))
            else:
                n = generate_batch(model, torch.tensor([prompt] * b, device=dev), max_tokens).numel()
            sync()
            rates.append(n / (time.perf_counter() - t0))
        out[f"b{b}_tokens_per_s"] = round(float(np.median(rates)), 1)
    return out


def rss(repository: Path, model: str, version: int = 1) -> dict:
    """RSS and PSS (MB) of the backend stub processes that serve one model version (all instances)."""
    total_rss = total_pss = 0
    procs = 0
    needle = f"{repository}/{model}/{version}/model.py"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "triton_python_backend_stub" not in cmd or needle not in cmd:
                continue
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        fields = {ln.split(":")[0]: int(ln.split()[1]) for ln in rollup.splitlines()[1:] if ln.endswith("kB")}
        total_rss += fields.get("Rss", 0)
        total_pss += fields.get("Pss", 0)
        procs += 1
    return {"processes": procs, "rss_mb": round(total_rss / 1024, 1), "pss_mb": round(total_pss / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--dtype", default=None,
                    help="float32 | bfloat16 | float16 (default: float32 on cpu, bfloat16 on gpu)")
    ap.add_argument("--requests", type=int, default=200, help="measured requests per point")
    ap.add_argument("--rounds", type=int, default=2, help="passes over the closed-loop points")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="a tokenizer.json to use instead of building one")
    ap.add_argument("--concurrency", default="1,4,16,32", help="comma-separated closed-loop concurrencies")
    ap.add_argument("--rates", default="5,10,20,40,80,160", help="open-loop arrival rates (requests/s)")
    ap.add_argument("--slo-p99-ms", type=float, default=None, help="default: monitor.slo_p99_ms")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="config override, e.g. serve.engine.max_seqs=32")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="llmops-bench-serve-"))
    dtype = a.dtype or ("bfloat16" if a.device == "gpu" else "float32")
    ports = {k: free_port() for k in ("http", "grpc", "metrics", "gateway")}
    overrides = [f"serve.triton.http_port={ports['http']}", f"serve.triton.grpc_port={ports['grpc']}",
                 f"serve.triton.metrics_port={ports['metrics']}", f"serve.gateway.port={ports['gateway']}",
                 f"serve.triton.device={a.device}", f"serve.triton.dtype={dtype}",
                 "serve.gateway.log_requests=false", "serve.memory.enabled=false",
                 "serve.gateway.max_inflight=64", "serve.gateway.max_queue=256", *a.overrides]
    concs = [int(x) for x in a.concurrency.split(",")]
    top = max(concs)
    tp = gw = None
    t_start = time.perf_counter()
    try:
        s, cfg, weights = build(root, a.profile, overrides, a.tokenizer)
        slo = a.slo_p99_ms or s.monitor.slo_p99_ms
        t = s.serve.triton
        threads = t.instances * (t.threads_per_instance or 1)
        ceil = ceiling(weights, cfg, threads, [c for c in concs if c in (16, top)], a.max_tokens, repeats=5,
                       device=a.device, dtype=dtype)
        print(f"in process: {ceil}", file=sys.stderr, flush=True)
        tp = triton.start(s, models=("chat-gpt", STATIC))
        args = [sys.executable, "-m", "tasks.serve.gateway", "--profile", a.profile,
                *[x for o in (f"paths.root={root}", *overrides) for x in ("--set", o)]]
        log = root / "gateway.log"
        with open(log, "ab") as out:
            gw = subprocess.Popen(args, cwd=PROJECT_DIR, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True, env={**os.environ, "NO_PROXY": "127.0.0.1"})
        base = f"http://127.0.0.1:{ports['gateway']}"
        wait_gateway(f"{base}/v1", 60, log)
        grpc_url = f"127.0.0.1:{ports['grpc']}"
        engines = {"continuous": "chat-gpt", "static": STATIC}

        def closed(model: str, c: int) -> dict:
            r = asyncio.run(measure(grpc_url, model, c, requests=a.requests, max_tokens=a.max_tokens,
                                    warmup=min(16, a.requests), warmup_concurrency=min(c, 4)))
            if r["errors"]:
                raise RuntimeError(f"{r['errors']} requests to {model} failed; the first: {r['first_error']}")
            return {k: r[k] for k in ("req_per_s", "tokens_per_s", "p50_ms", "p99_ms", "mean_batch")}

        rounds: list[dict] = []
        for i in range(a.rounds):
            one: dict[str, dict] = {}
            for c in concs:
                for name, model in (engines.items() if i % 2 == 0 else reversed(engines.items())):
                    one[f"{name}_c{c}"] = closed(model, c)
                    print(f"round {i} {name} c{c}: {one[f'{name}_c{c}']}", file=sys.stderr, flush=True)
            rounds.append(one)

        def ratio(key_a: str, key_b: str, field: str) -> dict:
            vals = [r[key_a][field] / r[key_b][field] for r in rounds]
            return {"median": round(float(np.median(vals)), 3), "rounds": [round(v, 3) for v in vals]}

        sustained: dict[str, float] = {}
        open_points: dict[str, list] = {name: [] for name in engines}
        failed: set[str] = set()
        for rate in [float(x) for x in a.rates.split(",")]:
            for name, model in engines.items():
                if name in failed:
                    continue
                n = max(a.requests // 2, 20)
                r = asyncio.run(open_loop(grpc_url, model, rate, n, a.max_tokens, seed=1))
                ok = not r["errors"] and r["p99_ms"] <= slo and r["achieved_rate"] >= 0.9 * rate
                open_points[name].append({**r, "within_slo": ok})
                print(f"open {name} {rate}/s: {r} ok={ok}", file=sys.stderr, flush=True)
                if ok:
                    sustained[name] = rate
                else:
                    failed.add(name)

        gw_lat, direct_lat, blocks = [], [], []
        for _ in range(max(1, a.requests // 10)):  # interleaved blocks of 10
            g = asyncio.run(through_gateway(base, 1, 10, a.max_tokens, stream=False))
            d = asyncio.run(measure(grpc_url, "chat-gpt", 1, requests=10, max_tokens=a.max_tokens))
            gw_lat += g["latencies_ms"]
            blocks.append(g["p50_ms"] / d["p50_ms"] - 1)
            direct_lat.append(d["p50_ms"])
        d_all = asyncio.run(measure(grpc_url, "chat-gpt", 1, requests=a.requests, max_tokens=a.max_tokens))
        streaming = asyncio.run(through_gateway(base, 4, a.requests, a.max_tokens, stream=True))
        streaming.pop("latencies_ms")
        memory = {name: rss(s.paths.triton_repository, model) for name, model in engines.items()}
        engine_stats = {}
        for line in httpx.get(tp.metrics_url, timeout=10).text.splitlines():
            if line.startswith("llmops_engine_") and 'model="chat-gpt"' in line:
                name = line.split("{", 1)[0].removeprefix("llmops_engine_")
                engine_stats[name] = engine_stats.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        if engine_stats.get("steps"):
            engine_stats["ms_per_step"] = round(engine_stats["busy_seconds"] / engine_stats["steps"] * 1e3, 3)
            engine_stats["tokens_per_step"] = round(engine_stats["decode_tokens"] / engine_stats["steps"], 2)
        best_tps = max(p["tokens_per_s"] for r in rounds for p in r.values())
        cost_h = s.serve.gateway.cost_per_hour_usd
        c1, mid = "continuous_c1", max(c for c in concs if c <= 16)
        med = {k: {f: float(np.median([r[k][f] for r in rounds])) for f in rounds[0][k]} for k in rounds[0]}
        print(json.dumps({
            "bench": "serve", "device": a.device, "dtype": dtype, "cpus": os.cpu_count(),
            "profile": a.profile, "params": cfg.n_params(non_embedding=False), "max_tokens": a.max_tokens,
            "requests_per_point": a.requests, "rounds": a.rounds, "overrides": a.overrides,
            "instances": t.instances, "engine": s.serve.engine.model_dump(),
            "in_process": ceil,
            "closed_loop": med, "closed_loop_rounds": rounds,
            "goals": {
                f"c{mid}_vs_c1_throughput": ratio(f"continuous_c{mid}", c1, "tokens_per_s"),
                f"c{mid}_p99_vs_c1_p99": ratio(f"continuous_c{mid}", c1, "p99_ms"),
                f"static_c{mid}_vs_c1_throughput": ratio(f"static_c{mid}", "static_c1", "tokens_per_s"),
                f"static_c{mid}_p99_vs_c1_p99": ratio(f"static_c{mid}", "static_c1", "p99_ms"),
                "served_c1_vs_in_process_b1": round(med[c1]["tokens_per_s"] / ceil["b1_tokens_per_s"], 3),
                **{f"served_c{c}_vs_in_process_b{c}": round(
                    med[f"continuous_c{c}"]["tokens_per_s"] / ceil[f"b{c}_tokens_per_s"], 3)
                   for c in sorted({16, top} & set(concs))},
                "open_loop_max_rate": sustained,
                "open_loop_rate_ratio": (
                    round(sustained["continuous"] / sustained["static"], 2)
                    if sustained.get("continuous") and sustained.get("static") else None),
                "gateway_overhead_p50": round(_pct(gw_lat, 50) / d_all["p50_ms"] - 1, 3),
                "gateway_overhead_p50_blocks": {"median": round(float(np.median(blocks)), 3),
                                                "min": round(min(blocks), 3), "max": round(max(blocks), 3)},
                "rss_per_version_mb": memory["continuous"]["rss_mb"],
                "pss_per_version_mb": memory["continuous"]["pss_mb"],
            },
            "open_loop": open_points, "slo_p99_ms": slo,
            "gateway_c1_p50_ms": round(_pct(gw_lat, 50), 2), "direct_c1_p50_ms": d_all["p50_ms"],
            "streaming_c4": streaming, "memory": memory, "engine_counters": engine_stats,
            "cost_per_hour_usd": cost_h, "cost_per_1m_tokens_usd": round(cost_h / (best_tps * 3600) * 1e6, 4),
            "wall_s": round(time.perf_counter() - t_start, 1),
        }))
    finally:
        if gw is not None:
            triton.stop_group(gw.pid)
        if tp is not None:
            tp.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
