"""A stand-in for vLLM's OpenAI server, for supervisor and ``qwen-serve up`` tests without the engine.

:func:`install` writes a package ``vllm.entrypoints.openai.api_server`` into a directory; with that
directory first on the engine's ``PYTHONPATH`` the supervisor starts the stand-in exactly as it starts
vLLM (``python -m vllm.entrypoints.openai.api_server ...``). It serves ``GET /health`` on ``--port``
(vLLM's flag, so a plan's argv works unchanged) and behaves as its mode says:

* ``ok``: healthy until SIGTERM;
* ``exit``: prints a vLLM-like error and exits with code 3 before listening;
* ``unhealthy``: ``/health`` answers 503 forever (a start-up that never finishes);
* ``deaf``: as ``unhealthy``, and ignores SIGTERM (as vLLM 0.32's API server does while it loads);
* ``crash``: healthy, then exits with code 9 after one second;
* ``crash-then-hang``: the first launch behaves as ``crash``, every later one as ``unhealthy``.

The mode comes from ``--mode`` or ``FAKE_ENGINE_MODE``. When ``FAKE_ENGINE_DIR`` (or ``--marker``'s
directory) is set the stand-in appends its pid to ``launches`` there and writes ``sigterm`` when it
gets SIGTERM. With ``FAKE_ENGINE_CORE=1`` it first starts a child that ignores its parent's death (as
vLLM's EngineCore does) and writes that child's pid to ``core-<pid>``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

__all__ = ["FAKE_ENGINE", "install", "launches"]

FAKE_ENGINE = '''
import argparse, http.server, os, signal, subprocess, sys, threading, time
p = argparse.ArgumentParser()
p.add_argument("--port", type=int); p.add_argument("--mode"); p.add_argument("--marker")
a, _ = p.parse_known_args()
mode = a.mode or os.environ.get("FAKE_ENGINE_MODE", "ok")
state_dir = os.environ.get("FAKE_ENGINE_DIR") or (os.path.dirname(a.marker) if a.marker else None)
launch = 0
if state_dir:
    path = os.path.join(state_dir, "launches")
    launch = len(open(path).read().split()) if os.path.exists(path) else 0
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\\n")
if mode == "crash-then-hang":
    mode = "crash" if launch == 0 else "unhealthy"
print("fake engine starting", mode, flush=True)
if mode == "exit":
    print("ValueError: model not found", flush=True); sys.exit(3)
if os.environ.get("FAKE_ENGINE_CORE") == "1":
    core = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    if state_dir:
        open(os.path.join(state_dir, f"core-{os.getpid()}"), "w").write(str(core.pid))
def term(*_):
    if a.marker:
        open(a.marker, "w").write("SIGTERM")
    if state_dir:
        open(os.path.join(state_dir, "sigterm"), "a").write(f"{os.getpid()}\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "deaf" else term)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(503 if mode in ("unhealthy", "deaf") else 200); self.end_headers()
    def log_message(self, *args): pass
srv = http.server.HTTPServer(("127.0.0.1", a.port), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
if mode == "crash":
    time.sleep(1.0); os._exit(9)
while True:
    time.sleep(0.1)
'''


def install(root: Path) -> Path:
    """Write the stand-in package under ``root / "fake"``; returns the directory to put on ``PYTHONPATH``."""
    base = root / "fake"
    pkg = base / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True, exist_ok=True)
    for d in (base / "vllm", base / "vllm" / "entrypoints", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text(textwrap.dedent(FAKE_ENGINE))
    return base


def launches(state_dir: Path) -> list[int]:
    """Pids of the stand-ins started with ``state_dir`` as their ``FAKE_ENGINE_DIR``, in launch order."""
    path = state_dir / "launches"
    return [int(pid) for pid in path.read_text().split()] if path.exists() else []
