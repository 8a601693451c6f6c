"""The OpenAI chat API's shapes: the request models and their 400s, the usage object, and the
server-sent-event chunks of a streamed reply."""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks.serve.gateway.errors import ApiError


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(p["text"])
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

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _none_is_default(cls, v, info):
        return {"temperature": 1.0, "top_p": 1.0}[info.field_name] if v is None else v


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
