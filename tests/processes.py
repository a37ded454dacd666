"""Child processes for tests: :func:`spawned` runs a command with its output in a log file and always ends it
(SIGTERM, then SIGKILL after ``stop_timeout`` seconds); :func:`gateway_process` is ``qwen-serve gateway`` on a
config file in front of an upstream URL, yielded once its ``/ready`` answers 200 on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import wait_ready

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def spawned(args: list[str], log: Path | None, stop_timeout: float = 20) -> Iterator[subprocess.Popen[bytes]]:
    """``args`` run from the repository root with it on ``PYTHONPATH``; stdout and stderr to ``log`` (None:
    discarded)."""
    out = open(log, "wb") if log is not None else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        if log is not None:
            out.close()  # type: ignore[union-attr]
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def gateway_process(config: Path, upstream: str, port: int, log: Path | None,
                    ready_timeout: float = 60) -> Iterator[subprocess.Popen[bytes]]:
    """``qwen-serve gateway --config config --upstream upstream``, listening on 127.0.0.1:``port`` (the config's)."""
    with spawned([sys.executable, "-m", "qwen_serve", "gateway", "--config", str(config), "--upstream", upstream],
                 log) as proc:
        wait_ready(f"http://127.0.0.1:{port}", timeout=ready_timeout)
        yield proc
