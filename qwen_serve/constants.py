"""Values shared by more than one module (header names, SSE markers, default ports).

Single-use constants stay in the module that uses them.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, NamedTuple

REQUEST_ID_HEADER = "x-request-id"
GUIDED_OUTPUT_HEADER = "x-guided-output"
API_KEY_HEADER = "x-api-key"

SSE_DATA_PREFIX = b"data: "
SSE_DONE = b"data: [DONE]"
SSE_EVENT_SEPARATOR = b"\n\n"

DEFAULT_GATEWAY_PORT = 8080
DEFAULT_ENGINE_PORT = 8001
ENGINE_HOST = "127.0.0.1"  # the engine never listens anywhere else

ANONYMOUS_KEY_ID = "anonymous"



class Route(NamedTuple):
    """What the gateway serves at one path of :data:`ROUTES`."""

    methods: tuple[str, ...]
    labelled: bool = True  # the path is its metric ``route`` label; False: ``other`` (a parameter is unbounded)
    proxied: bool = False  # answered by the engine: also timed in ``qwen_serve_request_duration_seconds``
    metrics: bool = False  # on the metrics port instead when ``gateway.metrics_port`` is set


# Every route of the gateway (Starlette path syntax), in registration order: the app registers these
# and no others, and the ``route`` metric label comes from here.
ROUTES: Final[Mapping[str, Route]] = MappingProxyType({
    "/v1/chat/completions": Route(("POST",), proxied=True),
    "/v1/completions": Route(("POST",), proxied=True),
    "/v1/responses": Route(("POST",), proxied=True),
    "/v1/responses/{response_id}": Route(("GET", "DELETE"), labelled=False),
    "/v1/models": Route(("GET",), proxied=True),
    "/v1/models/{model_id:path}": Route(("GET",), labelled=False),
    "/tokenize": Route(("POST",), proxied=True),
    "/detokenize": Route(("POST",), proxied=True),
    "/health": Route(("GET",)),
    "/ready": Route(("GET",)),
    "/metrics": Route(("GET",), metrics=True),
    "/metrics/engine": Route(("GET",), metrics=True),
    "/": Route(("GET",)),
    "/static/{name}": Route(("GET",), labelled=False),
    "/favicon.ico": Route(("GET",), labelled=False),
})
OTHER_ROUTE = "other"  # the ``route`` label of every path that is not a labelled route
ROUTE_LABELS: Final = frozenset(path for path, route in ROUTES.items() if route.labelled)
PROXIED_ROUTES: Final = tuple(path for path, route in ROUTES.items() if route.proxied)

ENV_REQUIRE_ENGINE = "QWEN_SERVE_REQUIRE_ENGINE"
ENV_CACHE_DIR = "QWEN_SERVE_CACHE"
