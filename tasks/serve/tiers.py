"""The gateway's small/large tier policy: which model a chat request goes to, and why.

    d = decide(settings.serve.routing, asked=None, header=None, max_tokens=16,
               prompt_tokens=lambda: 12, small_served=True)
    d.tier, d.reason, d.kind    # "small", "light(prompt=12<=48,max_tokens=16<=32)", "light"

The small tier is a second Triton model (`serve.routing.small_model`, e.g. a distilled student)
in the same repository, with its own aliases.json and traffic.json, so its champion/challenger
split, shadow and canary work as the main model's do (point `llmops rollout` at it with
`--set serve.triton.model_name=chat-gpt-small --set tracking.registered_model=chat-gpt-small`).

Precedence, first match wins:
  1. the model id names a tier: `chat-gpt-small[:alias|version]` or a `routing.aliases` id -> small;
     a pinned `chat-gpt:<alias|version>` -> large (a pinned version is never re-routed). A header
     that says the other tier contradicts it: 400.
  2. routing off (`routing.enabled: false`): large.
  3. header `X-Tier: large` -> large.
  4. the small tier not served (no version the small router can route to is loaded): large.
  5. header `X-Tier: small` -> small.
  6. the rule (header absent or `auto`): light, hence small, when prompt tokens <= max_prompt_tokens
     AND max_tokens <= routing.max_tokens. Both, not either: a short question that asks for a long
     answer is heavy work (decode time grows with max_tokens), and a long prompt is heavy to read
     and beyond what a small model handles well, whatever the answer's length.
A header or the rule only prefer the small tier; a model id is a name, so asking for the small
model while it is not served is a 404 (the gateway answers it), not a silent switch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tasks.config import ConfigError, RoutingConfig, Settings, load_settings
from tasks.errors import InputError

SMALL, LARGE = "small", "large"
HEADER_VALUES = (SMALL, LARGE, "auto")


class TierError(InputError):
    """A tier header the policy cannot follow; the gateway answers 400 naming the header."""


@dataclass(frozen=True)
class Decision:
    tier: str    # small | large
    reason: str  # header, model, light(...), heavy(...), small-tier-not-served, routing-disabled

    @property
    def kind(self) -> str:
        """The reason without its numbers: a label of bounded cardinality for the metrics."""
        return self.reason.split("(", 1)[0]


def tier_of_model(model_id: str, main: str, cfg: RoutingConfig) -> str | None:
    """The tier a model id names, or None for the bare main model id (the policy then decides)."""
    base, sep, _ = model_id.partition(":")
    if base == main:
        return LARGE if sep else None
    if cfg.enabled and (base == cfg.small_model or base in cfg.aliases):
        return SMALL
    return LARGE  # an unknown id: the main model's router answers it with a 404


def small_model_id(model_id: str, cfg: RoutingConfig) -> str:
    """A small-tier model id spelled with the small model's own name (a routing alias replaced)."""
    _, sep, which = model_id.partition(":")
    return cfg.small_model + sep + which


def decide(cfg: RoutingConfig, *, asked: str | None, header: str | None, max_tokens: int,
           prompt_tokens: Callable[[], int], small_served: bool) -> Decision:
    """The tier for one request (see the module doc for the order). `asked`: what tier_of_model said;
    `header`: the raw value of the `cfg.header` request header; `max_tokens`: what the request asks
    for (the gateway's default when it gives none); `prompt_tokens`: counted only when the rule
    needs it (it tokenizes with the small model's tokenizer)."""
    value = (header or "auto").strip().lower()
    if value not in HEADER_VALUES:
        raise TierError(f"{cfg.header} must be one of small, large, auto; got {header!r}")
    if asked is not None:
        if value != "auto" and value != asked:
            raise TierError(f"{cfg.header}: {value} contradicts the model asked for, which is served by the "
                            f"{asked} tier; drop the header or ask for the other model")
        return Decision(asked, "model")
    if not cfg.enabled:
        return Decision(LARGE, "routing-disabled")
    if value == LARGE:
        return Decision(LARGE, "header")
    if not small_served:
        return Decision(LARGE, "small-tier-not-served")
    if value == SMALL:
        return Decision(SMALL, "header")
    n = prompt_tokens()
    p_ok, m_ok = n <= cfg.max_prompt_tokens, max_tokens <= cfg.max_tokens
    if p_ok and m_ok:
        return Decision(SMALL, f"light(prompt={n}<={cfg.max_prompt_tokens},"
                               f"max_tokens={max_tokens}<={cfg.max_tokens})")
    over = ([] if p_ok else [f"prompt={n}>{cfg.max_prompt_tokens}"]) + \
        ([] if m_ok else [f"max_tokens={max_tokens}>{cfg.max_tokens}"])
    return Decision(LARGE, f"heavy({','.join(over)})")


def tier_settings(profile: str, tier: str = LARGE) -> Settings:
    """The profile's settings for one serving tier: the small tier's registered and Triton model is
    `serve.routing.small_model` (what chat_deploy's `tier: small` exports, shadows and canaries)."""
    settings = load_settings(profile)
    if tier == LARGE:
        return settings
    small = settings.serve.routing.small_model
    if settings.distill.registered_model != small:
        raise ConfigError(f"distill.registered_model={settings.distill.registered_model!r} differs from "
                          f"serve.routing.small_model={small!r}: the small tier is one model, set both alike")
    return load_settings(profile, [f"tracking.registered_model={small}", f"serve.triton.model_name={small}"])
