"""Errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` and their HTTP status.

Validation (``cluster.validation.RequestError``) and the request path (``cluster.servicer.status_for``)
speak gRPC status codes; ``GRPC_TO_HTTP`` is the one table that turns them into HTTP statuses. Load
shedding (429 / 503) carries ``Retry-After``. Bad input is never a 500.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

RETRY_AFTER_S = 1

# gRPC status -> (HTTP status, OpenAI error type)
GRPC_TO_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error"),  # OpenAI's type for a bad key
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
}
_SHED_LOAD = (429, 503)

# The gRPC field names validation reports -> the HTTP body's names (for "param" and the message).
_PROMPT_FIELDS = ("text", "token_ids")


@dataclass(eq=False)
class ApiError(Exception):
    """A refusal or failure as the HTTP API reports it."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    retry_after_s: int | None = None  # Retry-After when known (tenant rate limits); else RETRY_AFTER_S

    def body(self) -> dict[str, Any]:
        """The JSON body: OpenAI's error object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        """``Retry-After`` when the cluster sheds load."""
        if self.retry_after_s is not None:
            return {"Retry-After": str(self.retry_after_s)}
        return {"Retry-After": str(RETRY_AFTER_S)} if self.status in _SHED_LOAD else {}


def bad_request(param: str | None, message: str, code: str | None = None) -> ApiError:
    """400 for a bad field; ``message`` starts with the field name as every refusal does."""
    return ApiError(400, message, "invalid_request_error", param, code)


def from_grpc(code: grpc.StatusCode, message: str, prompt_field: str = "prompt") -> ApiError:
    """An ``ApiError`` for a gRPC status and a ``"field: reason"`` message (validation's or the path's).

    The gRPC prompt fields (``text``, ``token_ids``) are renamed ``prompt_field`` (``prompt`` or
    ``messages``) in ``param`` and in the message, so the error names the field the client sent."""
    status, error_type = GRPC_TO_HTTP.get(code, (500, "internal_error"))
    param = None
    if status == 400:
        field, sep, rest = message.partition(":")
        base = field.split("[", 1)[0].split(".", 1)[0]
        if sep and base and " " not in base:
            if base in _PROMPT_FIELDS:
                field, base = prompt_field + field[len(base) :], prompt_field
                message = field + sep + rest
            param = "user" if base == "tenant_id" else base
    return ApiError(status, message, error_type, param, code.name.lower())
