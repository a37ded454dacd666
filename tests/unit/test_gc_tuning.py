"""``tune_for_serving`` changes process-wide state, so it runs in a child interpreter; the entry points are
checked to call it before serving with it and the server replaced by recorders."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from qwen_serve import serve
from qwen_serve.config import parse_config
from qwen_serve.gc_tuning import GEN0_THRESHOLD

_CHILD = """
import gc, json
from qwen_serve.gc_tuning import tune_for_serving
before = gc.get_threshold()
tune_for_serving()
tune_for_serving()  # idempotent
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": gc.get_freeze_count(),
                  "enabled": gc.isenabled()}))
"""


def test_tune_for_serving_freezes_startup_objects_and_raises_the_young_threshold() -> None:
    out = json.loads(subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                                    check=True).stdout)
    assert out["before"] == [700, 10, 10]  # CPython's defaults
    assert out["after"] == [GEN0_THRESHOLD, 10, 10]
    assert out["frozen"] > 1000  # the imported modules' objects, out of the collector's walk
    assert out["enabled"]  # tuned, never switched off: cycles are still collected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("entry", ["run_gateway", "run_up"])
def test_the_gateway_processes_tune_before_serving(entry: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The startup objects exist once the app is built; the collector is tuned then, before serving."""
    calls: list[str] = []
    monkeypatch.setattr(serve, "setup_logging", lambda: None)  # the test process keeps its logging
    monkeypatch.setattr("qwen_serve.plan.detect_gpu", lambda: False)
    monkeypatch.setattr(serve, "tune_for_serving", lambda: calls.append("tune"))
    monkeypatch.setattr(serve.GatewayServer, "run", lambda self, sockets=None: calls.append("run"))
    config = parse_config({"model": {"source": "qwen2.5-0.5b-instruct"}, "auth": {"enabled": False},
                           "engine": {"device": "cpu"}, "gateway": {"host": "127.0.0.1", "port": _free_port()}})
    assert getattr(serve, entry)(config) == 0
    assert calls == ["tune", "run"]
