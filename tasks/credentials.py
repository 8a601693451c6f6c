"""Secrets: from the environment or from files, never from configs/ or a command line; and the keys
generated once per install.

    expand_env("redis://:${REDIS_PASSWORD}@redis:6379/1", "serve.gateway.context_store")
    secret_env("LLMOPS_GATEWAY_API_KEYS")
    install_secret(var / "secrets" / "triton_admin_key", env="LLMOPS_TRITON_ADMIN_KEY")

A secret NAME is the environment variable NAME, else the content of the file $NAME_FILE names (the
Docker/Kubernetes secrets convention: docker-compose.yml mounts them under /run/secrets/), with the
trailing newline stripped. A configured URL carries `${NAME}` literally and is expanded only where
the connection is made, so the password never sits in a config file, an argv or a log line.

A per-install key (`install_secret`) is the secret `env` when set (a deployment hands the same key
to every container), else the file's: read, or created on first use under a temporary name with
mode 0600 and linked into place, so two processes starting at once end up with the same key and
nobody reads a half-written file. A file that others could read (group or other permission bits, a
symlink, not a regular file) is refused, naming it: the key would no longer be the owner's alone.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
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


# what fits in a header value and in tritonserver's `<apis>:<key>=<value>` flags unquoted
KEY = re.compile(r"^[A-Za-z0-9_.~-]{16,512}$")


class SecretError(ConfigError):
    """A secret file with loose permissions, or a secret from the environment that is not usable."""


def install_secret(path: Path, env: str | None = None) -> str:
    """The secret `env` if set (secret_env: the variable or its _FILE), else the one in `path` (created
    with mode 0600 on first use)."""
    if env and (value := (secret_env(env) or "").strip()):
        if not KEY.match(value):
            raise SecretError(f"${env} (or the file ${env}_FILE names) must be 16 to 512 characters of "
                              "A-Z a-z 0-9 _ . ~ - (e.g. python -c 'import secrets; "
                              "print(secrets.token_urlsafe(32))')")
        return value
    if not os.path.lexists(path):
        _create(path)
    return _read(path)


def _create(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process got there first: its key stands
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:  # ELOOP: a symlink
        raise SecretError(f"secret file {path} cannot be read as a plain file ({e.strerror}): remove it "
                          "and a new one is generated") from None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SecretError(f"secret file {path} is not a regular file: remove it and a new one is "
                              "generated")
        if st.st_mode & 0o077:
            raise SecretError(f"secret file {path} has mode {stat.S_IMODE(st.st_mode):04o}: others may read "
                              f"it; `chmod 600 {path}` (or remove it and a new key is generated)")
        if st.st_uid != os.getuid():
            raise SecretError(f"secret file {path} belongs to uid {st.st_uid}, not to this user "
                              f"({os.getuid()}): remove it and a new one is generated")
        value = f.read().strip()
    if not KEY.match(value):
        raise SecretError(f"secret file {path} does not hold a usable key (16 to 512 characters of "
                          "A-Z a-z 0-9 _ . ~ -): remove it and a new one is generated")
    return value
