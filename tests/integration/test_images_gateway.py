"""Image content parts through the served gateway (production uvicorn settings, in a thread) in front of a
fake engine on 127.0.0.1: a vision-language model's images pass to the engine and are counted; bad ones
are 400s naming the part and never reach the engine; a text-only model refuses any image part and exports
no image metrics. No request leaves 127.0.0.1 (the only remote URL used is refused before any lookup)."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.gateway_harness import MODEL, FakeEngine, config, json_response, serve

VL_SOURCE = "Qwen/Qwen2.5-VL-7B-Instruct"  # a bundled vision-language preset: the gateway accepts images
CHAT_ANSWER = {"id": "x", "object": "chat.completion", "created": 0, "model": MODEL,
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "a square"},
                            "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 30, "completion_tokens": 2, "total_tokens": 32}}
RESPONSE_ANSWER = {"id": "resp_x", "object": "response", "created_at": 0, "model": MODEL, "status": "completed",
                   "output": [{"type": "message", "id": "msg_x", "role": "assistant", "status": "completed",
                               "content": [{"type": "output_text", "text": "a square", "annotations": []}]}],
                   "usage": {"input_tokens": 30, "output_tokens": 2, "total_tokens": 32}}


def _png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 16), (30, 120, 200)).save(out, format="PNG")
    return out.getvalue()


DATA_URL = "data:image/png;base64," + base64.b64encode(_png()).decode()


class Recorder:
    """The bodies the fake engine received, by route."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def answer(self, reply: dict[str, Any]) -> Any:
        def respond(body: bytes) -> bytes:
            with self._lock:
                self.bodies.append(json.loads(body))
            return json_response(reply)
        return respond


@pytest.fixture
def engine() -> Iterator[tuple[FakeEngine, Recorder]]:
    recorder = Recorder()
    fake = FakeEngine({"POST /v1/chat/completions": recorder.answer(CHAT_ANSWER),
                       "POST /v1/responses": recorder.answer(RESPONSE_ANSWER)})
    yield fake, recorder
    fake.close()


def _gateway(source: str, **multimodal: Any) -> Any:
    cfg = config()
    return cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"source": source}),
        "multimodal": cfg.multimodal.model_copy(update=multimodal),
    })


def _chat(url: str, parts: list[dict[str, Any]]) -> httpx.Response:
    body = {"model": MODEL, "max_tokens": 4,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, *parts]}]}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)


def _image(url: str = DATA_URL) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def _sample(url: str, name: str, labels: dict[str, str]) -> float | None:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = line[len(name) + 1:line.index("}")]
            if sorted(got.split(",")) == sorted(want.split(",")):
                return float(line.rsplit(" ", 1)[1])
    return None


def test_a_vision_model_gets_its_images_and_counts_them(engine: tuple[FakeEngine, Recorder]) -> None:
    fake, recorder = engine
    with serve(_gateway(VL_SOURCE), fake.url) as url:
        reply = _chat(url, [_image()])
        assert reply.status_code == 200, reply.text
        (sent,) = recorder.bodies
        assert sent["messages"][0]["content"][1] == _image()  # passed on as sent
        assert _sample(url, "qwen_serve_images_total", {"model": MODEL, "source": "data"}) == 1
        assert _sample(url, "qwen_serve_image_bytes_total", {"model": MODEL, "source": "data"}) == len(_png())

        responses = httpx.post(f"{url}/v1/responses", timeout=30, json={
            "model": MODEL, "max_output_tokens": 4,
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "what is this?"},
                                                    {"type": "input_image", "image_url": DATA_URL}]}]})
        assert responses.status_code == 200, responses.text
        assert recorder.bodies[-1]["input"][0]["content"][1]["image_url"] == DATA_URL
        assert _sample(url, "qwen_serve_images_total", {"model": MODEL, "source": "data"}) == 2


@pytest.mark.parametrize("parts,param,reason", [
    ([_image()] * 3, r"messages\[0\]\.content\[3\]", "too_many"),
    ([_image("data:image/png;base64,bm90IGFuIGltYWdl")], r"messages\[0\]\.content\[1\]", "invalid"),
    ([_image("https://images.example.test/cat.png")], r"messages\[0\]\.content\[1\]", "url_not_allowed"),
    ([_image("file:///etc/passwd")], r"messages\[0\]\.content\[1\]", None),
], ids=["too-many", "not-an-image", "host-not-allowed", "file-scheme"])
def test_bad_image_parts_are_400s_that_never_reach_the_engine(
        engine: tuple[FakeEngine, Recorder], parts: list[dict[str, Any]], param: str, reason: str | None) -> None:
    fake, recorder = engine
    with serve(_gateway(VL_SOURCE, max_images_per_request=2), fake.url) as url:
        reply = _chat(url, parts)
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and re.match(param, error["param"]), error
        assert recorder.bodies == []
        if reason is not None:
            assert _sample(url, "qwen_serve_images_refused_total", {"model": MODEL, "reason": reason}) == 1


def test_a_text_only_model_refuses_image_parts_and_exports_no_image_metrics(
        engine: tuple[FakeEngine, Recorder]) -> None:
    fake, recorder = engine
    with serve(_gateway("x"), fake.url) as url:
        reply = _chat(url, [_image()])
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["param"] == "messages[0].content[1]"
        assert "image" in reply.json()["error"]["message"]
        assert recorder.bodies == []
        assert "qwen_serve_images" not in httpx.get(f"{url}/metrics", timeout=10).text
