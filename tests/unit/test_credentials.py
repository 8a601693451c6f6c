"""Secrets from the environment or a `<NAME>_FILE` (docker-compose.yml's /run/secrets/): tasks/credentials.py
and the places that connect with them (the gateway's context store, session memory, API keys, MLflow)."""

from __future__ import annotations

import os

import pytest

from tasks.config import load_settings
from tasks.credentials import expand_env, export_file_secret, secret_env
from tasks.errors import ConfigError


@pytest.fixture
def secret_file(tmp_path, monkeypatch):
    def make(name: str, value: str):
        path = tmp_path / name.lower()
        path.write_text(value)
        monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv(f"{name}_FILE", str(path))
        return path
    return make


def test_a_secret_is_the_variable_else_the_file_it_names(secret_file, monkeypatch):
    path = secret_file("LLMOPS_T_PW", "from-the-file\n")
    assert secret_env("LLMOPS_T_PW") == "from-the-file"   # a trailing newline is not part of it
    assert expand_env("redis://:${LLMOPS_T_PW}@redis:6379/1", "k") == "redis://:from-the-file@redis:6379/1"
    monkeypatch.setenv("LLMOPS_T_PW", "from-the-env")
    assert secret_env("LLMOPS_T_PW") == "from-the-env"   # the variable wins
    monkeypatch.delenv("LLMOPS_T_PW")
    path.write_text("")
    with pytest.raises(ConfigError,
                       match=rf"serve.memory.queue: LLMOPS_T_PW_FILE={path}: the secret file is empty"):
        expand_env("redis://:${LLMOPS_T_PW}@redis", "serve.memory.queue")
    path.unlink()
    with pytest.raises(ConfigError, match=r"LLMOPS_T_PW_FILE=.*cannot read the secret file"):
        secret_env("LLMOPS_T_PW")
    monkeypatch.delenv("LLMOPS_T_PW_FILE")
    assert secret_env("LLMOPS_T_PW") is None
    with pytest.raises(ConfigError,
                       match=r"serve.gateway.context_store refers to \$\{LLMOPS_T_PW\}.*LLMOPS_T_PW_FILE"):
        expand_env("redis://:${LLMOPS_T_PW}@redis", "serve.gateway.context_store")
    assert expand_env("redis://redis:6379/1", "k") == "redis://redis:6379/1"   # nothing to expand


def test_the_gateway_connects_with_the_secret_its_url_names(secret_file):
    """docker-compose.yml passes `--set serve.gateway.context_store=redis://:${REDIS_PASSWORD}@redis...`
    (no password in the argv) and REDIS_PASSWORD_FILE; the store's connection gets the password."""
    from tasks.serve.memory import SessionMemory
    from tasks.serve.sessions import RedisStore, open_store

    secret_file("REDIS_PASSWORD", "r3dis-secret")
    s = load_settings("tiny", ["serve.gateway.context_store=redis://:${REDIS_PASSWORD}@redis:6379/1",
                               "serve.memory.queue=redis://:${REDIS_PASSWORD}@redis:6379/2"])
    # the settings keep the reference; only the connection gets the secret
    assert s.serve.gateway.context_store == "redis://:${REDIS_PASSWORD}@redis:6379/1"
    store = open_store(s.serve.gateway)   # redis-py connects lazily: nothing is reached here
    assert isinstance(store, RedisStore)
    assert store.r.connection_pool.connection_kwargs["password"] == "r3dis-secret"
    memory = SessionMemory(s.serve.memory, s.ingest.pii_kinds)
    assert memory.queue.r.connection_pool.connection_kwargs["password"] == "r3dis-secret"


def test_gateway_api_keys_from_a_file(secret_file):
    from tasks.serve.gateway.tenancy import api_keys

    secret_file("LLMOPS_T_KEYS", "ops=" + "k" * 16 + ",\n" + "ci=" + "q" * 20 + "\n")   # commas or one a line
    s = load_settings("tiny", ["serve.gateway.api_keys_env=LLMOPS_T_KEYS"])
    assert {k: p.id for k, p in api_keys(s).items()} == {"k" * 16: "ops", "q" * 20: "ci"}
    secret_file("LLMOPS_T_KEYS", "")
    with pytest.raises(ConfigError, match=r"LLMOPS_T_KEYS_FILE=.*the secret file is empty"):
        api_keys(s)


def test_mlflow_password_file_reaches_mlflows_client(secret_file, monkeypatch, tmp_path):
    from tasks.ops.stack import mlflow_credentials
    from tasks.tracking import mlflow_client

    secret_file("MLFLOW_TRACKING_PASSWORD", "a-long-mlflow-password\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")   # a client connects on first use only
    try:
        mlflow_client(load_settings("tiny", [f"paths.root={tmp_path}"]))
        assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "a-long-mlflow-password"
    finally:
        os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)   # set by the code, not by monkeypatch
    secret_file("LLMOPS_MLFLOW_ADMIN_PASSWORD", "another-long-password")
    assert mlflow_credentials()["MLFLOW_TRACKING_PASSWORD"] == "another-long-password"
    export_file_secret("LLMOPS_T_UNSET")   # neither variable: nothing is set
    assert "LLMOPS_T_UNSET" not in os.environ
