"""The gateway's HTTP app: create_app() and the request handlers.

    llmops serve                     # tritonserver + this gateway on 127.0.0.1:9000
    curl -s 127.0.0.1:9000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"model": "chat-gpt", "messages": [{"role": "user", "content": "Hi"}]}'

Endpoints: POST /v1/chat/completions (JSON, or server-sent events with "stream": true, in
OpenAI's chunk format), GET /v1/models, DELETE /v1/sessions/{id}, DELETE /v1/users/{id},
GET /healthz, GET /metrics. The official `openai` client works against it with
`base_url="http://127.0.0.1:9000/v1"`.

A request goes: parse and validate (400 with an OpenAI-style error body naming the parameter)
-> tier (small or large, tasks/serve/tiers.py: the model id, the X-Tier header, or light vs heavy;
sent back as X-Tier and X-Route-Reason) -> route within the tier (model id -> Triton model
version; `chat-gpt` follows the tier's aliases and sticky traffic split, and so does
`chat-gpt-small`) -> session turns fitted into the model's window -> safety filter on the prompt
(a refusal, counted) -> admission (bounded queue by priority; 429 + Retry-After when full) ->
Triton over gRPC (streaming for stream mode) -> safety filter on the reply -> request log line
(PII scrubbed) and metrics. Triton unreachable gives 503 until it is back; nothing is retried
behind the caller's back. A reply to the champion may then be mirrored to the challenger
(engine.py says how).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from tasks.config import Settings
from tasks.model.chat_template import PromptTooLong, encode_chat, fit_turns, with_memories
from tasks.serve.admission import PRIORITIES, Overloaded
from tasks.serve.gateway.engine import Gateway
from tasks.serve.gateway.errors import ApiError, TritonUnavailable, overloaded_error
from tasks.serve.gateway.metrics import phases
from tasks.serve.gateway.routing import Route, choose_route, session_of
from tasks.serve.gateway.schema import (
    ChatRequest,
    StopScanner,
    check_supported,
    chunk,
    cut_at_stop,
    openai_usage,
    sse,
    validation_error,
)
from tasks.serve.gateway.tenancy import LOCAL, Principal, authenticate, retry_after
from tasks.serve.sessions import SESSION_ID
from tasks.serve.tiers import SMALL, Decision

log = logging.getLogger("llmops.gateway")


def create_app(settings: Settings, triton_grpc: str | None = None, triton_http: str | None = None) -> FastAPI:
    gw = Gateway(settings, triton_grpc, triton_http)
    docs = settings.serve.gateway.docs  # off by default: a page any site can frame or script against
    app = FastAPI(title="llmops chat gateway", version="1", lifespan=_lifespan,
                  docs_url="/docs" if docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.gateway = gw  # the handlers find it here
    app.middleware("http")(_api_key)
    app.middleware("http")(_host)  # added last: runs first
    app.state.allowed_hosts = allowed_hosts(settings)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(Exception, _unexpected)
    app.get("/healthz")(healthz)
    app.get("/metrics")(metrics)
    app.get("/v1/models")(models)
    app.delete("/v1/sessions/{session_id}")(delete_session)
    app.delete("/v1/users/{user_id}")(delete_user)
    app.post("/v1/chat/completions")(chat)
    app.openapi = lambda: _openapi(app)
    return app


ERRORS = {400: "invalid request (the body names the parameter)", 401: "missing or unknown API key",
          404: "model not served", 413: "body too large", 415: "not application/json",
          429: "rate limit or capacity (Retry-After)", 503: "model server unavailable (Retry-After)"}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, plus what the chat handler reads itself (it parses the body to answer bad
    JSON, wrong types and sizes with OpenAI error bodies): the request body's schema, and the error
    answers of /v1/*. What /docs shows and what schema-driven fuzzers (schemathesis) generate from."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        body = ChatRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components["ChatRequest"] = body
        components["Error"] = {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"], "properties": {
                "message": {"type": "string"}, "type": {"type": "string"},
                "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
        chat_op = schema["paths"]["/v1/chat/completions"]["post"]
        chat_op["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ChatRequest"}}}}
        for path, ops in schema["paths"].items():
            for op in ops.values() if path.startswith("/v1/") else ():
                for p in op.get("parameters", ()):  # the ids the handlers check (400 otherwise)
                    if p["in"] == "path" and p["name"] in ("session_id", "user_id"):
                        p["schema"] = {"type": "string", "pattern": SESSION_ID.pattern, "maxLength": 128}
                op["responses"].pop("422", None)  # FastAPI's own validation answer: never sent here
                for status, what in ERRORS.items():
                    op["responses"].setdefault(str(status), {"description": what, "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
        app.openapi_schema = schema
    return app.openapi_schema


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def _lifespan(app: FastAPI):
    gw: Gateway = app.state.gateway
    await gw.poll_triton(force=True)
    await asyncio.to_thread(gw.measure_safety)  # off the event loop; before the first request is served
    if gw.memory is not None:  # serving starts with the embedder loaded (~6 s on 2 cores): no
        await gw.memory.wait_ready()  # CPU burst under the first requests, no recall skipped
    yield
    await gw.close()


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def allowed_hosts(settings: Settings) -> frozenset[str]:
    """The Host names the gateway answers: serve.gateway.allowed_hosts, or the loopback names and
    stack.host (unless it is a wildcard address)."""
    named = settings.serve.gateway.allowed_hosts
    if named:
        return frozenset(h.lower() for h in named)
    host = settings.stack.host
    return frozenset((*LOOPBACK_NAMES, *(() if host in ("0.0.0.0", "::") else (host.lower(),))))


def host_name(header: str) -> str:
    """The name part of a Host header: 'a.example:9000' -> 'a.example', '[::1]:9000' -> '[::1]'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[:header.find("]") + 1]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


async def _host(request: Request, call_next):
    """Answer only requests addressed to this gateway by name: a page on another site that rebinds its
    own name to 127.0.0.1 (DNS rebinding) still sends that name."""
    allowed = request.app.state.allowed_hosts
    name = host_name(request.headers.get("host", ""))
    if "*" not in allowed and name not in allowed:
        gw = _gateway(request)
        gw.metrics.rejected.labels("host").inc()
        return ApiError(400, f"Host {name!r} is not served here (serve.gateway.allowed_hosts)",
                        code="invalid_host").response(gw.headers)
    return await call_next(request)


async def _api_key(request: Request, call_next):
    """/v1/* acts for a principal: the owner of the request's API key when keys are configured (401
    without one), else `local`; then the principal's rate limit (429). Health and metrics stay open."""
    gw = _gateway(request)
    if not request.url.path.startswith("/v1/"):
        return await call_next(request)
    principal = LOCAL
    if gw.api_keys:
        principal = authenticate(gw.api_keys, request.headers.get("authorization", ""))
        if principal is None:
            gw.metrics.rejected.labels("unauthorized").inc()
            e = ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                         code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return e.response(gw.headers)
    wait = gw.rate_limit.take(principal.id)
    if wait > 0:
        gw.metrics.rejected.labels("rate_limited").inc()
        e = ApiError(429, f"Rate limit reached for {principal.id}: {gw.cfg.rate_limit_rps:g} requests per "
                     f"second (bursts of {gw.cfg.rate_limit_burst}); retry in {wait:.2f}s",
                     type_="requests", code="rate_limit_exceeded", headers={"Retry-After": retry_after(wait)})
        return e.response(gw.headers)
    request.state.principal = principal
    return await call_next(request)


def _principal(request: Request) -> Principal:
    return request.state.principal


async def _api_error(request: Request, e: ApiError):
    gw = _gateway(request)
    return e.response(gw.headers, gw.cfg.retry_after_s)


async def _unexpected(request: Request, e: Exception):
    """Whatever else fails is still an OpenAI error body, logged with its traceback and counted: never a
    bare 500."""
    gw = _gateway(request)
    log.exception("unexpected failure of %s %s", request.method, request.url.path)
    gw.metrics.rejected.labels("internal_error").inc()
    return ApiError(500, f"the gateway failed this request ({type(e).__name__}); it has been logged",
                    type_="server_error", code="internal_error").response(gw.headers)


# ---------------------------------------------------------------- health, metrics, models, deletions


async def healthz(request: Request):
    gw = _gateway(request)
    up = await gw.poll_triton(force=True)
    for r in gw.tiers.values():
        r.refresh_files()
    memory = (None if gw.memory is None
              else {"ready": gw.memory.ready, "pending": await gw.memory.queue.pending()})
    body = {"status": "ok" if up and gw.router.ready else "unavailable", "triton": "up" if up else "down",
            "memory": memory,
            "versions_ready": sorted(gw.router.ready), "aliases": gw.router.aliases,
            "tiers": {t: {"model": r.name, "versions_ready": sorted(r.ready), "aliases": r.aliases}
                      for t, r in gw.tiers.items()},
            "queue": gw.admission.queued, "inflight": gw.admission.inflight,
            "safety_version": gw.safety.version}
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503, headers=gw.headers)


async def metrics(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    gw = _gateway(request)
    gw.metrics.queue.set(gw.admission.queued)
    gw.metrics.inflight.set(gw.admission.inflight)
    if gw.memory is not None:
        await gw.memory.update_gauges()
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def models(request: Request):
    gw = _gateway(request)
    await gw.poll_triton()
    ids = []
    for r in gw.tiers.values():
        r.refresh_files()
        ids += r.model_ids()
    if SMALL in gw.tiers and gw.tiers[SMALL].ready:
        ids += list(gw.routing.aliases)
    return JSONResponse({"object": "list", "data": [
        {"id": m, "object": "model", "created": 0, "owned_by": "llmops"} for m in ids]}, headers=gw.headers)


async def delete_session(session_id: str, request: Request):
    """The caller's own session: its turns, its long-term memories (queued or stored) and its lines in
    the request and shadow logs."""
    gw = _gateway(request)
    if not SESSION_ID.fullmatch(session_id):
        raise ApiError(400, "invalid session id", param="session_id", code="invalid_value")
    session = _principal(request).scoped(session_id)
    turns = await gw.store.delete(session)
    gone = {"queued": 0, "memories": 0}
    if gw.memory is not None:
        gone = await gw.memory.forget(session=session)
    lines = await gw.forget_logs(session=session)
    return JSONResponse({"id": session_id, "object": "session",
                         "deleted": bool(turns or gone["memories"] or lines), "turns": turns,
                         "memories": gone["memories"], "queued": gone["queued"], "log_lines": lines},
                        headers=gw.headers)


async def delete_user(user_id: str, request: Request):
    """One of the caller's users: the short-term turns of every session that named this user, the
    session keyed by the user id itself (a request with `user` and no session id keeps its turns
    there), the user's long-term memories from every session, and the lines of all of these in the
    request and shadow logs."""
    gw = _gateway(request)
    if not SESSION_ID.fullmatch(user_id):
        raise ApiError(400, "invalid user id", param="user_id", code="invalid_value")
    user = _principal(request).scoped(user_id)
    turns = await gw.store.delete(user)
    sessions = await gw.store.delete_user(user)
    gone = {"queued": 0, "memories": 0}
    if gw.memory is not None:
        gone = await gw.memory.forget(session=user, user=user)
    lines = await gw.forget_logs(user=user)
    return JSONResponse({"id": user_id, "object": "user",
                         "deleted": bool(turns or sessions or gone["memories"] or lines),
                         "turns": turns, "sessions": sessions, **gone, "log_lines": lines},
                        headers=gw.headers)


# ---------------------------------------------------------------- chat completions


@dataclass
class Exchange:
    """One chat completion on its way through the handler: what its error answer and log line need,
    however far it got."""

    rid: str
    t0: float
    record: dict[str, Any]  # the request log line, filled in as the request goes
    model_label: str = "unknown"
    tier_headers: dict[str, str] = field(default_factory=dict)  # on every answer once the tier is chosen


async def chat(request: Request):
    gw = _gateway(request)
    t0 = time.perf_counter()
    rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    x = Exchange(rid, t0, {"request_id": rid, "safety_version": gw.safety.version})
    try:
        return await _complete(gw, request, x)
    except ApiError as e:
        gw.metrics.requests.labels(x.model_label, str(e.status)).inc()
        if e.status == 503:
            gw.metrics.rejected.labels("unavailable").inc()
        gw.log.write({**x.record, "status": e.status, "error": e.code,
                      "latency_ms": (time.perf_counter() - t0) * 1e3})
        return e.response({**gw.headers, **x.tier_headers}, gw.cfg.retry_after_s)
    except TritonUnavailable as e:
        gw.triton_up = False
        gw.metrics.requests.labels(x.model_label, "503").inc()
        gw.log.write({**x.record, "status": 503, "error": "model_server_unavailable",
                      "error_detail": str(e)[:300]})
        down = ApiError(503, f"the model server is unavailable: {str(e)[:200]}", type_="server_error",
                        code="model_server_unavailable", headers={"Retry-After": str(gw.cfg.retry_after_s)})
        return down.response({**gw.headers, **x.tier_headers})


async def _complete(gw: Gateway, request: Request, x: Exchange) -> Response:
    """The request from its body to its answer; an error is raised, for chat() to answer and log."""
    req, messages = await _read_request(gw, request)
    who = _principal(request)
    # the caller's names, kept in its principal's space: no other key's requests can reach them
    session = who.scoped(session_of(req, request))
    if req.user is not None:  # from here on `user` is the scoped name too (recall, remember)
        req = req.model_copy(update={"user": who.scoped(req.user)})
    priority = _priority(req, request)
    await gw.poll_triton()
    if not gw.triton_up:
        raise ApiError(503, "the model server is unavailable; retry shortly", type_="server_error",
                       code="model_server_unavailable", headers={"Retry-After": str(gw.cfg.retry_after_s)})
    history = await gw.store.get(session) if session else []
    route, decision = _tier_and_route(gw, req, request, [*history, *messages], session or x.rid)
    x.tier_headers = gw.tier_headers(decision)
    gw.metrics.routes.labels(decision.tier, decision.kind).inc()
    if req.temperature > 0 and req.seed is None and gw.tiers[route.tier].shadow_of(route, session or x.rid):
        # a request the shadow mirrors samples with one seed on both sides (drawn here when the client
        # gave none): identical models then reply alike, and the shadow measures the model, not the dice
        req = req.model_copy(update={"seed": secrets.randbelow(2**62)})
        x.record["shadow_seed"] = req.seed
    x.model_label = f"{route.triton_model}:{route.version}"
    tok, block = gw.tokenizer(route)
    if req.logit_bias and (bad := [k for k in req.logit_bias if int(k) >= tok.get_vocab_size()]):
        raise ApiError(400, f"logit_bias names token ids {bad[:5]} outside this model's vocabulary of "
                            f"{tok.get_vocab_size()}", param="logit_bias", code="invalid_value")
    # not given: the configured default, but never more than half this model's window
    max_tokens = req.max_completion_tokens or req.max_tokens or min(gw.cfg.default_max_tokens, block // 2)
    if max_tokens >= block:
        raise ApiError(400, f"max_tokens={max_tokens} must be below this model's context of {block} tokens",
                       param="max_tokens", code="invalid_value")
    x.record.update({"model": route.model_id, "version": route.version, "alias": route.alias,
                     "tier": decision.tier, "route_reason": decision.reason, "requested_model": req.model,
                     "session": gw.pseudonym(session), "user": gw.pseudonym(req.user), "stream": req.stream,
                     "priority": priority})
    verdict_in = await off_loop(gw, gw.safety.check,
                                 "\n".join(m["content"] for m in messages if m["role"] == "user"))
    x.record["safety_input"] = verdict_in.to_dict()
    if verdict_in.blocked:
        gw.metrics.safety.labels("input", verdict_in.rule).inc()
        return _refusal(gw, req, route, x.rid, x.record, x.t0, messages, x.tier_headers)
    asked = await _recall(gw, req, session, messages, history, tok, block - max_tokens, x.record)
    try:
        prompt = await off_loop(gw, fit_turns, tok, history, asked, block - max_tokens)
    except PromptTooLong as e:
        raise ApiError(400, f"This model's maximum context length is {block} tokens: {e}",
                       param="messages", code="context_length_exceeded") from None
    x.record["history_turns_used"] = len(prompt) - len(asked)
    if req.stream:
        return await _start_stream(gw, req, route, x, prompt, messages, max_tokens, session, priority)
    return await _answer(gw, req, route, x, prompt, messages, max_tokens, session, priority)


async def _read_request(gw: Gateway, request: Request) -> tuple[ChatRequest, list[dict]]:
    """The validated request and its messages as plain turns (a developer message is a system one)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":  # a browser's cross-site form or text/plain POST never gets this far
        raise ApiError(415, f"Content-Type must be application/json, got {kind or 'none'!r}",
                       code="unsupported_media_type")
    body = await read_capped(request, gw.cfg.max_request_bytes)
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    try:  # JSON may escape a lone surrogate ("\ud800"): no text a model or a log can hold
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"the request holds invalid Unicode ({e.reason}: "
                            f"{e.object[e.start:e.end]!r}); send UTF-8 text", code="invalid_value") from None
    check_supported(payload)
    try:
        req = ChatRequest.model_validate(payload)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
    except ValidationError as e:
        raise validation_error(e) from None
    except ValueError as e:
        raise ApiError(400, f"invalid value for 'messages': {e}", param="messages",
                       code="invalid_value") from None
    if messages[-1]["role"] == "assistant":
        raise ApiError(400, "the last message must be from the user (or system)", param="messages",
                       code="invalid_value")
    return req, messages


async def off_loop(gw: Gateway, fn, *args):
    """Run CPU work (tokenising, the safety classifier) in a worker thread, so a long prompt does not
    hold up every other request's event loop; past serve.gateway.request_timeout_s it is a 503."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(fn, *args), gw.cfg.request_timeout_s)
    except TimeoutError:
        raise ApiError(503, f"the request's preparation took longer than {gw.cfg.request_timeout_s:g}s",
                       type_="server_error", code="timeout") from None


async def read_capped(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes: from Content-Length
    before reading anything, else while it streams in (never buffered past the limit)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds {limit}", code="request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, f"request body exceeds {limit} bytes", code="request_too_large")
    return bytes(body)


def _priority(req: ChatRequest, request: Request) -> int:
    priority = PRIORITIES.get((request.headers.get("x-priority") or req.priority or "interactive").lower())
    if priority is None:
        raise ApiError(400, "X-Priority must be interactive or batch", param="priority", code="invalid_value")
    return priority


def _tier_and_route(gw: Gateway, req: ChatRequest, request: Request, turns: list[dict],
                    key: str) -> tuple[Route, Decision]:
    """routing.choose_route with this gateway's tiers; `turns` (history, then the new messages) are
    counted only if the policy asks how long the prompt is."""
    def count_prompt(route: Route) -> int:
        tok, _ = gw.tokenizer(route)
        return len(encode_chat(tok, turns, add_generation_prompt=True))

    return choose_route(gw.tiers, gw.routing, req, request.headers.get(gw.routing.header),
                        gw.cfg.default_max_tokens, key, count_prompt)


async def _recall(gw: Gateway, req: ChatRequest, session: str | None, messages: list[dict],
                  history: list[dict], tok, budget: int, record: dict) -> list[dict]:
    """The new messages with the session's long-term memories that fit `budget` tokens put in (as
    they are when memory is off or there is no session)."""
    if gw.memory is None or not session:
        return messages
    last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    t_mem = time.perf_counter()
    recalled = await gw.memory.recall(session, req.user, last_user, history)
    asked, n_mem = with_memories(tok, [m.text for m, _ in recalled], messages, budget,
                                 gw.settings.serve.memory.max_prompt_share)
    gw.memory.m_recalled.labels("hit" if n_mem else "miss" if gw.memory.ready else "not_ready").inc()
    record["memory_ms"] = round((time.perf_counter() - t_mem) * 1e3, 3)
    record["memories"] = [{"id": m.id, "score": round(sc, 4)} for m, sc in recalled[:n_mem]]
    record["memories_recalled"] = len(recalled)  # above min_similarity; `memories` is what fitted
    return asked


async def _start_stream(gw: Gateway, req: ChatRequest, route: Route, x: Exchange, prompt: list[dict],
                        messages: list[dict], max_tokens: int, session: str | None,
                        priority: int) -> Response:
    try:
        await gw.admission.acquire(priority)
    except Overloaded as e:
        raise overloaded_error(e, gw.metrics, gw.cfg.retry_after_s) from None
    events = _stream(gw, req, route, x.rid, prompt, messages, max_tokens, session, x.record, x.t0)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={**gw.headers, **x.tier_headers, "X-Model-Version": str(route.version),
                                      "X-Request-Id": x.rid, "Cache-Control": "no-cache"})


async def _answer(gw: Gateway, req: ChatRequest, route: Route, x: Exchange, prompt: list[dict],
                  messages: list[dict], max_tokens: int, session: str | None, priority: int) -> Response:
    """The whole reply as one chat.completion (identical requests in flight share one inference)."""
    try:
        out, shared = await gw.infer_once(route, prompt, max_tokens, req, priority)
    except Overloaded as e:
        raise overloaded_error(e, gw.metrics, gw.cfg.retry_after_s) from None
    except TritonUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 - any other model-server failure: a 502 with a body, never a bare 500
        x.record["error_detail"] = str(e)[:300]
        if not await gw.serving(route):  # the model server is restarting or reloading this version: retry
            raise TritonUnavailable(str(e)) from None
        raise ApiError(502, f"the model server failed this request: {str(e)[:300]}", type_="server_error",
                       code="model_server_error") from None
    if shared:
        x.record["coalesced"] = True
    text, stopped = cut_at_stop(out["text"].strip(), req.stop)
    if stopped:
        out = {**out, "finish_reason": "stop"}
        text = text.strip()
    verdict_out = await off_loop(gw, gw.safety.check, text)
    x.record["safety_output"] = verdict_out.to_dict()
    if verdict_out.blocked:
        gw.metrics.safety.labels("output", verdict_out.rule).inc()
        text, out["finish_reason"] = gw.safety.cfg.refusal, "content_filter"
    elif session:
        await _keep(gw, session, req.user, messages, text)
    latency = time.perf_counter() - x.t0
    _observe(gw, x.model_label, 200, latency, latency, out, x.record, messages, text)
    _mirror(gw, route, session or x.rid, prompt, max_tokens, req, x.record, latency, out, text)
    extra = {"X-Coalesced": "true"} if shared else {}
    return JSONResponse({
        "id": x.rid, "object": "chat.completion", "created": int(time.time()), "model": route.model_id,
        "system_fingerprint": f"{route.triton_model}:{route.version}",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": out["finish_reason"], "logprobs": None}],
        "usage": openai_usage(out)},
        headers={**gw.headers, **x.tier_headers, **extra, "X-Model-Version": str(route.version),
                 "X-Request-Id": x.rid})


async def _keep(gw: Gateway, session: str, user: str | None, messages: list[dict], reply: str) -> None:
    """A finished exchange: its turns (PII scrubbed) into the short-term store, and queued for long-term
    memory (condensed and embedded by the memory worker, after this request has been answered)."""
    turns = [m for m in messages if m["role"] != "system"] + [{"role": "assistant", "content": reply}]
    # kept PII-scrubbed, as the logs and long-term memories are: a later turn sees "[EMAIL]"
    await gw.store.append(session, [{**m, "content": gw.log.scrub(m["content"])} for m in turns], user)
    if gw.memory is not None:
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        await gw.memory.remember(session, user, last_user, reply)


def _observe(gw: Gateway, model_label: str, status: int, latency: float, ttft: float, out: dict, record: dict,
             messages: list[dict], text: str) -> None:
    m = gw.metrics
    split = phases(latency * 1e3, out)
    if split is not None and not record.get("coalesced"):  # a follower's answer is its leader's
        record["phases"] = split
        record["engine_steps"] = out["engine"]["steps"]
        for k, v in split.items():
            m.phase.labels(model_label, k[:-3]).observe(v / 1e3)
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
    gw.log.write({**record, "status": status, "latency_ms": round(latency * 1e3, 3),
                  "ttft_ms": round(ttft * 1e3, 3), "prompt_tokens": out["prompt_tokens"],
                  "completion_tokens": out["completion_tokens"], "cached_tokens": out.get("cached_tokens", 0),
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
    gw.mirror(shadow, prompt, max_tokens, req, {"request_id": record["request_id"],
                                                 "session": record.get("session"), "user": record.get("user"),
                                                 "prompt": gw.log.scrub(last_user), "reply": champion})


def _refusal(gw: Gateway, req: ChatRequest, route: Route, rid: str, record: dict, t0: float,
             messages: list[dict], tier_headers: dict[str, str]) -> Response:
    text = gw.safety.cfg.refusal
    label = f"{route.triton_model}:{route.version}"
    out = {"prompt_tokens": 0, "completion_tokens": 0, "finish_reason": "content_filter"}
    latency = time.perf_counter() - t0
    _observe(gw, label, 200, latency, latency, out, record, messages, text)
    headers = {**gw.headers, **tier_headers, "X-Model-Version": str(route.version), "X-Request-Id": rid,
               "X-Safety-Blocked": "input"}
    if req.stream:
        async def one():
            yield sse(chunk(rid, route.model_id, label, {"role": "assistant", "content": text}, None))
            yield sse(chunk(rid, route.model_id, label, {}, "content_filter"))
            yield "data: [DONE]\n\n"
        return StreamingResponse(one(), media_type="text/event-stream", headers=headers)
    return JSONResponse({"id": rid, "object": "chat.completion", "created": int(time.time()),
                         "model": route.model_id,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": "content_filter", "logprobs": None}],
                         "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}},
                        headers=headers)


async def _stream(gw: Gateway, req: ChatRequest, route: Route, rid: str, prompt: list[dict],
                  messages: list[dict], max_tokens: int, session: str | None, record: dict, t0: float):
    """Server-sent events in OpenAI's format. The admission slot is held until the stream ends.
    The reply is checked by the safety filter as it grows; a block ends the stream with
    finish_reason "content_filter" (text already sent stays sent, as with any streaming filter)."""
    label = f"{route.triton_model}:{route.version}"
    parts: list[str] = []
    ttft = None
    final: dict[str, Any] | None = None
    blocked = None
    scanner = StopScanner(req.stop)
    pieces = None
    written = 0.0
    try:
        yield sse(chunk(rid, route.model_id, label, {"role": "assistant", "content": ""}, None))
        pieces = gw.infer_stream(route, prompt, max_tokens, req, rid)
        async for kind, value in pieces:
            if kind == "final":
                final = value
                break
            if ttft is None:
                ttft = time.perf_counter() - t0
                value = value.lstrip()
            value = scanner.feed(value)
            parts.append(value)
            if value:
                w = time.perf_counter()
                yield sse(chunk(rid, route.model_id, label, {"content": value}, None))
                written += time.perf_counter() - w  # the write to the client (it overlaps the decoding)
            if scanner.hit:  # a stop string: the reply ends here; closing the stream cancels the rest
                break
        if tail := scanner.flush():
            parts.append(tail)
            yield sse(chunk(rid, route.model_id, label, {"content": tail}, None))
        if scanner.hit:
            final = {**(final or {"prompt_tokens": 0, "completion_tokens": len(parts)}),
                     "finish_reason": "stop"}
        text = "".join(parts).strip()
        verdict = gw.safety.check(text)
        record["safety_output"] = verdict.to_dict()
        if verdict.blocked:
            blocked = verdict
            gw.metrics.safety.labels("output", verdict.rule).inc()
        final = final or {"prompt_tokens": 0, "completion_tokens": len(parts), "finish_reason": "stop"}
        finish = "content_filter" if blocked else final["finish_reason"]
        usage = openai_usage(final)
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        yield sse(chunk(rid, route.model_id, label, {}, finish))
        if include_usage:
            c = chunk(rid, route.model_id, label, {}, None, usage)
            c["choices"] = []
            yield sse(c)
        yield "data: [DONE]\n\n"
        if session and not blocked:
            await _keep(gw, session, req.user, messages, text)
        latency = time.perf_counter() - t0
        record["write_ms"] = round(written * 1e3, 3)
        _observe(gw, label, 200, latency, ttft or latency, {**final, "finish_reason": finish}, record,
                 messages, text)
        _mirror(gw, route, session or rid, prompt, max_tokens, req, record, latency, final, text)
    except Exception as e:  # noqa: BLE001 - the stream ends with an error event, not a dropped connection
        # unavailable: Triton is down, or restarting or reloading this version (a failure while it is
        # not ready); else the model server failed this request
        down = isinstance(e, TritonUnavailable) or not await gw.serving(route)
        if down:
            gw.triton_up = False
        status, code = (503, "model_server_unavailable") if down else (502, "model_server_error")
        gw.metrics.requests.labels(label, str(status)).inc()
        gw.log.write({**record, "status": status, "error": code, "error_detail": str(e)[:300]})
        what = "is unavailable" if down else "failed this request"
        yield sse({"error": {"message": f"the model server {what}: {str(e)[:200]}",
                             "type": "server_error", "param": None, "code": code}})
    finally:
        if pieces is not None:  # ended, stopped, or the client went away (this task cancelled): the model
            # server's stream is cancelled unless it ended, and the engine stops decoding it
            with contextlib.suppress(Exception):
                await pieces.aclose()
        gw.admission.release()
