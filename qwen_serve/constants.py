"""Values shared by more than one module (header names, SSE markers, default ports).

Single-use constants stay in the module that uses them.
"""

from __future__ import annotations

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

# Routes the gateway proxies to the engine (path → metric ``route`` label).
PROXIED_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/models",
    "/tokenize",
    "/detokenize",
)

ENV_REQUIRE_ENGINE = "QWEN_SERVE_REQUIRE_ENGINE"
ENV_CACHE_DIR = "QWEN_SERVE_CACHE"
