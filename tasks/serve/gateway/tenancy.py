"""Tenancy: which principal a request acts for, the names its data is kept under, and its rate limit.

    export LLMOPS_GATEWAY_API_KEYS=support=$KEY1,analytics=$KEY2   # principal=key, comma-separated
    llmops serve --set serve.gateway.api_keys_env=LLMOPS_GATEWAY_API_KEYS

Each API key belongs to a principal (a bare key is its own principal, named `key-` and the first 12
hex digits of its SHA-256). Session and user ids are the caller's names, not global ones: the
gateway keeps every session, user, memory and queued exchange under `<principal>/<id>`, so two
principals that both say `X-Session-Id: s1` have two sessions, and no key can read, recall or
delete what another key's requests stored. Without keys every request is the one principal
`local`, which is only allowed while the gateway listens on a loopback address.

Logs never hold these names: the request and shadow logs keep `Pseudonyms` of them, an HMAC-SHA256
under a per-install key (var/secrets/log_pseudonym_key, or $LLMOPS_LOG_PSEUDONYM_KEY where several
gateways must agree), so lines of one session still group together, nobody can read an e-mail
address used as a session id back out of them, and `DELETE` finds the lines to remove.

Each principal has its own token bucket (`serve.gateway.rate_limit_rps`, `rate_limit_burst`):
a request beyond it gets 429 with the seconds until the next token in `Retry-After`. The buckets
live in the gateway process: with N gateway replicas a principal gets up to N times the rate.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import re
import time
from dataclasses import dataclass

from tasks.config import Settings
from tasks.credentials import secret_env
from tasks.errors import ConfigError

PRINCIPAL_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MIN_KEY_CHARS = 16


@dataclass(frozen=True)
class Principal:
    """Who a request acts for. `scoped` names an id of the caller's inside this principal's space
    (the separator `/` cannot occur in a session or user id, so no two principals' names meet)."""

    id: str

    def scoped(self, name: str | None) -> str | None:
        return None if name is None else f"{self.id}/{name}"


LOCAL = Principal("local")  # every request when no keys are configured


class Pseudonyms:
    """Keyed pseudonyms of scoped session and user ids: the same name gives the same pseudonym under
    one key; without the key neither the name nor a guess of it can be checked."""

    def __init__(self, key: str):
        self._key = key.encode()

    @classmethod
    def of_install(cls, settings: Settings) -> Pseudonyms:
        from tasks.credentials import install_secret

        return cls(install_secret(settings.paths.var_dir / "secrets" / "log_pseudonym_key",
                                  env="LLMOPS_LOG_PSEUDONYM_KEY"))

    def __call__(self, name: str | None) -> str | None:
        if name is None:
            return None
        return "ps-" + hmac.new(self._key, name.encode(), hashlib.sha256).hexdigest()[:24]


def parse_keys(value: str, source: str) -> dict[str, Principal]:
    """`principal=key` or bare `key` entries, comma-separated -> {key: principal}. `source` names where
    the value came from, for the error."""
    keys: dict[str, Principal] = {}
    for n, entry in enumerate((e.strip() for e in value.split(",")), 1):
        if not entry:
            continue
        pid, sep, key = entry.partition("=")
        if not sep:
            pid, key = f"key-{hashlib.sha256(entry.encode()).hexdigest()[:12]}", entry
        pid, key = pid.strip(), key.strip()
        if not PRINCIPAL_ID.fullmatch(pid):
            raise ConfigError(f"{source}: entry {n}: principal {pid[:70]!r} must be 1-64 of "
                              "A-Z a-z 0-9 _ . -")
        if len(key) < MIN_KEY_CHARS:
            raise ConfigError(f"{source}: entry {n} ({pid}): a key needs {MIN_KEY_CHARS} characters "
                              "or more")
        if key in keys and keys[key].id != pid:
            raise ConfigError(f"{source}: entry {n}: one key given to two principals "
                              f"({keys[key].id}, {pid})")
        keys[key] = Principal(pid)
    return keys


def api_keys(settings: Settings) -> dict[str, Principal]:
    """The keys the gateway accepts and their principals, from the environment variable
    `serve.gateway.api_keys_env` names, or the file its `<NAME>_FILE` variable names (docker-compose.yml
    mounts it; one entry a line or comma-separated); empty when none is named."""
    var = settings.serve.gateway.api_keys_env
    if not var:
        return {}
    raw = secret_env(var, "serve.gateway.api_keys_env") or ""
    keys = parse_keys(raw.replace("\n", ","), f"${var} (serve.gateway.api_keys_env)")
    if not keys:
        raise ConfigError(f"serve.gateway.api_keys_env={var}: set ${var} (or ${var}_FILE, a file) to one or "
                          f"more comma-separated `principal=key` entries (keys of {MIN_KEY_CHARS} characters "
                          "or more)")
    return keys


def auth_headers(settings: Settings) -> dict[str, str]:
    """What the project's own clients of this gateway send: the first configured key, if keys are on."""
    keys = api_keys(settings)
    return {"Authorization": f"Bearer {next(iter(keys))}"} if keys else {}


def authenticate(keys: dict[str, Principal], authorization: str) -> Principal | None:
    """The principal of an `Authorization: Bearer <key>` header; None for a missing or unknown key.
    Every key is compared in constant time, whether or not an earlier one matched."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    given = token.strip().encode()
    found = None
    for key, principal in keys.items():
        if hmac.compare_digest(given, key.encode()):
            found = principal
    return found


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings, keys: dict[str, Principal]) -> None:
    """A gateway that listens beyond loopback must ask for keys: refuse to start otherwise."""
    host = settings.stack.host
    if not keys and not is_loopback(host):
        raise ConfigError(f"the gateway would listen on stack.host={host} without API keys: anyone who "
                          "reaches it could read and delete every session. Set serve.gateway.api_keys_env "
                          "to an environment variable holding `principal=key` entries, or listen on "
                          "127.0.0.1")


class RateLimiter:
    """A token bucket per principal: `rate` requests per second on average, bursts of `burst`."""

    def __init__(self, rate: float, burst: int, max_principals: int = 100_000):
        self.rate, self.burst, self.max_principals = rate, burst, max_principals
        self._buckets: dict[str, tuple[float, float]] = {}  # principal -> (tokens, at)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, principal: str, now: float | None = None) -> float:
        """0.0 when the request may go (a token is taken), else the seconds until a token is there."""
        if not self.enabled:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.get(principal, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            if principal not in self._buckets and len(self._buckets) >= self.max_principals:
                self._prune(now)
            self._buckets[principal] = (tokens - 1.0, now)
            return 0.0
        self._buckets[principal] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        """Forget full buckets (a principal idle long enough to refill is the same as a new one)."""
        full = [p for p, (t, at) in self._buckets.items() if t + (now - at) * self.rate >= self.burst]
        for p in full:
            del self._buckets[p]


def retry_after(wait_s: float) -> str:
    """Retry-After in whole seconds, never 0."""
    return str(max(1, math.ceil(wait_s)))
