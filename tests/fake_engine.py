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
* ``crash-then-hang``: the first launch behaves as ``crash``, every later one as ``unhealthy``;
* ``sicken``: ``/health`` answers 200 for ``FAKE_ENGINE_HEALTHY_S`` seconds (default 2) after the launch,
  then 503 forever (an engine that turns unhealthy after it was ready; every launch does);
* ``stall``: healthy, and answers ``POST`` (``/v1/chat/completions`` and the like) with a minimal chat
  completion. A request whose body contains ``stall`` first stalls the whole server for
  ``FAKE_ENGINE_STALL_S`` seconds (default 10): the server handles one request at a time, so ``/health``
  goes unanswered meanwhile, as vLLM's API server does while it prepares an expensive request.

The mode comes from ``--mode`` or ``FAKE_ENGINE_MODE``. When ``FAKE_ENGINE_DIR`` (or ``--marker``'s
directory) is set the stand-in appends its pid to ``launches`` there and writes ``sigterm`` when it
gets SIGTERM. With ``FAKE_ENGINE_CORE=1`` it first starts a child that ignores its parent's death (as
vLLM's EngineCore does) and writes that child's pid to ``core-<pid>``; with ``FAKE_ENGINE_CORE=stubborn``
that child also ignores SIGTERM (only SIGKILL ends it). Each launch with a state directory also writes
``alive-at-launch-<pid>``: the pids of earlier launches and their cores still alive when it started
(:func:`alive_at_launch`).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

__all__ = ["FAKE_ENGINE", "alive_at_launch", "install", "launches"]

FAKE_ENGINE = '''
import argparse, glob, http.server, json, os, signal, subprocess, sys, threading, time
def alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
p = argparse.ArgumentParser()
p.add_argument("--port", type=int); p.add_argument("--mode"); p.add_argument("--marker")
a, _ = p.parse_known_args()
mode = a.mode or os.environ.get("FAKE_ENGINE_MODE", "ok")
state_dir = os.environ.get("FAKE_ENGINE_DIR") or (os.path.dirname(a.marker) if a.marker else None)
launch = 0
if state_dir:
    path = os.path.join(state_dir, "launches")
    launch = len(open(path).read().split()) if os.path.exists(path) else 0
    earlier = open(path).read().split() if os.path.exists(path) else []
    earlier += [open(c).read().strip() for c in glob.glob(os.path.join(state_dir, "core-*"))]
    with open(os.path.join(state_dir, f"alive-at-launch-{os.getpid()}"), "w") as f:
        f.write(" ".join(pid for pid in earlier if pid and alive(int(pid))))
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
elif os.environ.get("FAKE_ENGINE_CORE") == "stubborn":
    core = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                             "signal.SIG_IGN); signal.signal(signal.SIGHUP, signal.SIG_IGN); time.sleep(600)"])
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
def answer_post(self):
    body = self.rfile.read(int(self.headers.get("content-length") or 0))
    if b"stall" in body:
        time.sleep(float(os.environ.get("FAKE_ENGINE_STALL_S", "10")))
    answer = json.dumps({"id": "fake", "object": "chat.completion", "created": 0, "model": "fake",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
    self.send_response(200); self.send_header("content-type", "application/json")
    self.send_header("content-length", str(len(answer))); self.end_headers(); self.wfile.write(answer)
if mode == "stall":
    H.do_POST = answer_post
if mode == "sicken":
    healthy_until = time.monotonic() + float(os.environ.get("FAKE_ENGINE_HEALTHY_S", "2"))
    def sickening_get(self):
        self.send_response(200 if time.monotonic() < healthy_until else 503); self.end_headers()
    H.do_GET = sickening_get
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


def alive_at_launch(state_dir: Path, pid: int) -> list[int]:
    """The pids of earlier stand-ins (and their cores) that were still alive when stand-in ``pid`` started."""
    return [int(p) for p in (state_dir / f"alive-at-launch-{pid}").read_text().split()]


def launches(state_dir: Path) -> list[int]:
    """Pids of the stand-ins started with ``state_dir`` as their ``FAKE_ENGINE_DIR``, in launch order."""
    path = state_dir / "launches"
    return [int(pid) for pid in path.read_text().split()] if path.exists() else []
