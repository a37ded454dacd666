"""Exception tree for qwen-serve and its OpenAI error shape.

Stages raise these; exactly one place (``gateway.app``'s exception handler, or an SSE error frame
once a stream has started) turns them into a response. Each leaf carries its HTTP status, the OpenAI
``type`` and ``code``, and the ``param`` it is about::

    QwenServeError
    ├── ConfigError                      (not HTTP: CLI exits 2 with one line)
    │   └── PlanError
    ├── ClientError (4xx)
    │   ├── InvalidRequest               400 invalid_request_error
    │   │   └── GuidedSchemaError        400 invalid_request_error (param names the schema part)
    │   ├── AuthError                    401 authentication_error / invalid_api_key
    │   ├── ModelNotAllowed              403 permission_error / model_not_allowed
    │   ├── NotFound                     404 invalid_request_error / model_not_found | not_found
    │   ├── RequestTooLarge              413 invalid_request_error / request_too_large
    │   └── RateLimited                  429 rate_limit_exceeded (+ Retry-After)
    └── ServerError (5xx)
        ├── UpstreamError                502 upstream_error
        │   └── UpstreamTimeout          504 upstream_timeout
        └── EngineUnavailable            503 service_unavailable (+ Retry-After)
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

__all__ = [
    "AuthError",
    "ClientError",
    "ConfigError",
    "EngineUnavailable",
    "GuidedSchemaError",
    "InvalidRequest",
    "ModelNotAllowed",
    "NotFound",
    "PlanError",
    "QwenServeError",
    "RateLimited",
    "RequestTooLarge",
    "ServerError",
    "UpstreamError",
    "UpstreamTimeout",
    "error_body",
]


def error_body(message: str, type_: str, code: str | int | None = None, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class QwenServeError(Exception):
    """Base of every error qwen-serve raises on purpose."""

    status: int = HTTPStatus.INTERNAL_SERVER_ERROR
    type: str = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    @property
    def headers(self) -> dict[str, str]:
        """Extra response headers (``Retry-After`` for 429/503)."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict()).encode()


class ConfigError(QwenServeError):
    """A config file or CLI request that cannot be honoured; the message names the key path."""

    type = "configuration_error"


class PlanError(ConfigError):
    """The launch plan is impossible (e.g. a TP that does not divide the heads)."""


class ClientError(QwenServeError):
    status = HTTPStatus.BAD_REQUEST
    type = "invalid_request_error"


class InvalidRequest(ClientError):
    status = HTTPStatus.BAD_REQUEST
    type = "invalid_request_error"


class GuidedSchemaError(InvalidRequest):
    code = "invalid_schema"


class AuthError(ClientError):
    status = HTTPStatus.UNAUTHORIZED
    type = "authentication_error"
    code = "invalid_api_key"

    def __init__(self, message: str, *, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason  # metric label: missing | invalid | expired | disabled


class ModelNotAllowed(ClientError):
    status = HTTPStatus.FORBIDDEN
    type = "permission_error"
    code = "model_not_allowed"


class NotFound(ClientError):
    status = HTTPStatus.NOT_FOUND
    type = "invalid_request_error"
    code = "not_found"


class RequestTooLarge(ClientError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    type = "invalid_request_error"
    code = "request_too_large"


class _RetryAfterMixin:
    retry_after: float

    @property
    def headers(self) -> dict[str, str]:
        return {"retry-after": str(max(1, int(-(-self.retry_after // 1))))}


class RateLimited(_RetryAfterMixin, ClientError):
    status = HTTPStatus.TOO_MANY_REQUESTS
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, limit: str, retry_after: float, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.limit = limit  # "rpm" | "tpm" | "concurrency"
        self.retry_after = retry_after


class ServerError(QwenServeError):
    status = HTTPStatus.INTERNAL_SERVER_ERROR
    type = "server_error"


class UpstreamError(ServerError):
    status = HTTPStatus.BAD_GATEWAY
    type = "upstream_error"
    code = "upstream_error"

    def __init__(self, message: str, *, kind: str = "connect") -> None:
        super().__init__(message)
        self.kind = kind  # metric label: connect | timeout | protocol | status


class UpstreamTimeout(UpstreamError):
    status = HTTPStatus.GATEWAY_TIMEOUT
    type = "upstream_timeout"
    code = "upstream_timeout"

    def __init__(self, message: str, *, kind: str = "timeout") -> None:
        super().__init__(message, kind=kind)


class EngineUnavailable(_RetryAfterMixin, ServerError):
    status = HTTPStatus.SERVICE_UNAVAILABLE
    type = "service_unavailable"
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
