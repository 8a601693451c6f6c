"""Secrets from the environment or from files, never from configs/ or a command line.

    expand_env("redis://:${REDIS_PASSWORD}@redis:6379/1", "serve.gateway.context_store")
    secret_env("LLMOPS_GATEWAY_API_KEYS")

A secret NAME is the environment variable NAME, else the content of the file $NAME_FILE names (the
Docker/Kubernetes secrets convention: docker-compose.yml mounts them under /run/secrets/), with the
trailing newline stripped. A configured URL carries `${NAME}` literally and is expanded only where
the connection is made, so the password never sits in a config file, an argv or a log line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tasks.errors import ConfigError

_REF = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)\}")


def secret_env(name: str, key: str | None = None) -> str | None:
    """$NAME, else the content of the file $NAME_FILE (trailing newline stripped), else None.
    An unreadable or empty file is an error naming the file (and `key`, the setting that asked)."""
    if name in os.environ:
        return os.environ[name]
    path = os.environ.get(f"{name}_FILE")
    if not path:
        return None
    who = f"{key}: " if key else ""
    try:
        value = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as e:
        raise ConfigError(f"{who}{name}_FILE={path}: cannot read the secret file ({e.strerror})") from None
    if not value:
        raise ConfigError(f"{who}{name}_FILE={path}: the secret file is empty")
    return value


def expand_env(text: str, key: str) -> str:
    """`${NAME}` in a configured value -> the secret NAME (see secret_env); `key` names the setting."""
    def value(m: re.Match) -> str:
        v = secret_env(m.group(1), key)
        if v is None:
            raise ConfigError(f"{key} refers to ${{{m.group(1)}}}, which is not set in the environment "
                              f"(set {m.group(1)}, or {m.group(1)}_FILE to a file holding it)")
        return v

    return _REF.sub(value, text)


def export_file_secret(name: str) -> None:
    """Put the secret NAME into this process's environment when only $NAME_FILE is set, for a library
    that reads the variable itself (MLflow's client reads MLFLOW_TRACKING_PASSWORD)."""
    if name not in os.environ and (v := secret_env(name)) is not None:
        os.environ[name] = v
