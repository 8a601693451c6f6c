"""The gateway's engine: the state one app runs on (routers, admission, safety, metrics, logs, session
stores) and the client side of Triton: inference over a gRPC stream (the model is decoupled: one
response per token, or with `stream` false one final response), coalescing of identical requests in
flight, and mirroring to a shadow.

Shadow: while `traffic.json` holds a `shadow` share (the rollout's shadow phase), that share of
the requests routed to the champion is sent again to the challenger after the champion's reply
has gone out. The challenger's reply is never shown; the pair (both replies, latencies, token
counts, safety verdicts) is one line under data/requests/shadow/dt=YYYY-MM-DD/, which
`tasks.loop.rollout.shadow_report` scores. Mirrors run under their own small concurrency bound and
are dropped (counted) rather than queued when it is full, so they cannot crowd out live traffic.

Which principal a request acts for, and its rate limit: tenancy.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from typing import Any

import numpy as np

from tasks.config import Settings
from tasks.safety import SafetyFilter
from tasks.serve.admission import Admission
from tasks.serve.gateway.errors import LeaderGone, TritonUnavailable
from tasks.serve.gateway.metrics import Metrics, RequestLog
from tasks.serve.gateway.routing import Route, Router
from tasks.serve.gateway.schema import ChatRequest, cut_at_stop
from tasks.serve.gateway.tenancy import Pseudonyms, RateLimiter, api_keys, check_exposure
from tasks.serve.memory import SessionMemory
from tasks.serve.repository import served_versions
from tasks.serve.sessions import open_store
from tasks.serve.tiers import LARGE, SMALL, Decision

log = logging.getLogger("llmops.gateway")


class Gateway:
    """One per app: the routers of the served tiers, admission, safety, metrics and logs, the session
    stores, and the client side of Triton (inference, coalescing, mirroring to a shadow)."""

    def __init__(self, settings: Settings, triton_grpc: str | None = None, triton_http: str | None = None):
        self.settings = settings
        g, t = settings.serve.gateway, settings.serve.triton
        host = settings.stack.host
        self.grpc_url = triton_grpc or f"{host}:{t.grpc_port}"
        self.http_url = triton_http or f"{host}:{t.http_port}"
        self.cfg = g
        self.routing = settings.serve.routing
        if self.routing.small_model == t.model_name:  # a gateway pointed at the small model itself: one tier
            self.routing = self.routing.model_copy(update={"enabled": False})
        self.router = Router(settings.paths.triton_repository, t.model_name)  # the main model: the large tier
        self.tiers = {LARGE: self.router}
        if self.routing.enabled:
            self.tiers[SMALL] = Router(settings.paths.triton_repository, self.routing.small_model, SMALL)
        self.admission = Admission(g.max_inflight, g.max_queue, g.batch_queue_share, g.queue_timeout_s)
        self.safety = SafetyFilter(settings.serve.safety)
        self.metrics = Metrics(g.throughput_window_s, g.cost_per_hour_usd)
        self.log = RequestLog(settings.paths.requests, g.log_requests, settings.ingest.pii_kinds)
        self.shadow_log = RequestLog(settings.paths.requests / "shadow", True, settings.ingest.pii_kinds)
        self.shadow_limit = max(1, g.max_inflight // 2)  # mirrors in flight or waiting, at most
        self._shadow_tasks: set[asyncio.Task] = set()
        self.store = open_store(g)
        m = settings.serve.memory
        self.memory = (SessionMemory(m, settings.ingest.pii_kinds, registry=self.metrics.registry)
                       if m.enabled else None)
        self._inflight: dict[str, asyncio.Future] = {}  # coalescing: request key -> the leader's result
        self.api_keys = api_keys(settings)  # key -> principal
        check_exposure(settings, self.api_keys)
        self.rate_limit = RateLimiter(g.rate_limit_rps, g.rate_limit_burst)
        self.pseudonym = Pseudonyms.of_install(settings)  # what the logs keep of session and user ids
        self._client = None
        self._tokenizers: dict[tuple[str, int], tuple[Any, int]] = {}
        self.triton_up = False
        self._last_poll = 0.0

    def measure_safety(self) -> dict[str, Any] | None:
        """The filter's FP/FN rates on the labelled set, into gateway_safety_error_rate (run once at start, in
        a thread: a few hundred texts, one classifier batch). A missing set is logged, not fatal."""
        from tasks.safety import PARTS, SafetyError, load_labelled, measure

        try:
            m = measure(self.safety, load_labelled(self.settings.serve.safety.labelled_set))
        except SafetyError as e:
            log.warning("safety filter not measured: %s", e)
            return None
        for part in PARTS:
            for kind in ("fp", "fn"):
                rate = m["held_out"][part][f"{kind}_rate"]
                self.metrics.safety_error.labels(kind, part, m["version"]).set(rate)
        return m

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Safety-Version": self.safety.version}

    def tier_headers(self, decision: Decision) -> dict[str, str]:
        return {self.routing.header: decision.tier, "X-Route-Reason": decision.reason}

    def client(self):
        if self._client is None:
            from tritonclient.grpc import aio as grpcaio

            self._client = grpcaio.InferenceServerClient(self.grpc_url)
        return self._client

    async def poll_triton(self, force: bool = False) -> bool:
        """Refresh which versions are ready (at most every 2 s unless forced): each version exported
        to the repository is asked for over Triton's open health API (ModelReady), so the gateway,
        which faces clients, holds no key to Triton's restricted repository API."""
        if not force and time.monotonic() - self._last_poll < 2.0:
            return self.triton_up
        self._last_poll = time.monotonic()
        try:
            client = self.client()
            if not await asyncio.wait_for(client.is_server_live(), 5.0):
                raise RuntimeError("tritonserver is not live")
            for r in self.tiers.values():
                versions = served_versions(r.repository, r.name)
                ready = await asyncio.wait_for(asyncio.gather(
                    *[_model_ready(client, r.name, v) for v in versions]), 5.0)
                r.ready = {v for v, ok in zip(versions, ready, strict=True) if ok}
            self.triton_up = True
        except Exception as e:  # noqa: BLE001 - any failure to reach Triton means "down" for routing
            log.warning("Triton at %s unreachable: %s", self.grpc_url, e)
            for r in self.tiers.values():
                r.ready = set()
            self.triton_up = False
        return self.triton_up

    async def serving(self, route: Route) -> bool:
        """Whether Triton is up with this route's version ready now (asked afresh: after a failure)."""
        return await self.poll_triton(force=True) and route.version in self.tiers[route.tier].ready

    def tokenizer(self, route: Route):
        """The tokenizer and context window of the model version a route goes to (each tier, each
        version its own: a distilled model may share the teacher's tokenizer, but nothing relies on it)."""
        key = (route.triton_model, route.version)
        if key not in self._tokenizers:
            from tokenizers import Tokenizer

            d = self.router.repository / route.triton_model / str(route.version)
            block = json.loads((d / "config.json").read_text())["model"]["block_size"]
            self._tokenizers[key] = (Tokenizer.from_file(str(d / "tokenizer.json")), block)
        return self._tokenizers[key]

    def _inputs(self, messages: list[dict], max_tokens: int, req: ChatRequest, stream: bool = True,
                priority: int = 0):
        from tritonclient.grpc import InferInput

        def tensor(name, dtype, value):
            t = InferInput(name, [1, 1], dtype)
            t.set_data_from_numpy(np.array([[value]], dtype={
                "BYTES": np.object_, "INT32": np.int32, "BOOL": np.bool_, "FP32": np.float32,
                "INT64": np.int64}[dtype]))
            return t

        inputs = [tensor("messages", "BYTES", json.dumps(messages, ensure_ascii=False).encode()),
                  tensor("max_tokens", "INT32", max_tokens), tensor("temperature", "FP32", req.temperature),
                  tensor("top_p", "FP32", req.top_p),
                  tensor("seed", "INT64", -1 if req.seed is None else req.seed),
                  tensor("stream", "BOOL", stream), tensor("priority", "INT32", priority)]
        # only when asked for: a version exported before these inputs existed still serves the rest
        if req.presence_penalty:
            inputs.append(tensor("presence_penalty", "FP32", req.presence_penalty))
        if req.frequency_penalty:
            inputs.append(tensor("frequency_penalty", "FP32", req.frequency_penalty))
        if req.logit_bias:
            inputs.append(tensor("logit_bias", "BYTES", json.dumps(req.logit_bias).encode()))
        return inputs

    @staticmethod
    def _unavailable(e: Exception) -> bool:
        text = str(e)
        return any(s in text for s in ("UNAVAILABLE", "failed to connect", "Connection refused",
                                       "Socket closed", "unknown model", "is not ready", "not found",
                                       "DEADLINE_EXCEEDED"))

    async def infer(self, route: Route, messages: list[dict], max_tokens: int, req: ChatRequest,
                    priority: int = 0) -> dict[str, Any]:
        """The whole reply at once: one final response from the model's engine."""
        async for kind, value in self._call(route, self._inputs(messages, max_tokens, req, False, priority)):
            if kind == "final":
                return value
        raise RuntimeError("the model server ended the request without a final response")

    async def infer_stream(self, route: Route, messages: list[dict], max_tokens: int, req: ChatRequest,
                           rid: str, priority: int = 0):
        """Yields ("delta", text) per token, then ("final", {...counts, finish_reason})."""
        async for item in self._call(route, self._inputs(messages, max_tokens, req, True, priority), rid):
            yield item

    async def _call(self, route: Route, inputs: list, rid: str = ""):
        """One request on a gRPC stream to the model; yields ("delta", text)s and ("final", counts).
        The final's `server_ms` is the time from sending to the final response (the engine's phases
        plus the network and Triton's own handling)."""
        from tritonclient.utils import InferenceServerException

        async def requests():
            yield {"model_name": route.triton_model, "inputs": inputs, "model_version": str(route.version),
                   "request_id": rid}

        results, ended = None, False
        t_send = time.perf_counter()
        try:
            results = self.client().stream_infer(requests(), stream_timeout=self.cfg.request_timeout_s)
            async for result, error in results:
                if error is not None:
                    raise error
                if result.as_numpy("finish_reason") is not None:
                    ended = True
                    yield "final", {**_counts(result), "server_ms": (time.perf_counter() - t_send) * 1e3}
                    return
                yield "delta", result.as_numpy("text").reshape(-1)[0].decode()
        except InferenceServerException as e:
            if self._unavailable(e):
                raise TritonUnavailable(str(e)) from None
            raise
        finally:
            if results is not None and not ended:
                # the reader left before the end (the client went away, a stop string, an error): cancel
                # the gRPC stream, so the engine stops this sequence at its next step and frees its slot
                results.cancel()
                self.metrics.cancelled.inc()

    def mirror(self, shadow: Route, prompt: list[dict], max_tokens: int, req: ChatRequest,
               champion: dict) -> None:
        """Send the request again to the challenger in the background and log the pair. Never raises."""
        if len(self._shadow_tasks) >= self.shadow_limit:
            self.metrics.shadow.labels("dropped").inc()
            return
        task = asyncio.get_running_loop().create_task(self._mirror(shadow, prompt, max_tokens, req, champion))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _mirror(self, shadow: Route, prompt: list[dict], max_tokens: int, req: ChatRequest,
                      champion: dict) -> None:
        t0 = time.perf_counter()
        out: dict[str, Any] = {"version": shadow.version}
        try:
            res = await self.infer(shadow, prompt, max_tokens, req)
            text, stopped = cut_at_stop(res["text"].strip(), req.stop)  # as the champion's reply was cut
            if stopped:
                text, res["finish_reason"] = text.strip(), "stop"
            verdict = self.safety.check(text)
            if verdict.blocked:  # scored as users would have seen it, like the champion's reply
                text, res["finish_reason"] = self.safety.cfg.refusal, "content_filter"
            out |= {"status": 200, "latency_ms": round((time.perf_counter() - t0) * 1e3, 3),
                    "prompt_tokens": res["prompt_tokens"], "completion_tokens": res["completion_tokens"],
                    "finish_reason": res["finish_reason"], "safety_output": verdict.to_dict(),
                    "response": self.log.scrub(text)}
            self.metrics.shadow.labels("ok").inc()
        except Exception as e:  # noqa: BLE001 - a failing challenger is evidence, not a user-facing error
            out |= {"status": 503 if isinstance(e, TritonUnavailable) else 502, "error": str(e)[:300],
                    "latency_ms": round((time.perf_counter() - t0) * 1e3, 3)}
            self.metrics.shadow.labels("error").inc()
        self.shadow_log.write({"request_id": champion["request_id"], "session": champion.get("session"),
                               "user": champion.get("user"),
                               "model": shadow.triton_model, "tier": shadow.tier,
                               "prompt": champion["prompt"], "champion": champion["reply"],
                               "challenger": out})

    @staticmethod
    def coalesce_key(route: Route, prompt: list[dict], max_tokens: int, req: ChatRequest) -> str | None:
        """Requests with this key get the same tokens: same model version, same prompt, same limits,
        and deterministic decoding (greedy, or sampling with a given seed). None: not coalescible."""
        if req.temperature > 0 and req.seed is None:
            return None
        body = [route.triton_model, route.version, prompt, max_tokens, req.temperature, req.top_p, req.seed,
                req.presence_penalty, req.frequency_penalty, req.logit_bias]
        return hashlib.sha256(json.dumps(body, ensure_ascii=False).encode()).hexdigest()

    async def infer_once(self, route: Route, prompt: list[dict], max_tokens: int, req: ChatRequest,
                         priority: str) -> tuple[dict[str, Any], bool]:
        """One inference per set of identical in-flight requests: the first takes an admission slot
        and asks Triton, the others wait for its result (no slot, no queue place). Returns the result
        and whether it was shared."""
        key = self.coalesce_key(route, prompt, max_tokens, req) if self.cfg.coalesce else None
        leader = self._inflight.get(key) if key else None
        if leader is not None:
            try:
                out = dict(await asyncio.shield(leader))
                self.metrics.coalesced.inc()
                return out, True
            except LeaderGone:  # its request was cancelled: this one asks Triton itself
                pass
        fut = asyncio.get_running_loop().create_future() if key else None
        if key:
            self._inflight[key] = fut
        try:
            await self.admission.acquire(priority)
            try:
                out = await self.infer(route, prompt, max_tokens, req, priority)
            finally:
                self.admission.release()
            if fut is not None:
                fut.set_result(out)
            return out, False
        except BaseException as e:
            if fut is not None:
                fut.set_exception(e if isinstance(e, Exception) else LeaderGone())
                fut.exception()  # retrieved: no warning when nobody else waited
            raise
        finally:
            if key and self._inflight.get(key) is fut:
                del self._inflight[key]

    async def forget_logs(self, session: str | None = None, user: str | None = None) -> int:
        """Remove a session's (or user's) lines from the request and shadow logs: the lines whose
        pseudonymised `session` is this session (or the user's own), or whose `user` is this user."""
        match = {"session": {self.pseudonym(n) for n in (session, user) if n is not None}}
        if user is not None:
            match["user"] = {self.pseudonym(user)}
        return sum([await asyncio.to_thread(log.forget, match) for log in (self.log, self.shadow_log)])

    async def close(self) -> None:
        for task in list(self._shadow_tasks):
            task.cancel()
        if self.memory is not None:
            await self.memory.close()
        if self._client is not None:
            try:  # a gRPC channel with calls in flight can take its time to close: do not hold up the exit
                await asyncio.wait_for(self._client.close(), 2.0)
            except (TimeoutError, asyncio.CancelledError):
                log.warning("the gRPC channel to Triton did not close within 2 s; exiting anyway")
        await self.store.close()
        self.log.close()
        self.shadow_log.close()


async def _model_ready(client, name: str, version: int) -> bool:
    """Whether Triton serves this version now (a version it does not know is not ready)."""
    from tritonclient.utils import InferenceServerException

    try:
        return bool(await client.is_model_ready(name, str(version)))
    except InferenceServerException as e:
        if "unknown model" in str(e).lower() or "not found" in str(e).lower():
            return False
        raise


def _counts(res) -> dict[str, Any]:
    """Token counts, finish reason and batch size of a final Triton response; `cached_tokens` (the
    prompt tokens whose K/V came from the model's prefix cache) is absent from older exports: 0."""
    def one(name: str):
        x = res.as_numpy(name)
        return None if x is None else x.reshape(-1)[0]

    out = {"prompt_tokens": int(one("prompt_tokens")), "completion_tokens": int(one("completion_tokens")),
           "finish_reason": one("finish_reason").decode(), "batch_size": int(one("batch_size")),
           "cached_tokens": int(one("cached_tokens") or 0)}
    if (text := one("text")) is not None:
        out["text"] = text.decode()
    if one("queue_ms") is not None:  # the engine's phases (absent from older exports)
        out["engine"] = {k: round(float(one(k)), 3) for k in ("queue_ms", "prefill_ms", "decode_ms")}
        out["engine"]["steps"] = int(one("steps"))
    return out
