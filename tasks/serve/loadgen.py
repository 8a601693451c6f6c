"""The load generator: concurrent tritonclient gRPC (asyncio) requests against a Triton model (each on a
gRPC stream with `stream` false: one final response per request, as the gateway asks).

    from tasks.serve import loadgen
    r = loadgen.run("127.0.0.1:8001", "chat-gpt", concurrency=16, requests=64, max_tokens=32)
    r["tokens_per_s"], r["p99_ms"]

`concurrency` workers each send one request at a time (a closed loop, as the gateway's
max_inflight slots do), for `requests` requests in all or for `duration_s` seconds. Throughput is
completed requests (and completion tokens) over the wall time of the measured phase; latency is per
request, client side. The warm-up requests run first and are not counted. `mean_batch` is the mean
of the model's `batch_size` output: the size of the batch each request ran in (request-weighted).
bench/serve.py and `llmops tune-serving` (tasks/serve/tune.py) both measure with it.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np

from tasks.errors import InputError

PROMPTS = ["Hi, my order has not arrived yet.", "How do I reset my password?",
           "Can you help me with the app crashing?", "What is your refund policy?",
           "The invoice shows the wrong address.", "Is there a student discount?",
           "My package arrived damaged, what now?", "How long does shipping take to Canada?"]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q)) if xs else float("nan")


def infer_inputs(i: int, max_tokens: int) -> list:
    """The inputs of request `i` (greedy, one of PROMPTS in turn), as [1, 1] tensors."""
    from tritonclient.grpc import InferInput

    vals = [("messages", "BYTES",
             json.dumps([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]).encode(), np.object_),
            ("max_tokens", "INT32", max_tokens, np.int32), ("temperature", "FP32", 0.0, np.float32),
            ("top_p", "FP32", 1.0, np.float32), ("seed", "INT64", -1, np.int64),
            ("stream", "BOOL", False, np.bool_)]
    out = []
    for name, dt, v, npdt in vals:
        x = InferInput(name, [1, 1], dt)
        x.set_data_from_numpy(np.array([[v]], dtype=npdt))
        out.append(x)
    return out


async def final(client, model: str, inputs: list, version: str = ""):
    """One request to a decoupled model on its own gRPC stream, asking for one final response (the
    input `stream` false): what a non-streaming client does. Returns that response."""
    async def requests():
        yield {"model_name": model, "inputs": inputs, "model_version": version}

    async for result, error in client.stream_infer(requests()):
        if error is not None:
            raise error
        if result.as_numpy("finish_reason") is not None:
            return result
    raise RuntimeError(f"{model}: the stream ended without a final response")


async def measure(grpc_url: str, model: str, concurrency: int, requests: int = 0, duration_s: float = 0.0,
                  max_tokens: int = 32, warmup: int = 0, warmup_concurrency: int | None = None,
                  version: str = "", timeout_s: float = 120.0) -> dict[str, Any]:
    """Run the load; exactly one of `requests` or `duration_s` is > 0. A failed request (an error
    from Triton, a timeout) is counted in `errors` and left out of the latencies."""
    from tritonclient.grpc import aio as grpcaio

    if (requests > 0) == (duration_s > 0):
        raise InputError(f"give requests > 0 or duration_s > 0, not both "
                         f"(got requests={requests}, duration_s={duration_s})")
    if concurrency < 1:
        raise InputError(f"concurrency must be >= 1, got {concurrency}")
    client = grpcaio.InferenceServerClient(grpc_url)
    lat: list[float] = []
    batches: list[int] = []
    state = {"tokens": 0, "errors": 0, "next": 0}
    first_error: list[str] = []

    async def worker(limit: int, deadline: float) -> None:
        while True:
            i = state["next"]
            if (limit and i >= limit) or (deadline and time.perf_counter() >= deadline):
                return
            state["next"] += 1
            t0 = time.perf_counter()
            try:
                r = await asyncio.wait_for(final(client, model, infer_inputs(i, max_tokens), version),
                                           timeout_s)
            except Exception as e:  # InferenceServerException, a deadline: counted, the load goes on
                state["errors"] += 1
                if not first_error:
                    first_error.append(f"{type(e).__name__}: {e}"[:500])
                continue
            lat.append(time.perf_counter() - t0)
            state["tokens"] += int(r.as_numpy("completion_tokens").reshape(-1)[0])
            batches.append(int(r.as_numpy("batch_size").reshape(-1)[0]))

    try:
        if warmup:
            await asyncio.gather(*[worker(warmup, 0.0) for _ in range(warmup_concurrency or concurrency)])
        lat.clear(), batches.clear()
        state.update(tokens=0, errors=0, next=0)
        first_error.clear()
        t0 = time.perf_counter()
        deadline = t0 + duration_s if duration_s > 0 else 0.0
        await asyncio.gather(*[worker(requests, deadline) for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    finally:
        await client.close()
    n = len(lat)
    return {"req_per_s": round(n / wall, 2), "tokens_per_s": round(state["tokens"] / wall, 1),
            "p50_ms": round(pct(lat, 50) * 1e3, 1), "p99_ms": round(pct(lat, 99) * 1e3, 1),
            "mean_ms": round(float(np.mean(lat)) * 1e3, 1) if lat else float("nan"),
            "mean_batch": round(float(np.mean(batches)), 2) if batches else float("nan"),
            "requests": n, "errors": state["errors"], "first_error": first_error[0] if first_error else None,
            "completion_tokens": state["tokens"], "wall_s": round(wall, 3), "concurrency": concurrency,
            "max_tokens": max_tokens}


async def open_loop(grpc_url: str, model: str, rate: float, requests: int, max_tokens: int = 32,
                    seed: int = 0, timeout_s: float = 120.0) -> dict[str, Any]:
    """Requests arriving as a Poisson process at `rate` per second (exponential gaps, seeded), each sent
    at its arrival whatever is still in flight: the load a product sees, unlike a closed loop that
    slows its clients down when the server slows. Latency counts from the scheduled arrival, so a
    client that falls behind its schedule counts against the server too. `achieved_rate` is the
    completed requests over the time from the first arrival to the last completion."""
    from tritonclient.grpc import aio as grpcaio

    if rate <= 0 or requests < 1:
        raise InputError(f"rate must be > 0 and requests >= 1 (got {rate}, {requests})")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, requests)
    client = grpcaio.InferenceServerClient(grpc_url)
    lat: list[float] = []
    state = {"tokens": 0, "errors": 0}

    async def one(i: int, at: float) -> None:
        try:
            r = await asyncio.wait_for(final(client, model, infer_inputs(i, max_tokens)), timeout_s)
        except Exception:  # noqa: BLE001 - an error or a timeout: counted
            state["errors"] += 1
            return
        lat.append(time.perf_counter() - at)
        state["tokens"] += int(r.as_numpy("completion_tokens").reshape(-1)[0])

    try:
        t0 = time.perf_counter()
        tasks, at = [], t0
        for i, gap in enumerate(gaps):
            at += float(gap)
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i, at)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    finally:
        await client.close()
    return {"rate": rate, "requests": len(lat), "errors": state["errors"],
            "achieved_rate": round(len(lat) / wall, 2), "tokens_per_s": round(state["tokens"] / wall, 1),
            "p50_ms": round(pct(lat, 50) * 1e3, 1), "p99_ms": round(pct(lat, 99) * 1e3, 1)}


def run(grpc_url: str, model: str, concurrency: int, requests: int = 0, duration_s: float = 0.0,
        max_tokens: int = 32, warmup: int = 0, version: str = "", timeout_s: float = 120.0) -> dict[str, Any]:
    """`measure` from synchronous code."""
    return asyncio.run(measure(grpc_url, model, concurrency, requests, duration_s, max_tokens, warmup,
                               version=version, timeout_s=timeout_s))


async def direct(grpc_url: str, model: str, concurrency: int, n: int, max_tokens: int) -> dict[str, Any]:
    """bench/serve.py's measurement: n requests, after a warm-up of n requests at concurrency <= 2."""
    r = await measure(grpc_url, model, concurrency, requests=n, max_tokens=max_tokens, warmup=n,
                      warmup_concurrency=min(concurrency, 2))
    if r["errors"]:
        raise RuntimeError(f"{r['errors']} of {n} requests to {model} failed; the first: {r['first_error']}")
    return {k: r[k] for k in ("req_per_s", "tokens_per_s", "p50_ms", "p99_ms", "mean_batch")}
