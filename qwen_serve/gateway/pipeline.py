"""The one place the stages meet: request → auth → limits → guided → proxy → metrics.

Routes call :class:`Pipeline`; it authenticates, checks the model and the JSON types of the fields it acts
on, takes a rate-limit lease, lets the guided stage normalise the body, and returns a
:class:`~qwen_serve.gateway.proxy.ProxyCall` whose hooks (:class:`Exchange`) account the answer: tokens,
TTFT, guided outcome, disconnects, and the lease's release with the real token count. Stages never import
each other; they are handed in as objects (:class:`Stages`). Every refusal raises a
:class:`~qwen_serve.errors.QwenServeError` that ``gateway.app`` turns into an OpenAI-shaped response.

Token accounting of a generate request (the lease's release and ``qwen_serve_tokens_total``):

* the engine's ``usage`` when it arrived (a stream always asks the engine for it; the gateway's injected
  usage chunk is dropped unless the client asked for it);
* else, when the answer was cut short after generated tokens were sent (client disconnect, engine failure,
  ``gateway.request_deadline_s``): the prompt estimate plus one completion token per generated-token event
  sent (:func:`count_token_events`);
* else the prompt estimate when the engine answered 200, and nothing when it refused.

``/tokenize``, ``/detokenize`` and ``/v1/models`` take a lease too: they count toward the key's rpm and
concurrency, never its tpm.

``/v1/responses`` (the Responses API, :mod:`qwen_serve.gateway.responses` for its protocol) goes through the
same stages with :class:`ResponsesExchange`: usage is the final ``response.completed`` event's (or the whole
body's) ``response.usage``, generated-token events are its ``*.delta`` events, TTFT is taken at the first of
them, the guided verdict rides on the final event, and a failure after the first byte is the Responses
API's ``error`` event. ``GET``/``DELETE /v1/responses/{id}`` (:meth:`Pipeline.stored_response`) exist only with
``gateway.responses_store``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request

from qwen_serve.config import GuidedConfig
from qwen_serve.constants import GUIDED_OUTPUT_HEADER, REQUEST_ID_HEADER, SSE_DATA_PREFIX
from qwen_serve.engine.state import EngineState
from qwen_serve.errors import (
    AuthError,
    ClientClosedRequest,
    EngineUnavailable,
    InvalidRequest,
    NotFound,
    QwenServeError,
    RateLimited,
    TooLargeForLimit,
    UpstreamError,
    invalid_type,
)
from qwen_serve.gateway import guided
from qwen_serve.gateway import responses as responses_api
from qwen_serve.gateway.auth import Authenticator, Principal
from qwen_serve.gateway.limits import KeyLimits, Lease, Limiter, estimate_prompt_tokens
from qwen_serve.gateway.metrics import GatewayMetrics
from qwen_serve.gateway.multimodal import ImageGuard, ImageRequest
from qwen_serve.gateway.proxy import ProxyCall, deadline_scope, normalise_error
from qwen_serve.upstream import Upstream

__all__ = ["GUIDED_OUTPUT_FIELD", "Exchange", "Pipeline", "ResponsesExchange", "Stages", "count_token_events",
           "stream_mode", "with_guided_output"]

_JSON = {"content-type": "application/json"}
# Makes the engine's body from (the guided check, whether images were inlined): see Pipeline._prepare.
_Encode = Callable[["guided.GuidedRequest | None", bool], bytes]
_RESPONSE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # vLLM's resp_<hex>; nothing that could leave the route


@dataclass
class Stages:
    auth: Authenticator
    limiter: Limiter
    guided: GuidedConfig
    upstream: Upstream
    metrics: GatewayMetrics
    engine: EngineState
    served_models: tuple[str, ...]
    request_deadline_s: float | None = None  # gateway.request_deadline_s
    responses_store: bool = False  # gateway.responses_store
    images: ImageGuard | None = None  # image parts: checked, remote ones fetched and inlined (None: not checked)


# --------------------------------------------------------------------------------------- request fields
_INTEGER_FIELDS = ("n", "max_tokens", "max_completion_tokens")


def stream_mode(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """``(stream, include_usage)`` of a generate request body, after checking the JSON type of every field
    the gateway branches on: ``stream`` and ``stream_options.include_usage`` booleans, ``stream_options``
    an object, ``n``/``max_tokens``/``max_completion_tokens`` integers; ``null`` means the default, as in
    the OpenAI API. Raises :class:`InvalidRequest` (400, code ``invalid_type``, ``param`` the field's path)
    for anything else: the engine would coerce ``"true"`` or ``1`` and stream an answer the gateway then
    handles as a whole one. Ranges are left to the engine, which answers them with a 400 of its own."""
    stream = _optional_bool(body, "stream", "stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise invalid_type("stream_options", "an object", options)
        include_usage = _optional_bool(options, "include_usage", "stream_options.include_usage")
    for name in _INTEGER_FIELDS:
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise invalid_type(name, "an integer", value)
    return stream, include_usage


def _optional_bool(obj: Mapping[str, Any], key: str, param: str) -> bool:
    value = obj.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid_type(param, "a boolean", value)
    return value


# --------------------------------------------------------------------------------------- tokens sent
_CHOICE_EVENT = b'"choices":[{'  # an event with a choice (the usage chunk has "choices":[])
_ROLE_DELTA = b'"delta":{"role":'  # chat's opening event per choice: the role, no token


def count_token_events(data: bytes) -> int:
    """Generated-token events in SSE bytes relayed from vLLM: events with a choice, less chat's opening
    role events. Byte patterns with bare quotes only match JSON structure (quotes inside strings are
    escaped), so model text cannot fake them. vLLM sends one event per decoding step per choice, one
    token each; when it merges steps (a busy server, ``stream_interval``) or decodes speculatively an
    event carries more, so this is a lower bound of the tokens sent."""
    return data.count(_CHOICE_EVENT) - data.count(_ROLE_DELTA)


class _RequestLimits:
    """A key's rpm and concurrency limits without its tpm: for routes that generate no tokens."""

    tpm = None

    def __init__(self, principal: KeyLimits) -> None:
        self.key_id = principal.key_id
        self.rpm = principal.rpm
        self.max_concurrent = principal.max_concurrent


GUIDED_OUTPUT_FIELD = "guided_output"  # the streamed verdict: a top-level field of the stream's last chunk


def with_guided_output(event: Mapping[str, Any], outcome: str) -> bytes:
    """The ``data:`` line of ``event`` with ``"guided_output": outcome`` added as its last top-level field."""
    obj = {**event, GUIDED_OUTPUT_FIELD: outcome}
    return SSE_DATA_PREFIX + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


class Exchange:
    """The :class:`~qwen_serve.gateway.proxy.ProxyHooks` of one generate request.

    Guided verdict (when ``validate``, i.e. ``guided.validate_output``): a whole answer gets the
    ``X-Guided-Output`` header; a stream gets a top-level ``"guided_output"`` field (one of
    :data:`guided.VERDICTS` but ``incomplete``) added to the chunk that carries the ``finish_reason`` of the
    last of its ``choices`` (the request's ``n``) to finish. A stream that ends before that (disconnect,
    engine failure, deadline) carries no verdict."""

    def __init__(self, m: GatewayMetrics, model: str, key_id: str, t0: float, lease: Lease,
                 estimate: int, check: guided.GuidedRequest | None, validate: bool,
                 client_wants_usage: bool, choices: int = 1) -> None:
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
        self._usage: tuple[int, int] | None = None  # (prompt, completion) as the engine reported them
        self._outcome: str | None = None
        self._sent_tokens = 0  # generated-token events sent to the client (see count_token_events)
        self._choices = choices  # the request's n: a stream's verdict goes out when this many have finished
        self._stream_outcome: str | None = None  # the verdict the stream carried
        m.in_flight.labels(model).inc()

    def on_first_chunk(self) -> None:
        self._m.ttft.labels(self._model).observe(time.perf_counter() - self._t0)

    async def on_event(self, event: Mapping[str, Any]) -> bool | bytes:
        verdict = None
        check = self._stream_check
        if check is not None:
            check.feed(event)
            if self._stream_outcome is None and event.get("choices") and check.finished(self._choices):
                self._stream_outcome = verdict = await check.outcome_async()  # schema/regex work: off the loop
        usage = event.get("usage")
        if usage:
            self._usage = _chat_usage(usage)
            if not self._client_wants_usage and not event.get("choices"):
                return False
        if verdict is not None:
            return with_guided_output(event, verdict)
        return True

    def on_sent(self, data: bytes) -> None:
        self._sent_tokens += count_token_events(data)

    async def on_response(self, status: int, body: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        if status != 200:
            return body, []
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply to parse; passed on as is
            return body, []
        if isinstance(obj, dict):
            self._usage = self._read_usage(obj)
            if self._guided is not None:
                self._outcome = await self._guided.check_response_async(obj)  # schema/regex work: off the loop
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
        counted = self._tokens()
        if counted is not None:
            prompt, completion = counted
            m.tokens.labels(self._model, self._key_id, "prompt").inc(prompt)
            m.tokens.labels(self._model, self._key_id, "completion").inc(completion)
            self._lease.release(prompt + completion)
        else:
            self._lease.release(self._estimate if status == 200 else 0)
        if self._kind is not None:
            outcome = self._outcome
            streamed = None
            if self._outcome is None and status == 200 and not disconnected and error is None:
                streamed = self._streamed_outcome()  # streamed: on_response() never ran
            if streamed is not None:
                outcome = streamed
            elif disconnected:
                outcome = guided.ABORTED
            elif status != 200 or error is not None:
                outcome = guided.REJECTED if 400 <= status < 500 else guided.ERROR
            m.guided_requests.labels(self._model, self._kind, outcome or guided.UNCHECKED).inc()

    def _read_usage(self, body: Mapping[str, Any]) -> tuple[int, int] | None:
        """``(prompt, completion)`` of a whole answer's usage."""
        return _chat_usage(body.get("usage"))

    def _streamed_outcome(self) -> str | None:
        """The guided outcome of a stream that ended normally; None when nothing was checked."""
        if self._stream_check is None:
            return None
        return self._stream_outcome or self._stream_check.outcome()

    def _tokens(self) -> tuple[int, int] | None:
        """``(prompt, completion)`` to charge: the engine's usage, else (the answer was cut short) the prompt
        estimate and the generated tokens sent; None when neither is known."""
        if self._usage is not None:
            return self._usage
        if self._sent_tokens > 0:
            return self._estimate, self._sent_tokens
        return None


def _chat_usage(usage: object) -> tuple[int, int] | None:
    """``(prompt_tokens, completion_tokens)`` of a chat or completions ``usage`` object (missing counts: 0)."""
    if not isinstance(usage, Mapping) or not usage:
        return None
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


class ResponsesExchange(Exchange):
    """The :class:`~qwen_serve.gateway.proxy.ProxyHooks` of one ``/v1/responses`` request.

    Only the events carrying ``"usage"`` are parsed (the final ``response.completed`` among them): its
    ``response.usage`` is charged, and with a guided constraint its ``response`` is checked and the event
    relayed with a top-level ``"guided_output"`` field. A whole answer gets the ``X-Guided-Output`` header.
    TTFT is observed at the first generated-token (``*.delta``) event; :meth:`error_frame` is the stream's
    ``error`` event, numbered after the events already sent."""

    def __init__(self, m: GatewayMetrics, model: str, key_id: str, t0: float, lease: Lease,
                 estimate: int, check: guided.GuidedRequest | None, validate: bool, stream: bool) -> None:
        super().__init__(m, model, key_id, t0, lease, estimate, check, validate, client_wants_usage=True)
        self._stream_check = None
        self.inspect_all = False
        self._stream = stream
        self._events_sent = 0
        self._first_token = False

    def on_first_chunk(self) -> None:
        pass  # response.created comes before any token: TTFT waits for the first delta (on_sent)

    async def on_event(self, event: Mapping[str, Any]) -> bool | bytes:
        if event.get("type") not in responses_api.FINAL_EVENTS:
            return True
        response = event.get("response")
        if not isinstance(response, Mapping):
            return True
        self._usage = responses_api.usage_tokens(response.get("usage"))
        if self._guided is None:
            return True
        self._stream_outcome = await self._guided.check_response_async(response)
        return responses_api.event_bytes({**event, GUIDED_OUTPUT_FIELD: self._stream_outcome})

    def on_sent(self, data: bytes) -> None:
        tokens = responses_api.count_token_events(data)
        if tokens and not self._first_token:
            self._first_token = True
            self._m.ttft.labels(self._model).observe(time.perf_counter() - self._t0)
        self._sent_tokens += tokens
        self._events_sent += data.count(b"\n\n")

    def error_frame(self, exc: QwenServeError) -> bytes:
        return responses_api.error_event(exc, self._events_sent)

    async def on_response(self, status: int, body: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        if status >= 400:
            return responses_api.rename_error_param(body), []
        return await super().on_response(status, body)

    def _read_usage(self, body: Mapping[str, Any]) -> tuple[int, int] | None:
        return responses_api.usage_tokens(body.get("usage"))

    def _streamed_outcome(self) -> str | None:
        if self._guided is None or not self._stream:
            return None
        return self._stream_outcome or guided.INCOMPLETE


class _PassThrough:
    """Hooks for non-generating routes (tokenize, detokenize): no accounting beyond errors."""

    inspect_all = False

    def __init__(self, m: GatewayMetrics, lease: Lease | None = None) -> None:
        self._m = m
        self._lease = lease

    def on_first_chunk(self) -> None:
        pass

    async def on_event(self, event: Mapping[str, Any]) -> bool:
        return True

    def on_sent(self, data: bytes) -> None:
        pass

    async def on_response(self, status: int, body: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
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
        principal.require(model)
        return model

    async def _acquire(self, principal: KeyLimits, estimate: int) -> Lease:
        try:
            return await self.s.limiter.acquire(principal, estimate)
        except (RateLimited, TooLargeForLimit) as exc:
            self.s.metrics.rate_limited.labels(principal.key_id, exc.limit).inc()
            raise

    def _headers(self, request: Request) -> dict[str, str]:
        return {**_JSON, REQUEST_ID_HEADER: request.scope["state"]["request_id"]}

    def _deadline(self, request: Request) -> float | None:
        """When the request must be over (``time.perf_counter``), counted from its arrival; None: never."""
        if self.s.request_deadline_s is None:
            return None
        return float(request.scope["state"]["t0"]) + self.s.request_deadline_s

    def _inspect_images(self, body: Mapping[str, Any], model: str) -> ImageRequest | None:
        """The image parts of ``body`` checked (:meth:`ImageGuard.inspect`); None without image checks."""
        return self.s.images.inspect(body, model=model) if self.s.images is not None else None

    async def _read(self, request: Request) -> tuple[Principal, bytes, dict[str, Any]]:
        """Stages 1-2 of every body-carrying route: the key, the engine's state, then the body as a JSON
        object ``(principal, raw bytes, parsed)``."""
        principal = self.authenticate(request)
        self._check_engine()
        raw = await _read_body(request)
        return principal, raw, _parse_object(raw)

    async def _admit(self, request: Request, principal: Principal, body: Mapping[str, Any],
                     prompt_estimate: int) -> tuple[str, ImageRequest | None, int, Lease]:
        """The model check, the image checks (a 400 before any I/O) and the key's lease for a generation:
        ``(model, images, token estimate, lease)``; the estimate is ``prompt_estimate`` plus the images'."""
        model = self._check_model(request, principal, body)
        images = self._inspect_images(body, model)
        estimate = prompt_estimate + (images.tokens if images is not None else 0)
        return model, images, estimate, await self._acquire(principal, estimate)

    async def _prepare(self, lease: Lease, body: dict[str, Any], route: str, images: ImageRequest | None,
                       encode: _Encode) -> tuple[guided.GuidedRequest | None, bytes]:
        """Under ``lease``: remote images inlined as ``data:`` URLs (SSRF-checked), guided decoding prepared
        (compiled off the loop; it may rewrite the guidance fields), then ``encode(check, images_inlined)``
        makes the engine's body. Any failure releases the lease unused; a body nested deeper than the
        gateway can walk is the client's 400."""
        try:
            inlined = await images.fetch() if images is not None else False
            check = await guided.prepare_async(body, route=route, config=self.s.guided)
            return check, encode(check, inlined)
        except RecursionError:
            lease.release(0)
            raise InvalidRequest("request body is nested too deeply") from None
        except BaseException:
            lease.release(0)
            raise

    # ------------------------------------------------------------------ routes
    async def generate(self, request: Request, route: str) -> ProxyCall:
        """``/v1/chat/completions`` and ``/v1/completions``."""
        principal, raw, body = await self._read(request)
        stream, client_usage = stream_mode(body)
        model, images, estimate, lease = await self._admit(request, principal, body, estimate_prompt_tokens(body))

        def encode(check: guided.GuidedRequest | None, inlined: bool) -> bytes:
            modified = check is not None or inlined
            if stream and not client_usage:  # ask the engine for usage; the client will not see it
                body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
                modified = True
            return json.dumps(body).encode() if modified else raw

        check, payload = await self._prepare(lease, body, route, images, encode)
        hooks = Exchange(self.s.metrics, model, principal.key_id, request.scope["state"]["t0"], lease,
                         estimate, check, self.s.guided.validate_output, client_usage or not stream,
                         body.get("n") or 1)
        return ProxyCall(self.s.upstream, "POST", route, payload, self._headers(request), stream=stream, hooks=hooks,
                         defer_headers=check is not None, deadline=self._deadline(request))

    async def responses(self, request: Request) -> ProxyCall:
        """``POST /v1/responses``: the stages of :meth:`generate` for the Responses API (its fields checked and
        ``store`` set by :func:`~qwen_serve.gateway.responses.check_request`, ``text.format`` by the guided
        stage), answered through :class:`ResponsesExchange`."""
        route = responses_api.RESPONSES_ROUTE
        principal, _, body = await self._read(request)
        stream = responses_api.check_request(body, store_enabled=self.s.responses_store)
        model, images, estimate, lease = await self._admit(request, principal, body,
                                                           responses_api.estimate_input_tokens(body))
        # Always re-serialised: check_request set "store".
        check, payload = await self._prepare(lease, body, route, images, lambda _c, _i: json.dumps(body).encode())
        hooks = ResponsesExchange(self.s.metrics, model, principal.key_id, request.scope["state"]["t0"], lease,
                                  estimate, check, self.s.guided.validate_output, stream)
        return ProxyCall(self.s.upstream, "POST", route, payload, self._headers(request), stream=stream, hooks=hooks,
                         defer_headers=check is not None, deadline=self._deadline(request),
                         error_frame=hooks.error_frame, ends_stream=responses_api.ends_stream)

    async def stored_response(self, request: Request, response_id: str) -> tuple[int, bytes]:
        """``GET``/``DELETE /v1/responses/{id}``: the engine's answer ``(status, JSON body)``, errors in the
        contract's shape. Only with ``gateway.responses_store`` (else 404 as an unknown route, before
        authentication); an id that is not vLLM's shape, or a stored response of a model the key may not use,
        is 404 like an unknown id. Counted toward the key's rpm and concurrency."""
        if not self.s.responses_store:
            raise NotFound("Unknown route (stored responses are off: gateway.responses_store: false)")
        principal = self.authenticate(request)
        if not _RESPONSE_ID.fullmatch(response_id):
            raise NotFound(f"Response with id '{response_id[:64]}' not found.", param="response_id")
        self._check_engine()
        lease = await self._acquire(_RequestLimits(principal), 0)
        path = f"{responses_api.RESPONSES_ROUTE}/{response_id}"
        try:
            async with deadline_scope(self._deadline(request)):
                resp = await self.s.upstream.request(request.method, path, None, self._headers(request))
                try:
                    status, raw = resp.status, await resp.read()
                finally:
                    await resp.aclose()
        except UpstreamError as exc:
            self.s.metrics.upstream_errors.labels(exc.kind).inc()
            raise
        finally:
            lease.release(0)
        if status >= 400:
            return status, normalise_error(status, raw)
        try:
            stored_model = json.loads(raw).get("model")
        except (ValueError, AttributeError, RecursionError):
            stored_model = None
        if isinstance(stored_model, str):
            if stored_model in self.s.served_models:
                request.scope["state"]["model"] = stored_model
            if not principal.allows(stored_model):
                raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
        return status, raw

    async def passthrough(self, request: Request, route: str) -> ProxyCall:
        """``/tokenize`` and ``/detokenize``: authenticated, model-checked, counted toward the key's rpm and
        concurrency (not its tpm)."""
        principal, raw, body = await self._read(request)
        model = self._check_model(request, principal, body)
        self._inspect_images(body, model)  # the same image checks as generation (remote URLs are not fetched here)
        lease = await self._acquire(_RequestLimits(principal), 0)
        return ProxyCall(self.s.upstream, "POST", route, raw, self._headers(request), stream=False,
                         hooks=_PassThrough(self.s.metrics, lease), deadline=self._deadline(request))

    async def models(self, request: Request) -> dict[str, Any]:
        """``/v1/models`` from the engine, filtered to what the key may use; counted toward the key's rpm and
        concurrency."""
        principal = self.authenticate(request)
        self._check_engine()
        lease = await self._acquire(_RequestLimits(principal), 0)
        try:
            async with deadline_scope(self._deadline(request)):
                status, raw = await self._get_models(request)
        except UpstreamError as exc:
            self.s.metrics.upstream_errors.labels(exc.kind).inc()
            raise
        finally:
            lease.release(0)
        if status != 200:
            self.s.metrics.upstream_errors.labels("status").inc()
            raise UpstreamError(f"engine answered HTTP {status} for /v1/models", kind="status")
        try:
            listing = json.loads(raw)
            listing["data"] = [_public_model(m) for m in listing.get("data", []) if principal.allows(str(m.get("id")))]
        except (ValueError, TypeError, AttributeError, KeyError, RecursionError):
            self.s.metrics.upstream_errors.labels("protocol").inc()
            raise UpstreamError("the engine's /v1/models answer is not a model list", kind="protocol") from None
        return dict(listing)

    async def model(self, request: Request, model_id: str) -> dict[str, Any]:
        """``/v1/models/{id}``: that entry of :meth:`models`; 404 ``model_not_found`` when the engine does not
        list it or the key may not use it."""
        for entry in (await self.models(request))["data"]:
            if entry.get("id") == model_id:
                return dict(entry)
        raise NotFound(f"The model '{model_id}' does not exist", param="model", code="model_not_found")

    async def _get_models(self, request: Request) -> tuple[int, bytes]:
        resp = await self.s.upstream.request("GET", "/v1/models", None, self._headers(request))
        try:
            return resp.status, await resp.read()
        finally:
            await resp.aclose()


def _public_model(entry: dict[str, Any]) -> dict[str, Any]:
    """A model entry of the engine's listing with ``root`` (vLLM: the model's directory or download path)
    replaced by the model's id, so no filesystem path reaches clients."""
    if "root" in entry:
        return {**entry, "root": entry.get("id")}
    return entry


async def _read_body(request: Request) -> bytes:
    """The whole request body; :class:`ClientClosedRequest` when the client hangs up before it is complete."""
    try:
        return await request.body()
    except ClientDisconnect:
        raise ClientClosedRequest("the client went away during the request body upload") from None


def _parse_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, else :class:`InvalidRequest` (also for nesting too deep to parse)."""
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest(f"request body is not valid JSON ({exc})") from None
    except RecursionError:
        raise InvalidRequest("request body is not valid JSON (nested too deeply)") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body
