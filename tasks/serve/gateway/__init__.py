"""The OpenAI-compatible chat gateway in front of Triton (FastAPI + uvicorn).

By topic: app (create_app and the handlers; its docstring follows a request through them), schema
(the OpenAI request and chunk shapes), routing (tier and model version), engine (the Triton client
side: inference, coalescing, mirroring to a shadow), tenancy (API keys, principals, rate limits,
pseudonyms), errors, metrics (Prometheus and the request log). `python -m tasks.serve.gateway` runs
it in the foreground (__main__).
"""

from tasks.serve.gateway.app import create_app
from tasks.serve.gateway.engine import Gateway
from tasks.serve.gateway.errors import ApiError, TritonUnavailable
from tasks.serve.gateway.metrics import Metrics, RequestLog
from tasks.serve.gateway.routing import Route, Router
from tasks.serve.gateway.schema import ChatRequest, Message
from tasks.serve.gateway.tenancy import Principal, api_keys, auth_headers

__all__ = ["ApiError", "ChatRequest", "Gateway", "Message", "Metrics", "Principal", "RequestLog", "Route",
           "Router", "TritonUnavailable", "api_keys", "auth_headers", "create_app"]
