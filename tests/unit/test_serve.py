"""qwen_serve.serve: the uvicorn settings the gateway runs with."""

from __future__ import annotations

from qwen_serve.config import parse_config
from qwen_serve.serve import _uvicorn_config


def test_uvicorn_settings_follow_the_config() -> None:
    config = parse_config({"model": {"source": "x"},
                           "gateway": {"host": "0.0.0.0", "port": 9000, "drain_timeout_s": 42, "log_requests": True}})
    settings = _uvicorn_config(object(), config)
    assert (settings.host, settings.port) == ("0.0.0.0", 9000)
    assert settings.timeout_graceful_shutdown == 42  # in-flight streams get the drain time
    assert settings.access_log is True
    assert settings.log_config is None  # uvicorn logs through the queued handler of qwen_serve.logs
    assert (settings.loop, settings.http) == ("uvloop", "httptools")
