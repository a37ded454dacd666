"""Exception tree for qwen-serve and its OpenAI error shape.

Stages raise these; exactly one place (``gateway.app``'s exception handler, or an SSE error frame
once a stream has started) turns them into a response. Each leaf carries its HTTP status, the OpenAI
``type`` and ``code``, and the ``param`` it is about::

    QwenServeError
    ├── ConfigError                      (not HTTP: CLI exits 2 with one line)
    │   └── PlanError
    ├── ClientError (4xx)
    │   ├── InvalidRequest               400 invalid_request_error (code invalid_type: a field of the wrong type)
    │   │   └── GuidedSchemaError        400 invalid_request_error (param names the schema part)
    │   ├── AuthError                    401 authentication_error / invalid_api_key
    │   ├── ModelNotAllowed              403 permission_error / model_not_allowed
    │   ├── NotFound                     404 invalid_request_error / model_not_found | not_found
    │   ├── RequestTooLarge              413 invalid_request_error / request_too_large
    │   │   └── TooLargeForLimit         413 invalid_request_error / request_too_large_for_limit
    │   │                                    (+ x-should-retry: false)
    │   └── RateLimited                  429 rate_limit_exceeded (+ Retry-After; + x-should-retry: false
    │                                        when no wait can help)
    ├── ClientClosedRequest              499 client_closed_request (recorded only: the client has gone)
    └── ServerError (5xx)
        ├── UpstreamError                502 upstream_error
        │   └── UpstreamTimeout          504 upstream_timeout
        │       └── DeadlineExceeded     504 upstream_timeout / deadline_exceeded
        ├── EngineUnavailable            503 service_unavailable (+ Retry-After)
        └── LimiterUnavailable           503 service_unavailable (+ Retry-After; the shared limits store
                                             is unreachable and limits.on_backend_error is fail_closed)

``x-should-retry: false`` tells OpenAI SDKs (which otherwise retry every 429 for up to two minutes) that
retrying the same request cannot succeed.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

SHOULD_RETRY_HEADER = "x-should-retry"

__all__ = [
    "AuthError",
    "ClientClosedRequest",
    "ClientError",
    "ConfigError",
    "DeadlineExceeded",
    "EngineUnavailable",
    "GuidedSchemaError",
    "InvalidRequest",
    "LimiterUnavailable",
    "ModelNotAllowed",
    "NotFound",
    "PlanError",
    "QwenServeError",
    "RateLimited",
    "RequestTooLarge",
    "SHOULD_RETRY_HEADER",
    "ServerError",
    "TooLargeForLimit",
    "UpstreamError",
    "UpstreamTimeout",
    "error_body",
    "invalid_type",
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


def invalid_type(param: str, expected: str, value: object) -> InvalidRequest:
    """400 for a JSON value of the wrong type, worded as OpenAI does: ``Invalid type for 'stream': expected a
    boolean, but got a string instead.`` (``code`` ``invalid_type``, ``param`` the field's dotted path)."""
    return InvalidRequest(f"Invalid type for '{param}': expected {expected}, but got {_json_type(value)} instead.",
                          param=param, code="invalid_type")


def _json_type(value: object) -> str:
    """The JSON type of a parsed value, with its article."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


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


class TooLargeForLimit(RequestTooLarge):
    """A request that its key's limits can never admit (its token estimate alone exceeds the key's tpm):
    not retryable, so 413 and ``x-should-retry: false`` rather than a 429 that clients would retry.
    ``limit`` is the ``qwen_serve_rate_limited_total`` label."""

    code = "request_too_large_for_limit"

    def __init__(self, message: str, *, limit: str = "tpm") -> None:
        super().__init__(message)
        self.limit = limit

    @property
    def headers(self) -> dict[str, str]:
        return {SHOULD_RETRY_HEADER: "false"}


class _RetryAfterMixin:
    retry_after: float

    @property
    def headers(self) -> dict[str, str]:
        return {"retry-after": str(max(1, int(-(-self.retry_after // 1))))}


class RateLimited(_RetryAfterMixin, ClientError):
    """429 with ``Retry-After``; ``retryable=False`` (no wait can admit the request, e.g. a limit of 0) adds
    ``x-should-retry: false``."""

    status = HTTPStatus.TOO_MANY_REQUESTS
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, limit: str, retry_after: float, param: str | None = None,
                 retryable: bool = True) -> None:
        super().__init__(message, param=param)
        self.limit = limit  # "rpm" | "tpm" | "concurrency"
        self.retry_after = retry_after
        self.retryable = retryable

    @property
    def headers(self) -> dict[str, str]:
        headers = super().headers
        if not self.retryable:
            headers[SHOULD_RETRY_HEADER] = "false"
        return headers


class ClientClosedRequest(QwenServeError):
    """The client went away before its request was complete (e.g. during the body upload); recorded as
    499, logged at debug level, never sent (there is nobody to send it to)."""

    status = 499
    type = "client_closed_request"
    code = "client_closed_request"


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


class DeadlineExceeded(UpstreamTimeout):
    """``gateway.request_deadline_s`` passed: 504 before the response started, else the stream's error event."""

    code = "deadline_exceeded"


class EngineUnavailable(_RetryAfterMixin, ServerError):
    status = HTTPStatus.SERVICE_UNAVAILABLE
    type = "service_unavailable"
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LimiterUnavailable(_RetryAfterMixin, ServerError):
    """The shared store of the per-key limits cannot be reached and ``limits.on_backend_error`` is
    ``fail_closed``: the request is refused rather than admitted unmetered."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    type = "service_unavailable"
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
