"""``gateway.workers: 2``: two gateway processes on one port share each key's limits and one metrics total, a
killed worker is replaced (and its rate-limit leases released) while the other keeps serving, and SIGTERM
drains every stream on every worker.

The gateway runs as ``qwen-serve gateway --upstream <stub>`` (a subprocess; the supervisor and its two
workers) in front of the built-in stub (``qwen_serve.bench.stub``, a fast fake vLLM whose streams can be
paced with ``fake_interval_ms``), all on 127.0.0.1. Each request opens its own connection, so the kernel's
``SO_REUSEPORT`` hash spreads them over both workers; which worker did what is read from each worker's own
prometheus-client files (``counter_<pid>.db`` and ``gauge_livesum_<pid>.db`` in its
``PROMETHEUS_MULTIPROC_DIR``). With 40 connections, the chance that one worker gets fewer than the 5 a
per-worker limit would need is about 1e-7.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from qwen_serve import keys as keys_mod
from qwen_serve.bench.stub import StubProcess, start_stub
from tests.conftest import free_port
from tests.integration.test_observability import CONTRACT

MODEL = "stub"
CHAT = [{"role": "user", "content": "hi"}]
WORKER_MODULE = "qwen_serve.gateway.workers"


def _wait(what: str, predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout:g} s")
        time.sleep(0.05)


def _children(parent: int) -> list[int]:
    """Live gateway worker processes of ``parent``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == parent and stat[0] != "Z" and WORKER_MODULE.encode() in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def _metrics_dir(pid: int) -> Path:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    value = next(v for v in env if v.startswith(b"PROMETHEUS_MULTIPROC_DIR="))
    return Path(value.split(b"=", 1)[1].decode())


def _own_samples(pid: int, kind: str, metric: str) -> list[tuple[dict[str, str], float]]:
    """The samples worker ``pid`` wrote itself (``kind``: counter, gauge_livesum)."""
    path = _metrics_dir(pid) / f"{kind}_{pid}.db"
    if not path.exists():
        return []
    out = []
    for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
        name, _, labels, _ = json.loads(key)
        if name == metric:
            out.append((labels, value))
    return out


def _own_total(pid: int, kind: str, metric: str, **labels: str) -> float:
    return sum(v for lab, v in _own_samples(pid, kind, metric) if all(lab.get(k) == x for k, x in labels.items()))


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    secrets: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers(self) -> list[int]:
        return _children(self.proc.pid)

    def headers(self, key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.secrets[key]}"}

    def chat(self, key: str, **extra: Any) -> httpx.Response:
        """One request on a connection of its own."""
        return httpx.post(self.url + "/v1/chat/completions", headers=self.headers(key), timeout=30,
                          json={"model": MODEL, "messages": CHAT, "max_tokens": 2, **extra})


@pytest.fixture
def stub() -> Iterator[StubProcess]:
    with start_stub(style="vllm") as s:
        yield s


@pytest.fixture
def gateway(tmp_path: Path, stub: StubProcess) -> Iterator[Callable[..., Gateway]]:
    """``qwen-serve gateway`` with 2 workers in front of the stub, auth on with the given keys (id → limits)."""
    started: list[Gateway] = []

    def start(keys: dict[str, dict[str, int]], drain_timeout_s: float = 20, **settings: Any) -> Gateway:
        keys_file = tmp_path / "keys.yaml"
        secrets = {kid: keys_mod.create_key(keys_file, kid, **limits) for kid, limits in keys.items()}
        port = free_port()
        cfg = {"model": {"source": "x", "served_name": MODEL},
               "auth": {"enabled": True, "keys_file": str(keys_file)},
               "gateway": {"host": "127.0.0.1", "port": port, "workers": 2, "drain_timeout_s": drain_timeout_s,
                           **settings}}
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
        log_path = tmp_path / "gateway.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "qwen_serve", "gateway", "--config",
                                     str(tmp_path / "config.yaml"), "--upstream", stub.url],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        gw = Gateway(proc, f"http://127.0.0.1:{port}", log_path, secrets)
        started.append(gw)
        _wait("listening with 2 workers", lambda: "2 gateway workers listening" in gw.log()
              or proc.poll() is not None, 60)
        assert proc.poll() is None, gw.log()[-3000:]
        assert len(gw.workers()) == 2
        _wait("ready", lambda: _status(gw.url + "/ready") == 200, 30)
        return gw

    yield start
    for gw in started:
        if gw.proc.poll() is None:
            os.killpg(gw.proc.pid, signal.SIGKILL)
            gw.proc.wait(30)


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One ``/metrics`` scrape as {(sample name, labels): value}, after checking the exposition: every family
    once with its HELP, and the gateway's families exactly the contract's, as with one process."""
    text = httpx.get(url + "/metrics", timeout=10).text
    types = re.findall(r"^# TYPE (\S+) ", text, re.M)
    assert len(types) == len(set(types)), "a family appears twice"
    assert set(re.findall(r"^# HELP (\S+) ", text, re.M)) == set(types)
    assert {t for t in types if t.startswith("qwen_serve_")} == set(CONTRACT)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _sample(scrape: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in scrape.items()
               if n == name and all(dict(lab).get(k) == x for k, x in labels.items()))


# --------------------------------------------------------------------------------------------------- limits


def test_two_workers_share_one_keys_rpm_and_one_metrics_total(gateway: Callable[..., Gateway]) -> None:
    gw = gateway({"limited": {"rpm": 5}})
    codes = [gw.chat("limited").status_code for _ in range(40)]
    assert codes.count(200) == 5 and codes.count(429) == 35, codes
    workers = gw.workers()

    def answered() -> dict[int, float]:
        return {pid: _own_total(pid, "counter", "qwen_serve_requests", route="/v1/chat/completions") for pid in workers}

    # A request is counted just after its response went out: wait for the last one.
    _wait("every request counted", lambda: sum(answered().values()) == 40, 10)
    # Each worker answered at least 5: with a limit per worker, 10 or more would have been admitted.
    assert all(n >= 5 for n in answered().values()), answered()
    for _ in range(4):  # any worker's scrape shows the sum over both
        scrape = _scrape(gw.url)
        route = "/v1/chat/completions"
        assert _sample(scrape, "qwen_serve_requests_total", route=route, key_id="limited", code="200") == 5
        assert _sample(scrape, "qwen_serve_requests_total", route=route, key_id="limited", code="429") == 35
        assert _sample(scrape, "qwen_serve_rate_limited_total", key_id="limited", limit="rpm") == 35
        assert _sample(scrape, "qwen_serve_tokens_total", key_id="limited", kind="completion") == 10
        assert _sample(scrape, "qwen_serve_in_flight_requests") == 0
        assert _sample(scrape, "qwen_serve_engine_up") == 1
        assert not any(name.startswith("process_") for name, _ in scrape)  # per-process families left out


def _stream(gw: Gateway, key: str, events: int, interval_ms: int, out: list[str],
            started: threading.Event | None = None) -> threading.Thread:
    """A paced stream in a thread; its ``data:`` lines go to ``out``."""

    def run() -> None:
        body = {"model": MODEL, "messages": CHAT, "max_tokens": events, "stream": True,
                "fake_interval_ms": interval_ms}
        try:
            with httpx.stream("POST", gw.url + "/v1/chat/completions", headers=gw.headers(key), json=body,
                              timeout=60) as r:
                out.append(f"status {r.status_code}")
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        out.append(line)
                        if started is not None:
                            started.set()
        except httpx.HTTPError as exc:
            out.append(f"error {type(exc).__name__}")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_two_workers_share_one_keys_concurrency(gateway: Callable[..., Gateway]) -> None:
    gw = gateway({"pair": {"max_concurrent": 2}})
    outs: list[list[str]] = [[], []]
    flags = [threading.Event(), threading.Event()]
    threads = [_stream(gw, "pair", 30, 100, outs[i], flags[i]) for i in range(2)]  # 3 s each
    assert all(f.wait(20) for f in flags)
    refused = [gw.chat("pair") for _ in range(16)]
    assert all(r.status_code == 429 and "concurrent" in r.json()["error"]["message"] for r in refused), \
        [r.status_code for r in refused]
    workers = gw.workers()
    by_worker = {pid: _own_total(pid, "counter", "qwen_serve_rate_limited", key_id="pair", limit="concurrency")
                 for pid in workers}
    assert all(n >= 1 for n in by_worker.values()), by_worker  # both refused: neither counted only its own
    for thread in threads:
        thread.join(30)
    assert all(out[-1] == "data: [DONE]" for out in outs), [out[-2:] for out in outs]
    assert gw.chat("pair").status_code == 200  # both slots free again, whichever worker asks


# ----------------------------------------------------------------------------------------- dying, draining


def test_a_killed_worker_is_replaced_and_its_leases_released(gateway: Callable[..., Gateway]) -> None:
    gw = gateway({"solo": {"max_concurrent": 1}, "free": {}})
    out: list[str] = []
    started = threading.Event()
    thread = _stream(gw, "solo", 200, 100, out, started)  # 20 s, unless its worker dies
    assert started.wait(20)
    workers = gw.workers()
    holder = next(pid for pid in workers
                  if _own_total(pid, "gauge_livesum", "qwen_serve_in_flight_requests") == 1)
    other = next(pid for pid in workers if pid != holder)
    assert gw.chat("solo").status_code == 429  # the stream holds the key's one slot
    os.kill(holder, signal.SIGKILL)
    thread.join(30)
    assert out[-1] != "data: [DONE]"  # the stream died with its worker
    _wait("the killed worker gone", lambda: holder not in gw.workers(), 10)
    codes = [gw.chat("free").status_code for _ in range(20)]  # the other worker keeps serving meanwhile
    assert codes == [200] * 20, codes
    _wait("a replacement worker", lambda: len(gw.workers()) == 2 and holder not in gw.workers(), 60)
    assert other in gw.workers()
    assert re.search(rf"gateway worker \d \(pid {holder}\) was killed by SIGKILL; restarting it", gw.log())
    assert "1 rate-limit lease(s) of its requests released" in gw.log()  # by the supervisor, at once
    _wait("ready again", lambda: "gateway worker" in gw.log() and _status(gw.url + "/ready") == 200, 30)
    assert gw.chat("solo").status_code == 200  # the dead worker's lease was released
    scrape = _scrape(gw.url)
    assert _sample(scrape, "qwen_serve_in_flight_requests") == 0  # the dead worker's gauge is gone


def test_sigterm_drains_every_stream_on_every_worker(gateway: Callable[..., Gateway]) -> None:
    gw = gateway({"free": {}}, drain_timeout_s=20)
    outs: list[list[str]] = [[] for _ in range(16)]  # all on one worker: 2 in 65,536
    flags = [threading.Event() for _ in outs]
    threads = [_stream(gw, "free", 20, 100, out, flag) for out, flag in zip(outs, flags)]  # 2 s each
    assert all(f.wait(20) for f in flags)
    workers = gw.workers()
    in_flight = {pid: _own_total(pid, "gauge_livesum", "qwen_serve_in_flight_requests") for pid in workers}
    assert all(n >= 1 for n in in_flight.values()), in_flight  # streams on both workers
    gw.proc.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(30)
    assert gw.proc.wait(40) == 0, gw.log()[-3000:]
    for out in outs:
        assert out[0] == "status 200" and out[-1] == "data: [DONE]", out[-3:]
        assert len([line for line in out if '"content"' in line]) >= 20
    log = gw.log()
    assert "draining 2 gateway workers" in log
    assert gw.workers() == [] and not any(Path(f"/proc/{pid}").exists() and _is_live(pid) for pid in workers)


def _is_live(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_second_gateway_on_the_same_port_is_refused(gateway: Callable[..., Gateway], tmp_path: Path,
                                                      stub: StubProcess) -> None:
    """SO_REUSEPORT must not let another gateway share the port's traffic by mistake: exit 1 at start."""
    gw = gateway({"free": {}})
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    (tmp_path / "second.yaml").write_text(yaml.safe_dump(cfg))
    second = subprocess.run([sys.executable, "-m", "qwen_serve", "gateway", "--config", str(tmp_path / "second.yaml"),
                             "--upstream", stub.url], capture_output=True, timeout=60)
    assert second.returncode == 1
    assert b"gateway.port" in second.stdout + second.stderr
    assert gw.chat("free").status_code == 200


def test_the_metrics_port_shows_every_worker(gateway: Callable[..., Gateway]) -> None:
    metrics_port = free_port()
    gw = gateway({"free": {}}, metrics_port=metrics_port)
    for _ in range(12):
        assert gw.chat("free").status_code == 200
    assert httpx.get(gw.url + "/metrics", timeout=10).status_code == 404  # not on the main port
    metrics_url = f"http://127.0.0.1:{metrics_port}"
    _wait("every request counted", lambda: _sample(_scrape(metrics_url), "qwen_serve_requests_total",
                                                   route="/v1/chat/completions", code="200") == 12, 10)
    for _ in range(4):
        scrape = _scrape(metrics_url)
        assert _sample(scrape, "qwen_serve_requests_total", route="/v1/chat/completions", code="200") == 12
