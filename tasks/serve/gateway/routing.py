"""Where a request goes: its tier (small or large, by the policy in tasks/serve/tiers.py) and, within
the tier, the Triton model version (aliases, the sticky champion/challenger split, the shadow share).
Also the session id a request is keyed by, which the split is sticky to."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from tasks.config import RoutingConfig
from tasks.serve.gateway.errors import ApiError
from tasks.serve.gateway.schema import ChatRequest
from tasks.serve.repository import read_aliases
from tasks.serve.sessions import SESSION_ID
from tasks.serve.tiers import LARGE, SMALL, Decision, TierError, decide, small_model_id, tier_of_model


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
            raise ApiError(404, f"The model '{model_id}' does not exist; GET /v1/models lists the served "
                           "ones", param="model", code="model_not_found")
        if which.isdigit():
            version, alias = int(which), None
        elif which:
            if which not in self.aliases:
                raise ApiError(404, f"The model '{model_id}' does not exist: no alias '{which}' is served",
                               param="model", code="model_not_found")
            version, alias = self.aliases[which], which
        else:
            alias = ("champion" if "champion" in self.aliases
                     else "challenger" if "challenger" in self.aliases else None)
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


def small_route(tiers: dict[str, Router], routing: RoutingConfig, key: str) -> Route | None:
    """Where the small tier would serve the default small model id for this session (its own
    champion/challenger split), or None when it cannot: not exported, not loaded, the version its
    aliases name not ready."""
    small = tiers.get(SMALL)
    if small is None or not small.ready:
        return None
    try:
        route = small.route(routing.small_model, key)
    except ApiError:
        return None
    return route


def choose_route(tiers: dict[str, Router], routing: RoutingConfig, req: ChatRequest, header: str | None,
                 default_max_tokens: int, key: str,
                 count_prompt: Callable[[Route], int]) -> tuple[Route, Decision]:
    """The tier policy (tasks/serve/tiers.py) applied to this request, and the route in that tier.
    `header` is the value of the routing.header the client sent; `count_prompt(route)` is the prompt's
    length in tokens of the model a route goes to."""
    large = tiers[LARGE]
    asked = tier_of_model(req.model, large.name, routing)
    small = small_route(tiers, routing, key) if asked is None else None

    def prompt_tokens() -> int:  # in the small model's own tokenizer: the light threshold is about it
        assert small is not None  # decide() counts only when the small tier is served
        return count_prompt(small)

    try:
        decision = decide(routing, asked=asked, header=header,
                          max_tokens=req.max_completion_tokens or req.max_tokens or default_max_tokens,
                          prompt_tokens=prompt_tokens, small_served=small is not None)
    except TierError as e:
        raise ApiError(400, str(e), param=routing.header, code="invalid_value") from None
    if decision.tier == LARGE:
        return large.route(req.model, key), decision
    if small is not None:
        return small, decision
    tier = tiers[SMALL]  # asked for by name
    if not tier.ready:  # a name that is not served: as for any unknown model, not a silent switch
        raise ApiError(404, f"The model '{req.model}' is not served: no version of the small tier "
                       f"({tier.name}) is loaded; GET /v1/models lists the served ones", param="model",
                       code="model_not_found")
    return tier.route(small_model_id(req.model, routing), key), decision


def session_of(req: ChatRequest, request: Request) -> str | None:
    """The session a request belongs to: the X-Session-Id header, else `session_id`, else `user`."""
    sid = request.headers.get("x-session-id") or req.session_id or req.user
    if sid is not None and not SESSION_ID.fullmatch(sid):
        raise ApiError(400, "session id (X-Session-Id, session_id or user) must be 1-128 of "
                       "A-Z a-z 0-9 _ . : @ -", param="session_id", code="invalid_value")
    return sid
