"""The OpenAI chat API's shapes: the request models and their 400s, the usage object, and the
server-sent-event chunks of a streamed reply."""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks.serve.gateway.errors import ApiError


class ContentPart(BaseModel):
    """One part of a message's content in OpenAI's array form; only `{"type": "text", "text": ...}`
    parts are served (an image or audio part gets a 400 naming it)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.type != "text" or p.text is None:
                raise ValueError(f"only text content parts are supported, not {p.type[:40]!r}")
            parts.append(p.text)
        return "".join(parts)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=200)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = Field(None, ge=0, le=2**62)
    user: str | None = Field(None, max_length=128)
    session_id: str | None = Field(None, max_length=128)
    priority: Literal["interactive", "batch"] | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is not None and (len(v) > 300
                              or not all(k.isdigit() and -100 <= x <= 100 for k, x in v.items())):
            raise ValueError("logit_bias maps up to 300 token ids (as strings) to numbers in [-100, 100]")
        return v or None

    @field_validator("presence_penalty", "frequency_penalty", mode="before")
    @classmethod
    def _none_is_zero(cls, v):
        return 0.0 if v is None else v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 4 or any(not s or len(s) > 256 for s in stops)):
            raise ValueError("stop takes up to 4 non-empty strings of at most 256 characters")
        return stops or None

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _none_is_default(cls, v, info):
        return {"temperature": 1.0, "top_p": 1.0}[info.field_name] if v is None else v


# OpenAI chat parameters this server does not implement: a request that asks for one gets a 400 naming
# it, never a reply that silently ignored it. Each maps to the values that ask for nothing.
NOT_IMPLEMENTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []), "functions": (None, []),
    "tool_choice": (None, "none", "auto"), "function_call": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False), "response_format": (None, {"type": "text"}),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,),
}


def check_supported(payload: dict[str, Any]) -> None:
    """400 `unsupported_parameter` for the first OpenAI parameter asked for that is not implemented."""
    for name, neutral in NOT_IMPLEMENTED.items():
        if name in payload and payload[name] not in neutral:
            got = json.dumps(payload[name])[:100]
            raise ApiError(400, f"'{name}' is not supported by this server (got {got})", param=name,
                           code="unsupported_parameter")


def cut_at_stop(text: str, stops: list[str] | None) -> tuple[str, bool]:
    """(the text before the first stop string, whether one was found)."""
    hits = [i for s in stops or () if (i := text.find(s)) >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class StopScanner:
    """A streamed reply cut at the first stop string: `feed` returns what is safe to send now, holding
    back a tail that could still be the start of a stop string split across chunks."""

    def __init__(self, stops: list[str] | None):
        self.stops = stops or []
        self.buf = ""
        self.hit = False

    def feed(self, piece: str) -> str:
        if self.hit or not self.stops:
            return "" if self.hit else piece
        self.buf += piece
        out, self.hit = cut_at_stop(self.buf, self.stops)
        if self.hit:
            self.buf = ""
            return out
        hold = next((k for k in range(min(max(map(len, self.stops)) - 1, len(self.buf)), 0, -1)
                     if any(s.startswith(self.buf[-k:]) for s in self.stops)), 0)
        out, self.buf = self.buf[:len(self.buf) - hold], self.buf[len(self.buf) - hold:]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.hit else self.buf), ""
        return out


def validation_error(e: ValidationError) -> ApiError:
    """The 400 naming the first parameter that failed validation."""
    err = e.errors()[0]
    param = ".".join(str(p) for p in err["loc"])
    return ApiError(400, f"invalid value for '{param}': {err['msg']}", param=param, code="invalid_value")


def openai_usage(out: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's usage object, with prompt_tokens_details.cached_tokens as OpenAI reports prompt caching."""
    return {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
            "total_tokens": out["prompt_tokens"] + out["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": out.get("cached_tokens", 0)}}


def chunk(rid: str, model: str, fingerprint: str, delta: dict, finish: str | None,
          usage: dict | None = None) -> dict:
    """One chat.completion.chunk; `model` is the id the client asked for, `fingerprint` the served version."""
    c = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
         "system_fingerprint": fingerprint,
         "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    if usage is not None:
        c["usage"] = usage
    return c


def sse(obj: dict) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
