"""Secrets generated once per install: a random key in a file of its own (mode 0600), never committed.

    key = install_secret(var / "secrets" / "triton_admin_key", env="LLMOPS_TRITON_ADMIN_KEY")

The environment variable, when set, wins (a deployment hands the same key to every container); else
the file is read, or created on first use: written under a temporary name with mode 0600 and linked
into place, so two processes starting at once end up with the same key and nobody reads a half-written
file. A file that others could read (group or other permission bits, a symlink, not a regular file)
is refused, naming it: the key would no longer be the owner's alone.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path

from tasks.errors import ConfigError

# what fits in a header value and in tritonserver's `<apis>:<key>=<value>` flags unquoted
KEY = re.compile(r"^[A-Za-z0-9_.~-]{16,512}$")


class SecretError(ConfigError):
    """A secret file with loose permissions, or a secret from the environment that is not usable."""


def install_secret(path: Path, env: str | None = None) -> str:
    """The secret in $`env` if set, else the one in `path` (created with mode 0600 on first use)."""
    if env and os.environ.get(env):
        value = os.environ[env].strip()
        if not KEY.match(value):
            raise SecretError(f"${env} must be 16 to 512 characters of A-Z a-z 0-9 _ . ~ - "
                              "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
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
