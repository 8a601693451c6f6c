"""Tenancy (issue 22): API keys map to principals, each principal's sessions and users are its own,
each has its own rate limit, and a gateway beyond loopback refuses to start without keys. The same
through a real model server and memory: tests/integration/test_serving.py."""

import asyncio

import pytest

from tasks.errors import ConfigError
from tasks.procs import free_port
from tasks.serve.gateway.tenancy import LOCAL, Principal, RateLimiter, authenticate, parse_keys
from tests.helpers.project import make_settings

KEY_A, KEY_B = "sk-alice-" + "a" * 20, "sk-bob-" + "b" * 20


def test_keys_name_their_principals_and_bad_entries_name_the_variable():
    keys = parse_keys(f"alice={KEY_A}, {KEY_B} ,", "$K")
    assert keys[KEY_A] == Principal("alice")
    assert keys[KEY_B].id.startswith("key-") and len(keys[KEY_B].id) == 16  # a bare key: its own principal
    assert parse_keys(KEY_B, "$K")[KEY_B] == keys[KEY_B]  # the same name every time
    for value, said in (("alice=short", "entry 1 (alice): a key needs 16"),
                        (f"al/ice={KEY_A}", "entry 1: principal 'al/ice'"),
                        (f"alice={KEY_A},bob={KEY_A}", "one key given to two principals")):
        with pytest.raises(ConfigError, match=r"\$K"):
            parse_keys(value, "$K")
        with pytest.raises(ConfigError, match=said.replace("(", r"\(").replace(")", r"\)")):
            parse_keys(value, "$K")


def test_authenticate_needs_a_bearer_key_it_knows():
    keys = parse_keys(f"alice={KEY_A},bob={KEY_B}", "$K")
    assert authenticate(keys, f"Bearer {KEY_B}") == Principal("bob")
    assert authenticate(keys, f"bearer  {KEY_A} ") == Principal("alice")
    for header in ("", KEY_A, f"Basic {KEY_A}", f"Bearer {KEY_A}x", "Bearer "):
        assert authenticate(keys, header) is None


def test_scoped_names_of_two_principals_never_meet():
    a, b = Principal("a"), Principal("a.b")
    assert a.scoped("s1") != b.scoped("s1") and a.scoped(None) is None
    # '/' ends the principal's part and no principal id holds one: "a" + "b/s1" is not "a.b" + "s1"
    assert a.scoped("b/s1") != b.scoped("s1") and LOCAL.scoped("x") == "local/x"


def test_each_principal_has_its_own_token_bucket():
    rl = RateLimiter(rate=2.0, burst=3)
    assert [rl.take("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rl.take("a", now=0.0) == pytest.approx(0.5)  # the 4th: one token is 0.5 s away
    assert rl.take("b", now=0.0) == 0.0  # another principal is not held up
    assert rl.take("a", now=0.5) == 0.0 and rl.take("a", now=0.5) > 0
    assert rl.take("a", now=100.0) == 0.0  # refilled, never beyond the burst
    assert [rl.take("a", now=100.0) for _ in range(3)][-1] > 0
    assert RateLimiter(0.0, 1).take("a") == 0.0  # 0: no limit


def test_a_gateway_beyond_loopback_refuses_to_start_without_keys(tmp_path, monkeypatch):
    from tasks.serve.gateway import create_app

    with pytest.raises(ConfigError, match="stack.host=0.0.0.0 without API keys"):
        create_app(make_settings(tmp_path, "stack.host=0.0.0.0", "serve.memory.enabled=false"))
    monkeypatch.setenv("LLMOPS_GATEWAY_API_KEYS", f"alice={KEY_A}")
    create_app(make_settings(tmp_path, "stack.host=0.0.0.0", "serve.memory.enabled=false",
                             "serve.gateway.api_keys_env=LLMOPS_GATEWAY_API_KEYS"))
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        create_app(make_settings(tmp_path, f"stack.host={host}", "serve.memory.enabled=false"))


@pytest.fixture
def two_keys(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from tasks.serve.gateway import create_app

    monkeypatch.setenv("LLMOPS_GATEWAY_API_KEYS", f"alice={KEY_A},bob={KEY_B}")
    s = make_settings(tmp_path, f"serve.triton.grpc_port={free_port()}", "serve.memory.enabled=false",
                      "serve.gateway.api_keys_env=LLMOPS_GATEWAY_API_KEYS",
                      "serve.gateway.rate_limit_rps=0.5", "serve.gateway.rate_limit_burst=3")
    app = create_app(s)
    with TestClient(app, base_url="http://127.0.0.1") as http:
        yield http, app.state.gateway


def _as(key):
    return {"Authorization": f"Bearer {key}"}


def test_one_principal_cannot_delete_another_principals_session_or_user(two_keys):
    http, gw = two_keys
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]

    async def store_as_the_chat_handler_does():
        await gw.store.append("alice/s1", turns, "alice/u1")
        await gw.store.append("alice/s2", turns, "alice/u1")

    asyncio.run(store_as_the_chat_handler_does())
    # bob names alice's session and user: nothing of alice's is touched
    r = http.delete("/v1/sessions/s1", headers=_as(KEY_B))
    assert r.status_code == 200 and r.json()["deleted"] is False and r.json()["turns"] is False
    r = http.delete("/v1/users/u1", headers=_as(KEY_B))
    assert r.json()["deleted"] is False and r.json()["sessions"] == 0
    assert asyncio.run(gw.store.get("alice/s1")) == turns and asyncio.run(gw.store.get("alice/s2")) == turns
    # no key: no access at all
    assert http.delete("/v1/sessions/s1").status_code == 401
    # alice deletes her user: every session that named it goes
    r = http.delete("/v1/users/u1", headers=_as(KEY_A))
    assert r.json()["deleted"] is True and r.json()["sessions"] == 2, r.json()
    assert asyncio.run(gw.store.get("alice/s1")) == [] == asyncio.run(gw.store.get("alice/s2"))


def test_a_principal_over_its_rate_gets_429_with_retry_after_and_others_do_not(two_keys):
    http, _ = two_keys
    assert [http.get("/v1/models", headers=_as(KEY_A)).status_code for _ in range(3)] == [200] * 3
    r = http.get("/v1/models", headers=_as(KEY_A))
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded", r.text
    assert "alice" in r.json()["error"]["message"] and int(r.headers["retry-after"]) in (1, 2)
    assert http.get("/v1/models", headers=_as(KEY_B)).status_code == 200
    assert 'gateway_rejected_total{reason="rate_limited"} 1.0' in http.get("/metrics").text
    # probes and scrapers are neither keyed nor limited
    assert all(http.get("/metrics").status_code == 200 for _ in range(5))


# ---------------------------------------------------------------- privacy: pseudonyms, log deletion


def test_pseudonyms_are_stable_per_install_and_reveal_nothing(tmp_path):
    from tasks.serve.gateway.tenancy import Pseudonyms

    s = make_settings(tmp_path)
    p = Pseudonyms.of_install(s)
    name = LOCAL.scoped("ann@example.com")
    assert p(name) == Pseudonyms.of_install(s)(name) and p(None) is None  # the key is kept (0600)
    assert "ann" not in p(name) and p(name) != p(LOCAL.scoped("bob@example.com"))
    assert (s.paths.var_dir / "secrets" / "log_pseudonym_key").stat().st_mode & 0o777 == 0o600
    assert Pseudonyms.of_install(make_settings(tmp_path / "other"))(name) != p(name)  # another install


def _write_lines(root, n):
    from tasks.serve.gateway.metrics import RequestLog

    log = RequestLog(root, True, ())
    for i in range(n):
        log.write({"i": i, "session": "drop" if i % 2 else "keep"})
    log.close()


def test_forgetting_log_lines_while_another_process_writes_loses_no_other_line(tmp_path):
    """`forget` rewrites a partition under the writers' lock; a writer whose file was replaced writes
    to the new one: every line of the other sessions survives, whatever the interleaving."""
    import json
    import multiprocessing

    from tasks.serve.gateway.metrics import RequestLog

    root, n = tmp_path / "requests", 2000
    mine = RequestLog(root, True, ())
    mine.write({"i": -1, "session": "keep"})  # this process's own open file is rewritten too
    writer = multiprocessing.get_context("fork").Process(target=_write_lines, args=(root, n))
    writer.start()
    removed = 0
    while writer.is_alive():
        removed += mine.forget({"session": {"drop"}})
    writer.join()
    removed += mine.forget({"session": {"drop"}})
    mine.write({"i": -2, "session": "keep"})
    mine.close()
    lines = [json.loads(x) for f in root.glob("dt=*/*.jsonl") for x in f.read_text().splitlines()]
    assert writer.exitcode == 0 and removed == n // 2
    assert sorted(x["i"] for x in lines) == [-2, -1, *range(0, n, 2)]
