"""The one place the stages meet: request → auth → limits → guided → proxy → metrics.

Routes call :class:`Pipeline`; it authenticates, checks the model, takes a rate-limit lease, lets the
guided stage normalise the body, and returns a :class:`~qwen_serve.gateway.proxy.ProxyCall` whose
hooks (:class:`Exchange`) account the answer: tokens (from the engine's ``usage``), TTFT, guided
outcome, disconnects, and the lease's release with the real token count. Stages never import each
other; they are handed in as objects (:class:`Stages`). Every refusal raises a
:class:`~qwen_serve.errors.QwenServeError` that ``gateway.app`` turns into an OpenAI-shaped response.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from qwen_serve.config import GuidedConfig
from qwen_serve.constants import GUIDED_OUTPUT_HEADER, REQUEST_ID_HEADER
from qwen_serve.engine.state import EngineState
from qwen_serve.errors import (
    AuthError,
    EngineUnavailable,
    InvalidRequest,
    ModelNotAllowed,
    NotFound,
    QwenServeError,
    RateLimited,
    UpstreamError,
)
from qwen_serve.gateway import guided
from qwen_serve.gateway.auth import Authenticator, Principal
from qwen_serve.gateway.limits import Lease, Limiter, estimate_prompt_tokens
from qwen_serve.gateway.metrics import GatewayMetrics
from qwen_serve.gateway.proxy import ProxyCall
from qwen_serve.gateway.upstream import Upstream

__all__ = ["Exchange", "Pipeline", "Stages"]

_JSON = {"content-type": "application/json"}


@dataclass
class Stages:
    auth: Authenticator
    limiter: Limiter
    guided: GuidedConfig
    upstream: Upstream
    metrics: GatewayMetrics
    engine: EngineState
    served_models: tuple[str, ...]


class Exchange:
    """The :class:`~qwen_serve.gateway.proxy.ProxyHooks` of one generate request."""

    def __init__(self, m: GatewayMetrics, model: str, key_id: str, t0: float, lease: Lease,
                 estimate: int, check: guided.GuidedRequest | None, validate: bool,
                 client_wants_usage: bool) -> None:
        self._m = m
        self._model = model
        self._key_id = key_id
        self._t0 = t0
        self._lease = lease
        self._estimate = estimate
        self._guided = check if validate else None
        self._kind = check.kind if check is not None else None
        self._stream_check = self._guided.stream_checker() if self._guided is not None else None
        self.inspect_all = self._stream_check is not None
        self._client_wants_usage = client_wants_usage
        self._usage: Mapping[str, Any] | None = None
        self._outcome: str | None = None
        m.in_flight.labels(model).inc()

    def on_first_chunk(self) -> None:
        self._m.ttft.labels(self._model).observe(time.perf_counter() - self._t0)

    def on_event(self, event: Mapping[str, Any]) -> bool:
        if self._stream_check is not None:
            self._stream_check.feed(event)
        usage = event.get("usage")
        if usage:
            self._usage = usage
            if not self._client_wants_usage and not event.get("choices"):
                return False
        return True

    def on_response(self, status: int, body: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        if status != 200:
            return body, []
        try:
            obj = json.loads(body)
        except ValueError:
            return body, []
        if isinstance(obj, dict):
            self._usage = obj.get("usage") or None
            if self._guided is not None:
                self._outcome = self._guided.check_response(obj)
                return body, [(GUIDED_OUTPUT_HEADER.encode(), self._outcome.encode())]
        return body, []

    def on_finish(self, *, status: int, disconnected: bool, error: QwenServeError | None) -> None:
        m = self._m
        m.in_flight.labels(self._model).dec()
        if disconnected:
            m.client_disconnects.labels(self._model).inc()
        if isinstance(error, UpstreamError):
            m.upstream_errors.labels(error.kind).inc()
        elif status >= 500:
            m.upstream_errors.labels("status").inc()
        actual: int | None = None
        if self._usage:
            prompt = int(self._usage.get("prompt_tokens") or 0)
            completion = int(self._usage.get("completion_tokens") or 0)
            m.tokens.labels(self._model, self._key_id, "prompt").inc(prompt)
            m.tokens.labels(self._model, self._key_id, "completion").inc(completion)
            actual = prompt + completion
        self._lease.release(actual if actual is not None else (self._estimate if status == 200 else 0))
        if self._kind is not None:
            outcome = self._outcome
            if (self._stream_check is not None and self._outcome is None and status == 200
                    and not disconnected and error is None):  # streamed: on_response() never ran
                outcome = self._stream_check.outcome()
            elif disconnected:
                outcome = "aborted"
            elif status != 200 or error is not None:
                outcome = "rejected" if 400 <= status < 500 else "error"
            m.guided_requests.labels(self._model, self._kind, outcome or "unchecked").inc()


class _PassThrough:
    """Hooks for non-generating routes (tokenize, detokenize): no accounting beyond errors."""

    inspect_all = False

    def __init__(self, m: GatewayMetrics, lease: Lease | None = None) -> None:
        self._m = m
        self._lease = lease

    def on_first_chunk(self) -> None:
        pass

    def on_event(self, event: Mapping[str, Any]) -> bool:
        return True

    def on_response(self, status: int, body: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        return body, []

    def on_finish(self, *, status: int, disconnected: bool, error: QwenServeError | None) -> None:
        if isinstance(error, UpstreamError):
            self._m.upstream_errors.labels(error.kind).inc()
        if self._lease is not None:
            self._lease.release(0)


class Pipeline:
    def __init__(self, stages: Stages) -> None:
        self.s = stages
        self._default_model = stages.served_models[0]

    # ------------------------------------------------------------------ stages 1-3
    def authenticate(self, request: Request) -> Principal:
        try:
            principal = self.s.auth.authenticate(request.scope["headers"])
        except AuthError as exc:
            self.s.metrics.auth_failures.labels(exc.reason).inc()
            raise
        request.scope["state"]["key_id"] = principal.key_id
        return principal

    def _check_engine(self) -> None:
        engine = self.s.engine
        if engine.draining:
            raise EngineUnavailable("the gateway is draining for shutdown; retry on another replica", retry_after=1)
        if not engine.up:
            raise EngineUnavailable(f"the engine is not ready ({engine.describe()})", retry_after=5)

    def _check_model(self, request: Request, principal: Principal, body: Mapping[str, Any]) -> str:
        model = body.get("model", self._default_model)
        if model is None:
            model = self._default_model
        if not isinstance(model, str):
            raise InvalidRequest("'model' must be a string", param="model")
        if model not in self.s.served_models:
            raise NotFound(f"The model '{model}' does not exist", param="model", code="model_not_found")
        request.scope["state"]["model"] = model
        if not principal.allows(model):
            raise ModelNotAllowed(f"this API key may not use the model '{model}'", param="model")
        return model

    async def _acquire(self, principal: Principal, estimate: int) -> Lease:
        try:
            return await self.s.limiter.acquire(principal, estimate)
        except RateLimited as exc:
            self.s.metrics.rate_limited.labels(principal.key_id, exc.limit).inc()
            raise

    def _headers(self, request: Request) -> dict[str, str]:
        return {**_JSON, REQUEST_ID_HEADER: request.scope["state"]["request_id"]}

    # ------------------------------------------------------------------ routes
    async def generate(self, request: Request, route: str) -> ProxyCall:
        """``/v1/chat/completions`` and ``/v1/completions``."""
        principal = self.authenticate(request)
        self._check_engine()
        raw = await request.body()
        body = _parse_object(raw)
        model = self._check_model(request, principal, body)
        stream = body.get("stream") is True
        estimate = estimate_prompt_tokens(body)
        lease = await self._acquire(principal, estimate)
        try:
            check = guided.prepare(body, route=route, config=self.s.guided)
            modified = check is not None  # prepare() may have rewritten the guidance fields
            wants_usage = True
            if stream:
                opts = body.get("stream_options")
                if not (isinstance(opts, dict) and opts.get("include_usage") is True):
                    wants_usage = False
                    body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
                    modified = True
            payload = json.dumps(body).encode() if modified else raw
        except BaseException:
            lease.release(0)
            raise
        hooks = Exchange(self.s.metrics, model, principal.key_id, request.scope["state"]["t0"], lease,
                         estimate, check, self.s.guided.validate_output, wants_usage)
        return ProxyCall(self.s.upstream, "POST", route, payload, self._headers(request), stream=stream, hooks=hooks,
                         defer_headers=check is not None)

    async def passthrough(self, request: Request, route: str) -> ProxyCall:
        """``/tokenize`` and ``/detokenize``: authenticated, model-checked, not rate-limited by tokens."""
        principal = self.authenticate(request)
        self._check_engine()
        raw = await request.body()
        body = _parse_object(raw)
        self._check_model(request, principal, body)
        return ProxyCall(self.s.upstream, "POST", route, raw, self._headers(request), stream=False,
                         hooks=_PassThrough(self.s.metrics))

    async def models(self, request: Request) -> dict[str, Any]:
        """``/v1/models`` from the engine, filtered to what the key may use."""
        principal = self.authenticate(request)
        self._check_engine()
        resp = await self.s.upstream.request("GET", "/v1/models", None, self._headers(request))
        try:
            raw = await resp.read()
        finally:
            await resp.aclose()
        if resp.status != 200:
            self.s.metrics.upstream_errors.labels("status").inc()
            raise UpstreamError(f"engine answered HTTP {resp.status} for /v1/models", kind="status")
        listing = json.loads(raw)
        listing["data"] = [m for m in listing.get("data", []) if principal.allows(str(m.get("id")))]
        return dict(listing)


def _parse_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest(f"request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body
