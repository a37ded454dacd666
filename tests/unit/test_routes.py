"""``constants.ROUTES``, the one list of the gateway's routes: what the app registers and the ``route`` label."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.routing import Route as StarletteRoute

from qwen_serve.config import parse_config
from qwen_serve.constants import OTHER_ROUTE, PROXIED_ROUTES, ROUTES
from qwen_serve.engine.state import EngineState
from qwen_serve.gateway.app import build_app
from qwen_serve.gateway.middleware import route_label


def registered(app: Any) -> dict[str, set[str]]:
    return {r.path: set(r.methods or ()) - {"HEAD"} for r in app.routes if isinstance(r, StarletteRoute)}


def gateway(**gateway: Any) -> Any:
    config = parse_config({"model": {"source": "x", "served_name": "m"}, "auth": {"enabled": False},
                           "gateway": gateway})
    return build_app(config, upstream_url="http://127.0.0.1:9", state=EngineState())


def test_the_app_serves_exactly_the_routes_with_their_methods() -> None:
    assert registered(gateway().fastapi) == {path: set(r.methods) for path, r in ROUTES.items()}


def test_with_a_metrics_port_the_metrics_routes_move_there() -> None:
    app = gateway(metrics_port=9091)
    metrics = {path: set(r.methods) for path, r in ROUTES.items() if r.metrics}
    assert metrics.keys() == {"/metrics", "/metrics/engine"}
    assert registered(app.metrics_app) == metrics
    assert registered(app.fastapi) == {path: set(r.methods) for path, r in ROUTES.items() if not r.metrics}


@pytest.mark.parametrize(("path", "label"), [
    ("/v1/chat/completions", "/v1/chat/completions"),
    ("/tokenize", "/tokenize"),
    ("/health", "/health"),
    ("/metrics/engine", "/metrics/engine"),
    ("/", "/"),
    ("/v1/models/qwen", OTHER_ROUTE),  # a parameter: the label stays bounded
    ("/v1/responses/resp_1", OTHER_ROUTE),
    ("/static/chat.js", OTHER_ROUTE),
    ("/favicon.ico", OTHER_ROUTE),
    ("/health/", OTHER_ROUTE),  # paths match exactly
    ("/nope", OTHER_ROUTE),
])
def test_route_label(path: str, label: str) -> None:
    assert route_label(path) == label


def test_the_proxied_routes_are_labelled_routes() -> None:
    assert PROXIED_ROUTES == ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models",
                              "/tokenize", "/detokenize")
    assert all(route_label(path) == path for path in PROXIED_ROUTES)
