"""The gateway's answers to hostile or broken input (issue 22, robust requests): every failure an OpenAI
error body, never a bare 500; the body's type and size checked before it is read."""

import pytest

from tasks.procs import free_port
from tasks.serve.gateway.errors import ApiError
from tests.helpers.project import make_settings

BODY = b'{"model": "chat-gpt", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.fixture
def http(tmp_path):
    from fastapi.testclient import TestClient

    from tasks.serve.gateway import create_app

    s = make_settings(tmp_path, f"serve.triton.grpc_port={free_port()}",
                      "serve.gateway.max_request_bytes=4096", "serve.memory.enabled=false")
    with TestClient(create_app(s), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        yield client


def _err(r, status, code):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]
    return err


def test_only_json_bodies_are_read(http):
    # what a cross-site form or fetch without a preflight can send
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"content-type": kind} if kind else {}
        _err(http.post("/v1/chat/completions", content=BODY, headers=headers), 415, "unsupported_media_type")
    # charset parameters are fine; past the checks this request meets the missing model server
    r = http.post("/v1/chat/completions", content=BODY,
                  headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"


def test_oversized_bodies_are_refused_without_reading_them(http):
    big = b'{"model": "chat-gpt", "messages": [{"role": "user", "content": "' + b"x" * 10_000 + b'"}]}'
    _err(http.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"}),
         413, "request_too_large")
    # a chunked upload without Content-Length: the reader stops a chunk past the limit (the ASGI test
    # client buffers whole bodies, so the reader is driven directly, as uvicorn drives it)
    import asyncio

    from starlette.requests import Request

    from tasks.serve.gateway.app import read_capped

    sent = []

    async def receive():
        sent.append(1)
        return {"type": "http.request", "body": b" " * 1024, "more_body": len(sent) < 1024}

    scope = {"type": "http", "method": "POST", "path": "/",
             "headers": [(b"content-type", b"application/json")]}
    with pytest.raises(ApiError) as e:
        asyncio.run(read_capped(Request(scope, receive), 4096))
    assert e.value.status == 413 and len(sent) == 5  # 5 KB read of the 1 MB, nothing more
    declared = {**scope, "headers": [(b"content-length", b"1048576")]}
    with pytest.raises(ApiError):
        asyncio.run(read_capped(Request(declared, receive), 4096))
    assert len(sent) == 5  # refused on its declared length: not a byte read


@pytest.mark.parametrize("text", ["\\ud800", "a\\udfffb", "\\udc00\\ud800"])
def test_lone_surrogates_are_a_400_not_a_500(http, text):
    body = b'{"model": "chat-gpt", "messages": [{"role": "user", "content": "' + text.encode() + b'"}]}'
    err = _err(http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"}),
               400, "invalid_value")
    assert "Unicode" in err["message"]


def test_an_unexpected_failure_is_an_error_body_and_counted(http, monkeypatch):
    from tasks.serve.gateway import app as gateway_app

    async def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(gateway_app, "_complete", broken)
    err = _err(http.post("/v1/chat/completions", content=BODY, headers={"content-type": "application/json"}),
               500, "internal_error")
    assert "KeyError" in err["message"] and "a bug" not in err["message"]  # no internals in the answer
    assert 'gateway_rejected_total{reason="internal_error"} 1.0' in http.get("/metrics").text


def test_docs_are_off_unless_asked_for(http, tmp_path):
    from fastapi.testclient import TestClient

    from tasks.serve.gateway import create_app

    assert http.get("/docs").status_code == 404 and http.get("/openapi.json").status_code == 404
    s = make_settings(tmp_path / "docs", f"serve.triton.grpc_port={free_port()}", "serve.gateway.docs=true",
                      "serve.memory.enabled=false")
    with TestClient(create_app(s), base_url="http://127.0.0.1") as client:
        assert client.get("/openapi.json").json()["paths"]["/v1/chat/completions"]


def test_every_429_and_503_says_when_to_retry():
    for status in (429, 503):
        r = ApiError(status, "busy", code="x").response({}, retry_after_s=3)
        assert r.headers["retry-after"] == "3"
    own = ApiError(503, "down", headers={"Retry-After": "10"}).response({}, retry_after_s=3)
    assert own.headers["retry-after"] == "10"
    assert "retry-after" not in ApiError(400, "bad").response({}).headers


def test_export_checks_the_weights_hash_and_where_the_tokenizer_comes_from(tmp_path):
    import json

    from tasks.atomic import sha256_file
    from tasks.serve.export import ExportError, export_dir

    s = make_settings(tmp_path)
    w = tmp_path / "final"
    w.mkdir()
    (w / "model.safetensors").write_bytes(b"weights")
    (w / "config.json").write_text("{}")
    outside = tmp_path / "elsewhere" / "tokenizer.json"  # e.g. ~/.ssh/id_rsa named by a forged lineage
    outside.parent.mkdir()
    outside.write_text("{}")
    (w / "_lineage.json").write_text(json.dumps({"id": "x", "tokenizer": {"path": str(outside)}}))
    with pytest.raises(ExportError, match="outside the data directory"):
        export_dir(s, w, "chat-gpt", 1)
    inside = s.paths.tokenizers / "k" / "tokenizer.json"
    inside.parent.mkdir(parents=True)
    inside.write_text("{}")
    (w / "_lineage.json").write_text(json.dumps({"id": "x", "tokenizer": {"path": str(inside)}}))
    with pytest.raises(ExportError, match="differs from the registered"):
        export_dir(s, w, "chat-gpt", 1, expected_sha256="0" * 64)
    assert not (s.paths.triton_repository / "chat-gpt" / "1").exists()  # nothing written
    out = export_dir(s, w, "chat-gpt", 1, expected_sha256=sha256_file(w / "model.safetensors"))
    assert out["weights_sha256"] == sha256_file(w / "model.safetensors")


def test_only_requests_addressed_to_the_gateway_by_name_are_answered(http, tmp_path):
    from fastapi.testclient import TestClient

    from tasks.serve.gateway import create_app
    from tasks.serve.gateway.app import allowed_hosts, host_name

    # a DNS-rebinding page: its own name, resolved to 127.0.0.1
    for host in ("attacker.example", "attacker.example:9000", "127.0.0.1.attacker.example", ""):
        _err(http.get("/v1/models", headers={"host": host}), 400, "invalid_host")
        _err(http.post("/v1/chat/completions", content=BODY,
                       headers={"host": host, "content-type": "application/json"}), 400, "invalid_host")
    for host in ("127.0.0.1:9000", "localhost", "LOCALHOST:9000", "[::1]:9000"):
        assert http.get("/healthz", headers={"host": host}).status_code in (200, 503), host
    assert host_name("[::1]:9000") == "[::1]" and host_name("a.example:1") == "a.example"
    assert allowed_hosts(make_settings(tmp_path, "stack.host=0.0.0.0")) == {"127.0.0.1", "localhost", "[::1]"}
    s = make_settings(tmp_path / "c", f"serve.triton.grpc_port={free_port()}", "serve.memory.enabled=false",
                      "serve.gateway.allowed_hosts=[gateway]")
    with TestClient(create_app(s), base_url="http://gateway:9000") as client:  # compose's service name
        assert client.get("/v1/models").status_code == 200
        assert client.get("/v1/models", headers={"host": "localhost"}).status_code == 400


def test_cpu_work_runs_off_the_event_loop(tmp_path):
    import asyncio
    import time
    from types import SimpleNamespace

    from tasks.serve.gateway.app import off_loop

    gw = SimpleNamespace(cfg=SimpleNamespace(request_timeout_s=0.5))

    async def scenario():
        ticks = []

        async def ticker():
            for _ in range(20):
                ticks.append(time.perf_counter())
                await asyncio.sleep(0.01)

        t = asyncio.create_task(ticker())
        assert await off_loop(gw, lambda: time.sleep(0.2) or "done") == "done"  # a slow tokenisation
        assert len(ticks) >= 10  # the loop kept serving meanwhile
        await t
        with pytest.raises(ApiError) as e:
            await off_loop(gw, time.sleep, 1.0)
        assert e.value.status == 503 and e.value.code == "timeout"

    asyncio.run(scenario())
