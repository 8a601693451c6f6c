"""The gateway's errors: the OpenAI-style error answer, and what the Triton client side raises."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse

if TYPE_CHECKING:
    from tasks.serve.admission import Overloaded
    from tasks.serve.gateway.metrics import Metrics


class ApiError(Exception):
    """An answer other than 2xx, with OpenAI's error body ({"error": {message, type, param, code}})."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self, extra_headers: dict[str, str], retry_after_s: int = 1) -> JSONResponse:
        """The JSON answer; a 429 or 503 always says when to retry (`Retry-After`)."""
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {**extra_headers, **self.headers}
        if self.status in (429, 503):
            headers.setdefault("Retry-After", str(retry_after_s))
        return JSONResponse(body, status_code=self.status, headers=headers)


class TritonUnavailable(Exception):
    """Triton cannot be reached or does not have the model: a 503 until it is back, never a retry."""


class LeaderGone(Exception):
    """The request whose inference others were waiting for was cancelled before it finished."""


def overloaded_error(e: Overloaded, metrics: Metrics, retry_after_s: int) -> ApiError:
    """The 429 for a request admission has no room for (counted as a rejection)."""
    metrics.rejected.labels("overloaded").inc()
    return ApiError(429, f"the server is at capacity ({e}); retry after {retry_after_s}s",
                    type_="rate_limit_error", code="overloaded", headers={"Retry-After": str(retry_after_s)})
