"""``tune_for_serving`` changes process-wide state, so it runs in a child interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

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


def test_the_gateway_processes_tune_before_serving() -> None:
    import inspect

    from qwen_serve import serve

    for entry in (serve.run_gateway, serve.run_up):
        source = inspect.getsource(entry)
        assert source.index("tune_for_serving()") < source.index("server.run()"), entry.__name__
