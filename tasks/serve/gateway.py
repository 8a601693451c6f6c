"""The OpenAI-compatible chat gateway in front of Triton.

    llmops serve                     # tritonserver + this gateway on 127.0.0.1:9000
    curl -s 127.0.0.1:9000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"model": "chat-gpt", "messages": [{"role": "user", "content": "Hi"}]}'

Endpoints: POST /v1/chat/completions (JSON, or server-sent events with "stream": true, in
OpenAI's chunk format), GET /v1/models, DELETE /v1/sessions/{id}, GET /healthz, GET /metrics.
The official `openai` client works against it with `base_url="http://127.0.0.1:9000/v1"`.

A request goes: parse and validate (400 with an OpenAI-style error body naming the parameter)
-> tier (small or large, tasks/serve/tiers.py: the model id, the X-Tier header, or light vs heavy;
sent back as X-Tier and X-Route-Reason) -> route within the tier (model id -> Triton model
version; `chat-gpt` follows the tier's aliases and sticky traffic split, and so does
`chat-gpt-small`) -> session turns fitted into the model's window -> safety filter on the prompt
(a refusal, counted) -> admission (bounded queue by priority; 429 + Retry-After when full) ->
Triton over gRPC (streaming for stream mode) -> safety filter on the reply -> request log line
(PII scrubbed) and metrics. Triton unreachable gives 503 until it is back; nothing is retried
behind the caller's back.

Shadow: while `traffic.json` holds a `shadow` share (the rollout's shadow phase), that share of
the requests routed to the champion is sent again to the challenger after the champion's reply
has gone out. The challenger's reply is never shown; the pair (both replies, latencies, token
counts, safety verdicts) is one line under data/requests/shadow/dt=YYYY-MM-DD/, which
`tasks.loop.rollout.shadow_report` scores. Mirrors run under their own small concurrency bound and
are dropped (counted) rather than queued when it is full, so they cannot crowd out live traffic.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
import zlib
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks.config import Settings
from tasks.errors import ConfigError
from tasks.model.chat_template import PromptTooLong, encode_chat, fit_turns, with_memories
from tasks.serve.admission import PRIORITIES, Admission, Overloaded
from tasks.serve.memory import SessionMemory
from tasks.serve.repository import STREAM_SUFFIX, read_aliases
from tasks.serve.safety import SafetyFilter
from tasks.serve.sessions import SESSION_ID, open_store
from tasks.serve.tiers import LARGE, SMALL, Decision, TierError, decide, small_model_id, tier_of_model

log = logging.getLogger("llmops.gateway")


# ---------------------------------------------------------------- request model and errors


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self, extra_headers: dict[str, str]) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers={**extra_headers, **self.headers})


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(p["text"])
        return "".join(parts)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=200)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = Field(None, ge=0, le=2**62)
    user: str | None = Field(None, max_length=128)
    session_id: str | None = Field(None, max_length=128)
    priority: Literal["interactive", "batch"] | None = None

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _none_is_default(cls, v, info):
        return {"temperature": 1.0, "top_p": 1.0}[info.field_name] if v is None else v


def _validation_error(e: ValidationError) -> ApiError:
    err = e.errors()[0]
    param = ".".join(str(p) for p in err["loc"])
    return ApiError(400, f"invalid value for '{param}': {err['msg']}", param=param, code="invalid_value")


# ---------------------------------------------------------------- routing


@dataclass
class Route:
    model_id: str      # what is served: the client's id, or the small model's when the policy chose it
    triton_model: str  # chat-gpt
    version: int
    alias: str | None
    tier: str = LARGE  # small | large: the Router (tier) it came from


class Router:
    """Model ids -> Triton versions, from the repository's aliases.json (re-read when it changes)
    and Triton's list of ready versions. `chat-gpt` goes to the champion, or to the challenger for
    the share of sessions `traffic.json` gives it (sticky by session: a session stays on one side).
    One per tier: the small tier's model has its own files, so its own split, shadow and canary."""

    def __init__(self, repository: Path, name: str, tier: str = LARGE):
        self.repository, self.name, self.tier = repository, name, tier
        self.ready: set[int] = set()
        self.stream_ready: set[int] = set()  # versions of the streaming twin (<name>-stream)
        self._stamp: tuple = ()
        self.aliases: dict[str, int] = {}
        self.traffic: dict[str, float] = {}

    def refresh_files(self) -> None:
        files = [self.repository / self.name / "aliases.json", self.repository / self.name / "traffic.json"]
        stamp = tuple(f.stat().st_mtime_ns if f.exists() else 0 for f in files)
        if stamp != self._stamp:
            self.aliases = read_aliases(self.repository, self.name)
            self.traffic = json.loads(files[1].read_text()) if files[1].exists() else {}
            self._stamp = stamp

    def model_ids(self) -> list[str]:
        ids = [self.name] if self.ready else []
        ids += [f"{self.name}:{a}" for a, v in sorted(self.aliases.items()) if v in self.ready]
        return ids + [f"{self.name}:{v}" for v in sorted(self.ready)]

    def route(self, model_id: str, sticky_key: str) -> Route:
        self.refresh_files()
        base, _, which = model_id.partition(":")
        if base != self.name:
            raise ApiError(404, f"The model '{model_id}' does not exist; GET /v1/models lists the served ones",
                           param="model", code="model_not_found")
        if which.isdigit():
            version, alias = int(which), None
        elif which:
            if which not in self.aliases:
                raise ApiError(404, f"The model '{model_id}' does not exist: no alias '{which}' is served",
                               param="model", code="model_not_found")
            version, alias = self.aliases[which], which
        else:
            alias = "champion" if "champion" in self.aliases else ("challenger" if "challenger" in self.aliases else None)
            share = float(self.traffic.get("challenger", 0.0))
            if alias == "champion" and "challenger" in self.aliases and share > 0:
                if zlib.crc32(sticky_key.encode()) % 10_000 < share * 100:
                    alias = "challenger"
            version = self.aliases[alias] if alias else max(self.ready, default=0)
        if version not in self.ready:
            if not self.ready:
                raise ApiError(503, "no model version is loaded in the model server", type_="server_error",
                               code="model_not_ready")
            raise ApiError(404, f"The model '{model_id}' does not exist: version {version} is not loaded",
                           param="model", code="model_not_found")
        return Route(model_id, self.name, version, alias, self.tier)

    def shadow_of(self, route: Route, key: str) -> Route | None:
        """The challenger route this champion-routed request is mirrored to, if the shadow share picks it."""
        share = float(self.traffic.get("shadow", 0.0))
        challenger = self.aliases.get("challenger")
        if route.alias != "champion" or share <= 0 or challenger is None or challenger not in self.ready:
            return None
        if zlib.crc32(f"shadow:{key}".encode()) % 10_000 >= share * 100:
            return None
        return Route(f"{self.name}:challenger", self.name, challenger, "challenger", self.tier)


# ---------------------------------------------------------------- metrics and request log


class Metrics:
    def __init__(self, window_s: float, cost_per_hour: float):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        lat = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.requests = Counter("gateway_requests", "Chat completion requests by model and HTTP status",
                                ["model", "status"], registry=r)
        self.latency = Histogram("gateway_request_latency_seconds", "Request latency", ["model"], buckets=lat, registry=r)
        self.ttft = Histogram("gateway_ttft_seconds", "Time to first token", ["model"], buckets=lat, registry=r)
        self.tokens = Counter("gateway_tokens", "Tokens by kind", ["model", "kind"], registry=r)
        self.batch = Histogram("gateway_triton_batch_size", "Size of the Triton batch a request ran in",
                               buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.queue = Gauge("gateway_queue_depth", "Requests waiting for a slot", registry=r)
        self.inflight = Gauge("gateway_inflight", "Requests at the model server", registry=r)
        self.tps = Gauge("gateway_tokens_per_second", f"Completion tokens per second over the last {window_s:.0f}s",
                         registry=r)
        self.cost = Gauge("gateway_cost_per_million_tokens_usd",
                          "Serving cost per 1M completion tokens at the measured throughput", registry=r)
        self.safety = Counter("gateway_safety_blocked", "Requests the safety filter blocked", ["stage", "rule"],
                              registry=r)
        self.rejected = Counter("gateway_rejected", "Requests refused before inference", ["reason"], registry=r)
        self.shadow = Counter("gateway_shadow_requests", "Requests mirrored to the challenger, by outcome",
                              ["outcome"], registry=r)
        self.coalesced = Counter("gateway_coalesced_requests", "Requests answered by an identical request's "
                                 "inference already in flight (no inference of their own)", registry=r)
        self.routes = Counter("gateway_route", "Requests by the tier they were routed to and the kind of reason "
                              "(header, model, light, heavy, small-tier-not-served, routing-disabled)",
                              ["tier", "reason_kind"], registry=r)
        self.window_s, self.cost_per_hour = window_s, cost_per_hour
        self._recent: deque[tuple[float, int]] = deque()

    def completed(self, tokens: int) -> None:
        now = time.monotonic()
        self._recent.append((now, tokens))
        while self._recent and now - self._recent[0][0] > self.window_s:
            self._recent.popleft()
        span = max(now - self._recent[0][0], 1.0)
        tps = sum(n for _, n in self._recent) / span
        self.tps.set(tps)
        if tps > 0:
            self.cost.set(self.cost_per_hour / (tps * 3600) * 1e6)


class RequestLog:
    """One JSON line per request under data/requests/dt=YYYY-MM-DD/, PII scrubbed as in ingest."""

    def __init__(self, root: Path, enabled: bool, pii_kinds: tuple[str, ...]):
        self.root, self.enabled, self.pii_kinds = root, enabled, pii_kinds
        self._file = None
        self._day = None

    def scrub(self, text: str) -> str:
        from tasks.data.text import scrub_pii

        return scrub_pii(text, self.pii_kinds, Counter())

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        now = dt.datetime.now(dt.UTC)
        day = now.strftime("%Y-%m-%d")
        if day != self._day:
            if self._file:
                self._file.close()
            d = self.root / f"dt={day}"
            d.mkdir(parents=True, exist_ok=True)
            self._file = open(d / f"gateway-{os.getpid()}.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            self._day = day
        self._file.write(json.dumps({"ts": now.isoformat(), **record}, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()


# ---------------------------------------------------------------- the app


class TritonUnavailable(Exception):
    pass


class _LeaderGone(Exception):
    """The request whose inference others were waiting for was cancelled before it finished."""


class Gateway:
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
        self.admission = Admission(g.max_inflight, g.max_queue, g.batch_queue_share)
        self.safety = SafetyFilter(settings.serve.safety)
        self.metrics = Metrics(g.throughput_window_s, g.cost_per_hour_usd)
        self.log = RequestLog(settings.paths.requests, g.log_requests, settings.ingest.pii_kinds)
        self.shadow_log = RequestLog(settings.paths.requests / "shadow", True, settings.ingest.pii_kinds)
        self.shadow_limit = max(1, g.max_inflight // 2)  # mirrors in flight or waiting, at most
        self._shadow_tasks: set[asyncio.Task] = set()
        self.store = open_store(g)
        m = settings.serve.memory
        self.memory = SessionMemory(m, settings.ingest.pii_kinds, registry=self.metrics.registry) if m.enabled else None
        self._inflight: dict[str, asyncio.Future] = {}  # coalescing: request key -> the leader's result
        self.api_keys = api_keys(settings)
        self._client = None
        self._tokenizers: dict[tuple[str, int], tuple[Any, int]] = {}
        self.triton_up = False
        self._last_poll = 0.0

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
        """Refresh which versions are ready (at most every 2 s unless forced)."""
        if not force and time.monotonic() - self._last_poll < 2.0:
            return self.triton_up
        self._last_poll = time.monotonic()
        try:
            index = await asyncio.wait_for(self.client().get_model_repository_index(as_json=True), 5.0)
            ready: dict[str, set[int]] = {}
            for m in index.get("models", []):
                if m.get("state") == "READY" and m.get("version"):
                    ready.setdefault(m.get("name"), set()).add(int(m["version"]))
            for r in self.tiers.values():
                r.ready, r.stream_ready = ready.get(r.name, set()), ready.get(r.name + STREAM_SUFFIX, set())
            self.triton_up = True
        except Exception as e:  # noqa: BLE001 - any failure to reach Triton means "down" for routing
            log.warning("Triton at %s unreachable: %s", self.grpc_url, e)
            for r in self.tiers.values():
                r.ready, r.stream_ready = set(), set()
            self.triton_up = False
        return self.triton_up

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

    def small_route(self, key: str, stream: bool) -> Route | None:
        """Where the small tier would serve the default small model id for this session (its own
        champion/challenger split), or None when it cannot: not exported, not loaded, the version its
        aliases name not ready (or its streaming twin, for a stream)."""
        small = self.tiers.get(SMALL)
        if small is None or not small.ready:
            return None
        try:
            route = small.route(self.routing.small_model, key)
        except ApiError:
            return None
        return route if not stream or route.version in small.stream_ready else None

    def _inputs(self, messages: list[dict], max_tokens: int, req: ChatRequest):
        from tritonclient.grpc import InferInput

        def tensor(name, dtype, value):
            t = InferInput(name, [1, 1], dtype)
            t.set_data_from_numpy(np.array([[value]], dtype={"BYTES": np.object_, "INT32": np.int32,
                                                              "FP32": np.float32, "INT64": np.int64}[dtype]))
            return t

        return [tensor("messages", "BYTES", json.dumps(messages, ensure_ascii=False).encode()),
                tensor("max_tokens", "INT32", max_tokens), tensor("temperature", "FP32", req.temperature),
                tensor("top_p", "FP32", req.top_p), tensor("seed", "INT64", -1 if req.seed is None else req.seed)]

    @staticmethod
    def _unavailable(e: Exception) -> bool:
        text = str(e)
        return any(s in text for s in ("UNAVAILABLE", "failed to connect", "Connection refused", "Socket closed",
                                       "unknown model", "is not ready", "not found", "DEADLINE_EXCEEDED"))

    async def infer(self, route: Route, messages: list[dict], max_tokens: int, req: ChatRequest) -> dict[str, Any]:
        from tritonclient.utils import InferenceServerException

        try:
            res = await self.client().infer(route.triton_model, self._inputs(messages, max_tokens, req),
                                            model_version=str(route.version),
                                            client_timeout=self.cfg.request_timeout_s)
        except InferenceServerException as e:
            if self._unavailable(e):
                raise TritonUnavailable(str(e)) from None
            raise
        return {"text": res.as_numpy("text").reshape(-1)[0].decode(), **_counts(res)}

    async def infer_stream(self, route: Route, messages: list[dict], max_tokens: int, req: ChatRequest, rid: str):
        """Yields ("delta", text) per token, then ("final", {...counts, finish_reason})."""
        from tritonclient.utils import InferenceServerException

        inputs = self._inputs(messages, max_tokens, req)

        async def requests():
            yield {"model_name": route.triton_model + STREAM_SUFFIX, "inputs": inputs,
                   "model_version": str(route.version), "request_id": rid}

        try:
            async for result, error in self.client().stream_infer(requests(), stream_timeout=self.cfg.request_timeout_s):
                if error is not None:
                    raise error
                if result.as_numpy("finish_reason") is not None:
                    yield "final", _counts(result)
                    return
                yield "delta", result.as_numpy("text").reshape(-1)[0].decode()
        except InferenceServerException as e:
            if self._unavailable(e):
                raise TritonUnavailable(str(e)) from None
            raise

    def mirror(self, shadow: Route, prompt: list[dict], max_tokens: int, req: ChatRequest, champion: dict) -> None:
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
            text = res["text"].strip()
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
                               "model": shadow.triton_model, "tier": shadow.tier,
                               "prompt": champion["prompt"], "champion": champion["reply"], "challenger": out})

    @staticmethod
    def coalesce_key(route: Route, prompt: list[dict], max_tokens: int, req: ChatRequest) -> str | None:
        """Requests with this key get the same tokens: same model version, same prompt, same limits,
        and deterministic decoding (greedy, or sampling with a given seed). None: not coalescible."""
        if req.temperature > 0 and req.seed is None:
            return None
        body = [route.triton_model, route.version, prompt, max_tokens, req.temperature, req.top_p, req.seed]
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
            except _LeaderGone:  # its request was cancelled: this one asks Triton itself
                pass
        fut = asyncio.get_running_loop().create_future() if key else None
        if key:
            self._inflight[key] = fut
        try:
            await self.admission.acquire(priority)
            try:
                out = await self.infer(route, prompt, max_tokens, req)
            finally:
                self.admission.release()
            if fut is not None:
                fut.set_result(out)
            return out, False
        except BaseException as e:
            if fut is not None:
                fut.set_exception(e if isinstance(e, Exception) else _LeaderGone())
                fut.exception()  # retrieved: no warning when nobody else waited
            raise
        finally:
            if key and self._inflight.get(key) is fut:
                del self._inflight[key]

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


def _counts(res) -> dict[str, Any]:
    """Token counts, finish reason and batch size of a final Triton response; `cached_tokens` (the
    prompt tokens whose K/V came from the model's prefix cache) is absent from older exports: 0."""
    def one(name: str):
        x = res.as_numpy(name)
        return None if x is None else x.reshape(-1)[0]

    return {"prompt_tokens": int(one("prompt_tokens")), "completion_tokens": int(one("completion_tokens")),
            "finish_reason": one("finish_reason").decode(), "batch_size": int(one("batch_size")),
            "cached_tokens": int(one("cached_tokens") or 0)}


def _usage(out: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's usage object, with prompt_tokens_details.cached_tokens as OpenAI reports prompt caching."""
    return {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
            "total_tokens": out["prompt_tokens"] + out["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": out.get("cached_tokens", 0)}}


def api_keys(settings: Settings) -> tuple[str, ...]:
    """The keys the gateway accepts, from the environment variable `serve.gateway.api_keys_env` names."""
    var = settings.serve.gateway.api_keys_env
    if not var:
        return ()
    keys = tuple(k.strip() for k in os.environ.get(var, "").split(",") if k.strip())
    if not keys or any(len(k) < 16 for k in keys):
        raise ConfigError(f"serve.gateway.api_keys_env={var}: set ${var} to one or more comma-separated keys "
                         "of 16 characters or more")
    return keys


def auth_headers(settings: Settings) -> dict[str, str]:
    """What a client of this gateway sends: the first configured key, if keys are on."""
    keys = api_keys(settings)
    return {"Authorization": f"Bearer {keys[0]}"} if keys else {}


def _session_of(req: ChatRequest, request: Request) -> str | None:
    sid = request.headers.get("x-session-id") or req.session_id or req.user
    if sid is not None and not SESSION_ID.fullmatch(sid):
        raise ApiError(400, "session id (X-Session-Id, session_id or user) must be 1-128 of A-Z a-z 0-9 _ . : @ -",
                       param="session_id", code="invalid_value")
    return sid


def create_app(settings: Settings, triton_grpc: str | None = None, triton_http: str | None = None) -> FastAPI:
    gw = Gateway(settings, triton_grpc, triton_http)

    async def lifespan(app):
        await gw.poll_triton(force=True)
        if gw.memory is not None:  # serving starts with the embedder loaded (~6 s on 2 cores): no
            await gw.memory.wait_ready()  # CPU burst under the first requests, no recall skipped
        yield
        await gw.close()

    app = FastAPI(title="llmops chat gateway", version="1", lifespan=lifespan)
    app.state.gateway = gw

    @app.middleware("http")
    async def _api_key(request: Request, call_next):
        """/v1/* needs one of the configured keys when any is set; health and metrics stay open."""
        if gw.api_keys and request.url.path.startswith("/v1/"):
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.strip().encode(), k.encode())
                                                      for k in gw.api_keys):
                gw.metrics.rejected.labels("unauthorized").inc()
                return ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}).response(gw.headers)
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return e.response(gw.headers)

    @app.get("/healthz")
    async def healthz():
        up = await gw.poll_triton(force=True)
        for r in gw.tiers.values():
            r.refresh_files()
        memory = None if gw.memory is None else {"ready": gw.memory.ready, "pending": await gw.memory.queue.pending()}
        body = {"status": "ok" if up and gw.router.ready else "unavailable", "triton": "up" if up else "down",
                "memory": memory,
                "versions_ready": sorted(gw.router.ready), "aliases": gw.router.aliases,
                "tiers": {t: {"model": r.name, "versions_ready": sorted(r.ready), "aliases": r.aliases}
                          for t, r in gw.tiers.items()},
                "queue": gw.admission.queued, "inflight": gw.admission.inflight, "safety_version": gw.safety.version}
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503, headers=gw.headers)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        gw.metrics.queue.set(gw.admission.queued)
        gw.metrics.inflight.set(gw.admission.inflight)
        if gw.memory is not None:
            await gw.memory.update_gauges()
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        await gw.poll_triton()
        ids = []
        for r in gw.tiers.values():
            r.refresh_files()
            ids += r.model_ids()
        if SMALL in gw.tiers and gw.tiers[SMALL].ready:
            ids += list(gw.routing.aliases)
        return JSONResponse({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "llmops"} for m in ids]}, headers=gw.headers)

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str):
        if not SESSION_ID.fullmatch(session_id):
            raise ApiError(400, "invalid session id", param="session_id", code="invalid_value")
        turns = await gw.store.delete(session_id)
        gone = await gw.memory.forget(session=session_id) if gw.memory is not None else {"queued": 0, "memories": 0}
        return JSONResponse({"id": session_id, "object": "session", "deleted": bool(turns or gone["memories"]),
                             "turns": turns, "memories": gone["memories"], "queued": gone["queued"]},
                            headers=gw.headers)

    @app.delete("/v1/users/{user_id}")
    async def delete_user(user_id: str):
        """A user's long-term memories from every session, and the session keyed by the user id itself
        (a request with `user` and no session id keeps its turns under the user id)."""
        if not SESSION_ID.fullmatch(user_id):
            raise ApiError(400, "invalid user id", param="user_id", code="invalid_value")
        turns = await gw.store.delete(user_id)
        gone = {"queued": 0, "memories": 0}
        if gw.memory is not None:
            gone = await gw.memory.forget(session=user_id, user=user_id)
        return JSONResponse({"id": user_id, "object": "user", "deleted": bool(turns or gone["memories"]),
                             "turns": turns, **gone}, headers=gw.headers)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        t0 = time.perf_counter()
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        record: dict[str, Any] = {"request_id": rid, "safety_version": gw.safety.version}
        model_label = "unknown"
        tier_headers: dict[str, str] = {}  # on every answer once the tier is chosen, errors included
        try:
            body = await request.body()
            if len(body) > gw.cfg.max_request_bytes:
                raise ApiError(413, f"request body of {len(body)} bytes exceeds {gw.cfg.max_request_bytes}",
                               code="request_too_large")
            try:
                payload = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
            if not isinstance(payload, dict):
                raise ApiError(400, "request body must be a JSON object", code="invalid_json")
            try:
                req = ChatRequest.model_validate(payload)
                messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                            for m in req.messages]
            except ValidationError as e:
                raise _validation_error(e) from None
            except ValueError as e:
                raise ApiError(400, f"invalid value for 'messages': {e}", param="messages",
                               code="invalid_value") from None
            if messages[-1]["role"] == "assistant":
                raise ApiError(400, "the last message must be from the user (or system)", param="messages",
                               code="invalid_value")
            session = _session_of(req, request)
            priority = PRIORITIES.get((request.headers.get("x-priority") or req.priority or "interactive").lower())
            if priority is None:
                raise ApiError(400, "X-Priority must be interactive or batch", param="priority", code="invalid_value")
            await gw.poll_triton()
            if not gw.triton_up:
                raise ApiError(503, "the model server is unavailable; retry shortly", type_="server_error",
                               code="model_server_unavailable", headers={"Retry-After": str(gw.cfg.retry_after_s)})
            history = await gw.store.get(session) if session else []
            route, decision = _choose_route(gw, req, request, messages, history, session or rid)
            tier_headers = gw.tier_headers(decision)
            gw.metrics.routes.labels(decision.tier, decision.kind).inc()
            model_label = f"{route.triton_model}:{route.version}"
            tok, block = gw.tokenizer(route)
            # not given: the configured default, but never more than half this model's window
            max_tokens = req.max_completion_tokens or req.max_tokens or min(gw.cfg.default_max_tokens, block // 2)
            if max_tokens >= block:
                raise ApiError(400, f"max_tokens={max_tokens} must be below this model's context of {block} tokens",
                               param="max_tokens", code="invalid_value")
            record.update({"model": route.model_id, "version": route.version, "alias": route.alias,
                           "tier": decision.tier, "route_reason": decision.reason, "requested_model": req.model,
                           "session": session, "stream": req.stream, "priority": priority})
            verdict_in = gw.safety.check("\n".join(m["content"] for m in messages if m["role"] == "user"))
            record["safety_input"] = verdict_in.to_dict()
            if verdict_in.blocked:
                gw.metrics.safety.labels("input", verdict_in.rule).inc()
                return _refusal(gw, req, route, rid, record, t0, messages, tier_headers)
            last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            asked = messages
            if gw.memory is not None and session:
                t_mem = time.perf_counter()
                recalled = await gw.memory.recall(session, req.user, last_user, history)
                asked, n_mem = with_memories(tok, [m.text for m, _ in recalled], messages, block - max_tokens,
                                             gw.settings.serve.memory.max_prompt_share)
                gw.memory.m_recalled.labels("hit" if n_mem else "miss" if gw.memory.ready else "not_ready").inc()
                record["memory_ms"] = round((time.perf_counter() - t_mem) * 1e3, 3)
                record["memories"] = [{"id": m.id, "score": round(sc, 4)} for m, sc in recalled[:n_mem]]
                record["memories_recalled"] = len(recalled)  # above min_similarity; `memories` is what fitted
            try:
                prompt = fit_turns(tok, history, asked, block - max_tokens)
            except PromptTooLong as e:
                raise ApiError(400, f"This model's maximum context length is {block} tokens: {e}",
                               param="messages", code="context_length_exceeded") from None
            record["history_turns_used"] = len(prompt) - len(asked)
            if req.stream:
                try:
                    await gw.admission.acquire(priority)
                except Overloaded as e:
                    raise _overloaded(gw, e) from None
                return StreamingResponse(_stream(gw, req, route, rid, prompt, messages, max_tokens, session, record, t0),
                                         media_type="text/event-stream",
                                         headers={**gw.headers, **tier_headers, "X-Model-Version": str(route.version),
                                                  "X-Request-Id": rid, "Cache-Control": "no-cache"})
            try:
                out, shared = await gw.infer_once(route, prompt, max_tokens, req, priority)
            except Overloaded as e:
                raise _overloaded(gw, e) from None
            except TritonUnavailable:
                raise
            except Exception as e:  # noqa: BLE001 - any other model-server failure: a 502 with a body, never a bare 500
                raise ApiError(502, f"the model server failed this request: {str(e)[:300]}", type_="server_error",
                               code="model_server_error") from None
            if shared:
                record["coalesced"] = True
            text = out["text"].strip()
            verdict_out = gw.safety.check(text)
            record["safety_output"] = verdict_out.to_dict()
            if verdict_out.blocked:
                gw.metrics.safety.labels("output", verdict_out.rule).inc()
                text, out["finish_reason"] = gw.safety.cfg.refusal, "content_filter"
            elif session:
                await _keep(gw, session, req.user, messages, text)
            latency = time.perf_counter() - t0
            _observe(gw, model_label, 200, latency, latency, out, record, messages, text)
            _mirror(gw, route, session or rid, prompt, max_tokens, req, record, latency, out, text)
            extra = {"X-Coalesced": "true"} if shared else {}
            return JSONResponse({
                "id": rid, "object": "chat.completion", "created": int(time.time()), "model": route.model_id,
                "system_fingerprint": f"{route.triton_model}:{route.version}",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": out["finish_reason"], "logprobs": None}],
                "usage": _usage(out)},
                headers={**gw.headers, **tier_headers, **extra, "X-Model-Version": str(route.version),
                         "X-Request-Id": rid})
        except ApiError as e:
            gw.metrics.requests.labels(model_label, str(e.status)).inc()
            if e.status == 503:
                gw.metrics.rejected.labels("unavailable").inc()
            gw.log.write({**record, "status": e.status, "error": e.code, "latency_ms": (time.perf_counter() - t0) * 1e3})
            return e.response({**gw.headers, **tier_headers})
        except TritonUnavailable as e:
            gw.triton_up = False
            gw.metrics.requests.labels(model_label, "503").inc()
            gw.log.write({**record, "status": 503, "error": "model_server_unavailable"})
            return ApiError(503, f"the model server is unavailable: {str(e)[:200]}", type_="server_error",
                            code="model_server_unavailable",
                            headers={"Retry-After": str(gw.cfg.retry_after_s)}).response({**gw.headers, **tier_headers})

    return app


def _overloaded(gw: Gateway, e: Overloaded) -> ApiError:
    gw.metrics.rejected.labels("overloaded").inc()
    return ApiError(429, f"the server is at capacity ({e}); retry after {gw.cfg.retry_after_s}s",
                    type_="rate_limit_error", code="overloaded", headers={"Retry-After": str(gw.cfg.retry_after_s)})


async def _keep(gw: Gateway, session: str, user: str | None, messages: list[dict], reply: str) -> None:
    """A finished exchange: its turns into the short-term store, and queued for long-term memory
    (condensed and embedded by the memory worker, after this request has been answered)."""
    await gw.store.append(session, [m for m in messages if m["role"] != "system"]
                          + [{"role": "assistant", "content": reply}])
    if gw.memory is not None:
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        await gw.memory.remember(session, user, last_user, reply)


def _choose_route(gw: Gateway, req: ChatRequest, request: Request, messages: list[dict], history: list[dict],
                  key: str) -> tuple[Route, Decision]:
    """The tier policy (tasks/serve/tiers.py) applied to this request, and the route in that tier."""
    asked = tier_of_model(req.model, gw.router.name, gw.routing)
    small = gw.small_route(key, req.stream) if asked is None else None

    def prompt_tokens() -> int:  # in the small model's own tokenizer: the light threshold is about it
        assert small is not None  # decide() counts only when the small tier is served
        tok, _ = gw.tokenizer(small)
        return len(encode_chat(tok, [*history, *messages], add_generation_prompt=True))

    try:
        decision = decide(gw.routing, asked=asked, header=request.headers.get(gw.routing.header),
                          max_tokens=req.max_completion_tokens or req.max_tokens or gw.cfg.default_max_tokens,
                          prompt_tokens=prompt_tokens, small_served=small is not None)
    except TierError as e:
        raise ApiError(400, str(e), param=gw.routing.header, code="invalid_value") from None
    if decision.tier == LARGE:
        return gw.router.route(req.model, key), decision
    if small is not None:
        return small, decision
    tier = gw.tiers[SMALL]  # asked for by name
    if not tier.ready:  # a name that is not served: as for any unknown model, not a silent switch
        raise ApiError(404, f"The model '{req.model}' is not served: no version of the small tier ({tier.name}) "
                       "is loaded; GET /v1/models lists the served ones", param="model", code="model_not_found")
    return tier.route(small_model_id(req.model, gw.routing), key), decision


def _observe(gw: Gateway, model_label: str, status: int, latency: float, ttft: float, out: dict, record: dict,
             messages: list[dict], text: str) -> None:
    m = gw.metrics
    m.requests.labels(model_label, str(status)).inc()
    m.latency.labels(model_label).observe(latency)
    m.ttft.labels(model_label).observe(ttft)
    m.tokens.labels(model_label, "prompt").inc(out["prompt_tokens"])
    m.tokens.labels(model_label, "completion").inc(out["completion_tokens"])
    if out.get("cached_tokens"):
        m.tokens.labels(model_label, "prompt_cached").inc(out["cached_tokens"])
    if out.get("batch_size"):
        m.batch.observe(out["batch_size"])
    m.completed(out["completion_tokens"])
    last_user = next((x["content"] for x in reversed(messages) if x["role"] == "user"), "")
    gw.log.write({**record, "status": status, "latency_ms": round(latency * 1e3, 3), "ttft_ms": round(ttft * 1e3, 3),
                  "prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                  "cached_tokens": out.get("cached_tokens", 0),
                  "finish_reason": out["finish_reason"], "batch_size": out.get("batch_size"),
                  "prompt": gw.log.scrub(last_user), "response": gw.log.scrub(text)})


def _mirror(gw: Gateway, route: Route, key: str, prompt: list[dict], max_tokens: int, req: ChatRequest,
            record: dict, latency: float, out: dict, text: str) -> None:
    shadow = gw.tiers[route.tier].shadow_of(route, key)  # each tier mirrors to its own challenger
    if shadow is None:
        return
    last_user = next((x["content"] for x in reversed(prompt) if x["role"] == "user"), "")
    champion = {"version": route.version, "status": 200, "latency_ms": round(latency * 1e3, 3),
                "prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                "finish_reason": out["finish_reason"], "safety_output": record.get("safety_output"),
                "response": gw.log.scrub(text)}
    gw.mirror(shadow, prompt, max_tokens, req, {"request_id": record["request_id"], "session": record.get("session"),
                                                 "prompt": gw.log.scrub(last_user), "reply": champion})


def _refusal(gw: Gateway, req: ChatRequest, route: Route, rid: str, record: dict, t0: float, messages: list[dict],
             tier_headers: dict[str, str]):
    text = gw.safety.cfg.refusal
    out = {"prompt_tokens": 0, "completion_tokens": 0, "finish_reason": "content_filter"}
    latency = time.perf_counter() - t0
    _observe(gw, f"{route.triton_model}:{route.version}", 200, latency, latency, out, record, messages, text)
    headers = {**gw.headers, **tier_headers, "X-Model-Version": str(route.version), "X-Request-Id": rid,
               "X-Safety-Blocked": "input"}
    if req.stream:
        async def one():
            yield _sse(_chunk(rid, route, {"role": "assistant", "content": text}, None))
            yield _sse(_chunk(rid, route, {}, "content_filter"))
            yield "data: [DONE]\n\n"
        return StreamingResponse(one(), media_type="text/event-stream", headers=headers)
    return JSONResponse({"id": rid, "object": "chat.completion", "created": int(time.time()), "model": route.model_id,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": "content_filter", "logprobs": None}],
                         "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}, headers=headers)


def _chunk(rid: str, route: Route, delta: dict, finish: str | None, usage: dict | None = None) -> dict:
    c = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": route.model_id,
         "system_fingerprint": f"{route.triton_model}:{route.version}",
         "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    if usage is not None:
        c["usage"] = usage
    return c


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(gw: Gateway, req: ChatRequest, route: Route, rid: str, prompt: list[dict], messages: list[dict],
                  max_tokens: int, session: str | None, record: dict, t0: float):
    """Server-sent events in OpenAI's format. The admission slot is held until the stream ends.
    The reply is checked by the safety filter as it grows; a block ends the stream with
    finish_reason "content_filter" (text already sent stays sent, as with any streaming filter)."""
    label = f"{route.triton_model}:{route.version}"
    parts: list[str] = []
    ttft = None
    final: dict[str, Any] | None = None
    blocked = None
    try:
        yield _sse(_chunk(rid, route, {"role": "assistant", "content": ""}, None))
        async for kind, value in gw.infer_stream(route, prompt, max_tokens, req, rid):
            if kind == "final":
                final = value
                break
            if ttft is None:
                ttft = time.perf_counter() - t0
                value = value.lstrip()
            parts.append(value)
            if value:
                yield _sse(_chunk(rid, route, {"content": value}, None))
        text = "".join(parts).strip()
        verdict = gw.safety.check(text)
        record["safety_output"] = verdict.to_dict()
        if verdict.blocked:
            blocked = verdict
            gw.metrics.safety.labels("output", verdict.rule).inc()
        final = final or {"prompt_tokens": 0, "completion_tokens": len(parts), "finish_reason": "stop"}
        finish = "content_filter" if blocked else final["finish_reason"]
        usage = _usage(final)
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        yield _sse(_chunk(rid, route, {}, finish))
        if include_usage:
            c = _chunk(rid, route, {}, None, usage)
            c["choices"] = []
            yield _sse(c)
        yield "data: [DONE]\n\n"
        if session and not blocked:
            await _keep(gw, session, req.user, messages, text)
        latency = time.perf_counter() - t0
        _observe(gw, label, 200, latency, ttft or latency, {**final, "finish_reason": finish}, record, messages, text)
        _mirror(gw, route, session or rid, prompt, max_tokens, req, record, latency, final, text)
    except TritonUnavailable as e:
        gw.triton_up = False
        gw.metrics.requests.labels(label, "503").inc()
        gw.log.write({**record, "status": 503, "error": "model_server_unavailable"})
        err = {"error": {"message": f"the model server is unavailable: {str(e)[:200]}", "type": "server_error",
                         "param": None, "code": "model_server_unavailable"}}
        yield _sse(err)
    except Exception as e:  # noqa: BLE001 - the stream ends with an error event, not a dropped connection
        gw.metrics.requests.labels(label, "502").inc()
        gw.log.write({**record, "status": 502, "error": "model_server_error"})
        yield _sse({"error": {"message": f"the model server failed this request: {str(e)[:200]}",
                              "type": "server_error", "param": None, "code": "model_server_error"}})
    finally:
        gw.admission.release()


def main(argv: list[str] | None = None) -> None:
    """Run the gateway in the foreground (what `llmops serve` starts in the background)."""
    import argparse

    import uvicorn

    from tasks.config import load_settings

    ap = argparse.ArgumentParser(prog="python -m tasks.serve.gateway", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--triton-grpc", default=None, help="host:port of Triton's gRPC endpoint")
    args = ap.parse_args(argv)
    settings = load_settings(args.profile, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings, triton_grpc=args.triton_grpc)
    uvicorn.run(app, host=settings.stack.host, port=args.port or settings.serve.gateway.port, log_level="warning",
                access_log=False, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
