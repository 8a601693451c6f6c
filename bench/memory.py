"""Session memory and SLO-aware serving benchmark: prints one JSON line, every figure from this run.

    python bench/memory.py [--profile tiny] [--requests 96] [--concurrency 16]

- recall: what long-term memory adds to a request (the question's MiniLM embedding, the index
  search over a session's memories, fitting them into the prompt), p50/p99 over distinct
  questions (embedding cache misses) and over repeated ones (hits)
- bytes per session after 10 / 100 / 1000 exchanges: long-term (index: text + vector + record,
  capped by serve.memory.max_bytes_per_session) and short-term (the turns the context store keeps)
- coalescing: a duplicate-heavy load (a handful of distinct greedy prompts) through the gateway,
  coalescing on vs off in interleaved rounds against one tritonserver: Triton inferences, requests/s
  and p99
- tuner: `llmops tune-serving`'s grid on the same server and model; the chosen setting's throughput
  vs the default's (serve.engine and serve.triton as configured), with both p99s
The model is the profile's GPT shape with random weights (bench/serve.py's build): serving cost does
not depend on the values.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve import build, free_port  # noqa: E402  (bench/ is this script's own directory on sys.path)

from tasks.config import PROJECT_DIR, MemoryConfig, load_settings  # noqa: E402
from tasks.data.synth import conversation  # noqa: E402
from tasks.model.chat_template import with_memories  # noqa: E402
from tasks.serve import triton  # noqa: E402
from tasks.serve.loadgen import pct  # noqa: E402
from tasks.serve.memory import SessionMemory  # noqa: E402
from tasks.serve.server import wait_gateway  # noqa: E402
from tasks.serve.sessions import MemoryStore  # noqa: E402


def _exchanges(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    while len(out) < n:
        msgs = conversation(rng)["messages"]
        out += [(a["content"], b["content"]) for a, b in zip(msgs, msgs[1:], strict=False)
                if a["role"] == "user" and b["role"] == "assistant"]
    return out[:n]


async def _fill(memory: SessionMemory, session: str, exchanges: list[tuple[str, str]]) -> None:
    for u, r in exchanges:
        await memory.remember(session, None, u, r)
    while await memory.queue.pending():
        await memory.process(await memory.queue.get(64, timeout=1))


async def recall_and_bytes(tokenizer, block: int, max_tokens: int) -> dict:
    memory = SessionMemory(MemoryConfig(), ("email", "phone", "card", "ip"), run_worker=False)
    await memory.wait_ready()
    cfg = memory.cfg
    await _fill(memory, "bench", _exchanges(100, 1))
    questions = [u for u, _ in _exchanges(400, 2)][200:400]  # other conversations: distinct questions

    async def one(q: str) -> float:
        t0 = time.perf_counter()
        hits = await memory.recall("bench", None, q, [])
        with_memories(tokenizer, [m.text for m, _ in hits], [{"role": "user", "content": q}],
                      block - max_tokens, cfg.max_prompt_share)
        return (time.perf_counter() - t0) * 1e3

    for q in questions[:10]:  # warm-up (first calls of the encoder)
        await one(q)
    miss = [await one(q) for q in questions[10:]]
    hit = [await one(questions[10 + i % 10]) for i in range(100)]  # repeated: the query-embedding cache
    recalled = [len(await memory.recall("bench", None, q, [])) for q in questions[10:60]]

    per_session = {}
    store = MemoryStore(64, 86_400, 10)  # the short-term store at serve.gateway's defaults (32 turns kept)
    from tasks.config import GatewayConfig

    store.max_turns = GatewayConfig().session_max_turns
    for n in (10, 100, 1000):
        sid = f"bytes-{n}"
        ex = _exchanges(n, 10 + n)
        await _fill(memory, sid, ex)
        for u, r in ex:
            await store.append(sid, [{"role": "user", "content": u}, {"role": "assistant", "content": r}])
        short = len(json.dumps(await store.get(sid), ensure_ascii=False).encode())
        per_session[str(n)] = {"long_term": await memory.index.session_bytes(sid), "short_term": short,
                               "memories": len(memory.index._sessions.get(sid, {}))}
    await memory.close()
    return {"recall_ms": {"p50": round(pct(miss, 50), 3), "p99": round(pct(miss, 99), 3),
                          "cached_p50": round(pct(hit, 50), 3), "cached_p99": round(pct(hit, 99), 3),
                          "session_memories": 100, "mean_recalled": round(float(np.mean(recalled)), 2)},
            "bytes_per_session": per_session, "max_bytes_per_session": cfg.max_bytes_per_session}


async def _load(base: str, requests: int, concurrency: int, prompts: list[str], max_tokens: int) -> dict:
    import httpx

    order = [prompts[i % len(prompts)] for i in range(requests)]
    random.Random(0).shuffle(order)
    lat: list[float] = []
    statuses: list[int] = []

    async def worker(http, mine):
        for p in mine:
            t0 = time.perf_counter()
            r = await http.post(f"{base}/v1/chat/completions", json={
                "model": "chat-gpt", "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": p}]})
            lat.append((time.perf_counter() - t0) * 1e3)
            statuses.append(r.status_code)

    async with httpx.AsyncClient(timeout=300) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(http, order[i::concurrency]) for i in range(concurrency)])
        wall = time.perf_counter() - t0
    return {"requests_per_s": requests / wall, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
            "errors": sum(s != 200 for s in statuses)}


def _gateway(root: Path, profile: str, overrides: list[str], port: int, coalesce: bool) -> subprocess.Popen:
    args = [sys.executable, "-m", "tasks.serve.gateway", "--profile", profile, "--port", str(port),
            *[x for o in (f"paths.root={root}", *overrides, f"serve.gateway.coalesce={str(coalesce).lower()}",
                          "serve.memory.enabled=false") for x in ("--set", o)]]
    log = root / f"gateway-{port}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, cwd=PROJECT_DIR, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "NO_PROXY": "127.0.0.1"})
    wait_gateway(f"http://127.0.0.1:{port}/v1", 90, log)
    return proc


def coalescing(tp, root: Path, profile: str, overrides: list[str], requests: int, concurrency: int,
               max_tokens: int) -> dict:
    prompts = ["Where is my parcel?", "How do I reset my password?", "What is your refund policy?",
               "Is there a student discount?"]
    ports = {True: free_port(), False: free_port()}
    procs = [_gateway(root, profile, overrides, ports[c], c) for c in (True, False)]

    def inferences() -> int:
        return int(tp.http().get_inference_statistics("chat-gpt", "1")["model_stats"][0]["inference_count"])

    rounds: dict[bool, list[dict]] = {True: [], False: []}
    try:
        for c in (True, False):  # warm-up
            asyncio.run(_load(f"http://127.0.0.1:{ports[c]}", concurrency, concurrency, prompts, max_tokens))
        for _ in range(2):
            for c in (True, False):
                before = inferences()
                r = asyncio.run(_load(f"http://127.0.0.1:{ports[c]}", requests, concurrency, prompts,
                                      max_tokens))
                rounds[c].append({**r, "inferences": inferences() - before})
    finally:
        for p in procs:
            triton.stop_group(p.pid)
    med = {c: {k: float(np.median([x[k] for x in rs])) for k in rs[0]} for c, rs in rounds.items()}
    on, off = med[True], med[False]
    return {"requests": requests, "distinct_prompts": len(prompts), "concurrency": concurrency,
            "on": {k: round(v, 2) for k, v in on.items()}, "off": {k: round(v, 2) for k, v in off.items()},
            "inference_saving": round(1 - on["inferences"] / off["inferences"], 3),
            "throughput_ratio": round(on["requests_per_s"] / off["requests_per_s"], 2),
            "p99_ratio": round(on["p99_ms"] / off["p99_ms"], 2)}


# a smaller grid than serve.tune's (16 points): the default (s16/t256/i2) and its neighbours
TUNE_GRID = ["serve.tune.max_seqs=[8,16,32]", "serve.tune.max_batch_tokens=[64,256]",
             "serve.tune.instances=[2]", "serve.tune.requests=128", "serve.tune.rounds=2"]


def tuner(profile: str, root: Path, overrides: list[str], tp, concurrency: int, max_tokens: int) -> dict:
    from tasks.serve import tune

    s = load_settings(profile, [f"paths.root={root}", *overrides, *TUNE_GRID,
                                f"serve.tune.concurrency={concurrency}",
                                f"serve.tune.max_tokens={max_tokens}"])
    report = tune.tune(s, http_url=tp.http_url, grpc_url=tp.grpc_url, out_dir=root / "tune",
                       metrics_url=tp.metrics_url)
    return {**tune.compare(report), "points": len(report["points"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--requests", type=int, default=96, help="requests per round of the coalescing load")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="a tokenizer.json to use instead of building one")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="llmops-bench-memory-"))
    ports = {k: free_port() for k in ("http", "grpc", "metrics")}
    overrides = [f"serve.triton.http_port={ports['http']}", f"serve.triton.grpc_port={ports['grpc']}",
                 f"serve.triton.metrics_port={ports['metrics']}", "serve.gateway.log_requests=false",
                 "serve.gateway.max_inflight=64", "serve.gateway.max_queue=256"]
    tp = None
    try:
        s, n_params = build(root, a.profile, overrides, a.tokenizer)
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(s.paths.triton_repository / "chat-gpt" / "1" / "tokenizer.json"))
        memory = asyncio.run(recall_and_bytes(tok, s.model.block_size, a.max_tokens))
        print(f"memory: {memory}", file=sys.stderr, flush=True)
        tp = triton.start(s, models=("chat-gpt",))
        coal = coalescing(tp, root, a.profile, overrides, a.requests, a.concurrency, a.max_tokens)
        print(f"coalescing: {coal}", file=sys.stderr, flush=True)
        tuned = tuner(a.profile, root, overrides, tp, a.concurrency, a.max_tokens)
        print(json.dumps({"bench": "memory", "cpus": os.cpu_count(), "profile": a.profile, "params": n_params,
                          **memory, "coalescing": coal, "tuner": tuned}))
    finally:
        if tp is not None:
            tp.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
