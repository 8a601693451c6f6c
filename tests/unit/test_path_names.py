"""Every name that becomes a path or a key is checked first: `../` and its kin are refused everywhere."""

from __future__ import annotations

import pytest

from tasks.config import ConfigError, load_settings
from tasks.data.partition import PartitionError, check_day
from tasks.names import BadName, check_name, check_version
from tasks.serve.sessions import SESSION_ID
from tests.helpers.project import make_settings

EVIL = ["../etc", "..", "a/../../b", "/abs/path", "x/y", ".hidden", "ok\x00", "a\\..\\b", "", "a" * 65]


@pytest.mark.parametrize("name", EVIL)
def test_model_alias_and_session_names(name):
    with pytest.raises(BadName):
        check_name(name)
    with pytest.raises(BadName):
        check_name(name, "alias")
    # session ids are keys, never paths; still no separators
    if any(c in name for c in "/\\\x00") or not name:
        assert not SESSION_ID.fullmatch(name)
    with pytest.raises(BadName):
        check_version(name)


@pytest.mark.parametrize("ref", ["../chat-gpt@1", "chat-gpt@../1", "chat-gpt@..", "a/b@1", "chat-gpt@0", "@1",
                                 "chat-gpt@/etc"])
def test_reproduce_refs(ref):
    from tasks.judge.reproduce import parse_ref

    with pytest.raises(BadName):
        parse_ref(ref)


def test_reproduce_refs_that_are_fine():
    from tasks.judge.reproduce import parse_ref

    assert parse_ref("chat-gpt@3") == ("chat-gpt", "3")
    assert parse_ref("chat-gpt-small@challenger") == ("chat-gpt-small", "challenger")
    assert parse_ref("chat-gpt") == ("chat-gpt", "champion")


@pytest.mark.parametrize("key", ["distill.registered_model", "distill.teacher_alias"])
def test_distill_names_that_become_paths(tmp_path, key):
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        make_settings(tmp_path, f"{key}=../escape")


@pytest.mark.parametrize("name", ["../tiny", "tiny/../../x", "/etc/passwd", "..", "tiny;rm"])
def test_profile_names(name):
    with pytest.raises(ConfigError, match="profile"):
        load_settings(name)


@pytest.mark.parametrize("key", ["serve.triton.model_name", "tracking.registered_model",
                                 "tracking.experiment", "serve.safety.version"])
def test_configured_names_that_become_paths(tmp_path, key):
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        make_settings(tmp_path, f"{key}=../escape")


@pytest.mark.parametrize("day", ["../2026-11-01", "2026-11-01/..", "2026-13-01", "2026-11-1",
                                 "dt=2026-11-01"])
def test_partition_days(day):
    with pytest.raises(PartitionError):
        check_day(day)


def test_gateway_refuses_traversal_in_session_ids_and_model_ids(tmp_path):
    from fastapi.testclient import TestClient

    from tasks.procs import free_port
    from tasks.serve.gateway import create_app

    s = make_settings(tmp_path, f"serve.triton.grpc_port={free_port()}")
    with TestClient(create_app(s), base_url="http://127.0.0.1") as http:
        assert http.delete("/v1/sessions/..%2F..%2Fetc").status_code in (400, 404)
        r = http.post("/v1/chat/completions", headers={"X-Session-Id": "../../etc/passwd"},
                      json={"model": "chat-gpt", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code in (400, 503), r.text  # 503 only if the id check came after the server check
        r = http.post("/v1/chat/completions",
                      json={"model": "chat-gpt:../1", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code in (404, 503), r.text
