"""The gateway's image checks (qwen_serve.gateway.multimodal) on whole chat request bodies.

No test here sends a packet anywhere but 127.0.0.0/8, even if the code under test is wrong: the autouse
``loopback_only`` fixture makes every socket connect and every system name lookup outside loopback raise,
host names are resolved by a scripted resolver (test names map to private or to a public-looking address),
and the fetcher's connector sends the one "public" address the tests use to a local HTTP server on
127.0.0.1 serving a real PNG, and raises for any other address.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from qwen_serve.config import MultimodalConfig, parse_config
from qwen_serve.errors import ConfigError, InvalidRequest
from qwen_serve.gateway.multimodal import (AiohttpFetcher, ImageGuard, address_refusal, host_allowed,
                                           model_accepts_images)

PUBLIC = "93.184.216.34"  # what the scripted resolver answers for allowed test hosts; never connected to
MODEL = "vl"


def _png(size: int = 8, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (size, size), color).save(out, format="PNG")
    return out.getvalue()


PNG = _png()
JPEG_HEAD = b"\xff\xd8\xff\xe0" + b"\x00" * 60


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def chat(*parts: dict[str, Any], text: str = "What is in this picture?") -> dict[str, Any]:
    """A chat completion request as clients send it: one user message, a text part and then ``parts``."""
    return {"model": MODEL, "max_tokens": 16, "stream": True,
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": text}, *parts]}]}


# --------------------------------------------------------------------------------------- the safety net
def _is_loopback(host: object) -> bool:
    if not isinstance(host, str):
        return False
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connect to a non-loopback address and any system lookup of a non-loopback name raises."""
    real_connect, real_connect_ex, real_getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            raise OSError(f"test network guard: connect to {address!r} refused")

    def connect(sock: socket.socket, address: Any) -> None:
        check(sock, address)
        real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        check(sock, address)
        return real_connect_ex(sock, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not _is_loopback(host if isinstance(host, str) else str(host)):
            raise OSError(f"test network guard: lookup of {host!r} refused")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_the_guard_itself_refuses_outside_loopback() -> None:
    with socket.socket() as s, pytest.raises(OSError, match="test network guard"):
        s.connect(("10.0.0.1", 80))
    with pytest.raises(OSError, match="test network guard"):
        socket.getaddrinfo("img.example.test", 80)


class ScriptedResolver:
    """Answers from a table (a list of answers is used one per call, the last one repeating)."""

    def __init__(self, table: dict[str, list[str] | list[list[str]]]) -> None:
        self.table = table
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        answer = self.table.get(host)
        if answer is None:
            raise OSError(f"no such host {host}")
        if answer and isinstance(answer[0], list):
            return list(answer[min(len(self.calls) - 1, len(answer) - 1)])  # type: ignore[arg-type]
        return list(answer)  # type: ignore[arg-type]


class _ToLoopback(AbstractResolver):
    """The fetcher's connector in tests: the pinned address PUBLIC goes to 127.0.0.1, anything else raises."""

    def __init__(self, pinned: str) -> None:
        self.pinned = pinned

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if self.pinned != PUBLIC:
            raise OSError(f"test connector: refusing to connect to {self.pinned}")
        return [ResolveResult(hostname=host, host="127.0.0.1", port=port, family=socket.AF_INET, proto=0,
                              flags=socket.AI_NUMERICHOST)]

    async def close(self) -> None:
        pass


class Connectors:
    def __init__(self) -> None:
        self.pinned: list[str] = []

    def __call__(self, ip: str) -> aiohttp.TCPConnector:
        self.pinned.append(ip)
        return aiohttp.TCPConnector(resolver=_ToLoopback(ip), use_dns_cache=False, force_close=True)


class Recorder:
    """An ImageMetrics that records increments: ``counts[(name, labels)]``."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, tuple[str, ...]], float] = {}
        self.images, self.image_bytes, self.images_refused = (self._family(n) for n in ("images", "bytes", "refused"))

    def _family(self, name: str) -> Any:
        recorder = self

        class Family:
            def labels(self, *values: str) -> Any:
                class Child:
                    def inc(self, amount: float = 1) -> None:
                        key = (name, values)
                        recorder.counts[key] = recorder.counts.get(key, 0) + amount
                return Child()
        return Family()


class _ImageServer(BaseHTTPRequestHandler):
    big = b""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        routes: dict[str, tuple[int, str, bytes, dict[str, str]]] = {
            "/cat.png": (200, "image/png", PNG, {}),
            "/big.png": (200, "image/png", self.big, {}),
            "/moved.png": (302, "text/plain", b"", {"Location": "/cat.png"}),
            "/page.html": (200, "text/html", b"<html>not an image</html>", {}),
            "/lying.png": (200, "image/png", b"<html>not an image</html>", {}),
        }
        status, ctype, body, headers = routes.get(self.path, (404, "text/plain", b"no", {}))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def image_server() -> Iterator[int]:
    _ImageServer.big = PNG + b"\x00" * 5000
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ImageServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def guard(accepts_images: bool = True, *, resolver: ScriptedResolver | None = None,
          connectors: Connectors | None = None, metrics: Recorder | None = None, **config: Any) -> ImageGuard:
    return ImageGuard(MultimodalConfig(**config), accepts_images=accepts_images, metrics=metrics,
                      resolver=resolver or ScriptedResolver({}),
                      fetcher=AiohttpFetcher(connectors or Connectors()))


def refused(g: ImageGuard, body: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as excinfo:
        g.inspect(body, model=MODEL)
    assert excinfo.value.status == 400 and excinfo.value.type == "invalid_request_error"
    return excinfo.value


async def refused_on_fetch(g: ImageGuard, body: dict[str, Any]) -> InvalidRequest:
    found = g.inspect(body, model=MODEL)
    with pytest.raises(InvalidRequest) as excinfo:
        await found.fetch()
    assert excinfo.value.status == 400
    return excinfo.value


# --------------------------------------------------------------------------------------- data: URLs
async def test_a_data_url_image_passes_unchanged_and_is_counted() -> None:
    metrics = Recorder()
    body = chat(image(data_url(PNG)))
    before = json.dumps(body)
    found = guard(metrics=metrics).inspect(body, model=MODEL)
    assert (found.images, found.tokens) == (1, 1280) and not found.remote
    assert await found.fetch() is False and json.dumps(body) == before
    assert metrics.counts == {("images", (MODEL, "data")): 1, ("bytes", (MODEL, "data")): len(PNG)}


@pytest.mark.parametrize("mime", ["image/png", "image/jpeg", "image", "IMAGE/PNG"])
def test_image_media_types_are_accepted(mime: str) -> None:
    raw = PNG if "png" in mime.lower() or mime == "image" else JPEG_HEAD
    assert guard().inspect(chat(image(data_url(raw, mime))), model=MODEL).images == 1


def test_text_only_requests_pass_for_any_model() -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"},
                                         {"role": "user", "content": [{"type": "text", "text": "there"}]}]}
    for accepts in (True, False):
        assert guard(accepts).inspect(body, model=MODEL).images == 0
    assert guard(False).inspect({"model": MODEL, "prompt": "data:image/png;base64,xx"}, model=MODEL).images == 0


@pytest.mark.parametrize("limit_delta", [0, -1])
def test_the_decoded_size_limit_is_exact(limit_delta: int) -> None:
    for raw in (PNG, PNG + b"1", PNG + b"12"):  # every base64 padding: none, "==", "="
        g = guard(max_image_bytes=len(raw) + limit_delta)
        url = data_url(raw)
        if limit_delta == 0:
            assert g.inspect(chat(image(url)), model=MODEL).images == 1
        else:
            err = refused(g, chat(image(url)))
            assert err.code == "image_too_large" and err.param == "messages[1].content[1].image_url.url"
            assert f"more than {len(raw) - 1}" in err.message and "multimodal.max_image_bytes" in err.message


def test_a_huge_data_url_is_refused_by_its_length_alone() -> None:
    metrics = Recorder()
    url = "data:image/png;base64," + "A" * 4_000_000 + "!"  # invalid base64 too: the size is decided first
    err = refused(guard(metrics=metrics, max_image_bytes=1_000_000), chat(image(url)))
    assert err.code == "image_too_large"
    assert metrics.counts == {("refused", (MODEL, "too_large")): 1}


@pytest.mark.parametrize(("url", "why"), [
    ("data:image/png;base64,iVBORw0KGgo*AAAA", "not valid base64"),
    ("data:image/png;base64,iVBORw0KGgoAAA", "not valid base64"),  # length not a multiple of 4
    ("data:image/png;base64,iVBO-w0KGgo_AAAA", "not valid base64"),  # url-safe alphabet
    ("data:image/png;base64,iVBORw0K\nGgoAAAA", "not valid base64"),
    ("data:image/png," + "%89PNG", "must be base64"),
    ("data:image/png;base64", "must be base64"),
    ("data:text/html;base64," + base64.b64encode(b"<html></html>").decode(), "media type 'text/html'"),
    ("data:image/svg+xml;base64," + base64.b64encode(b"<svg/>").decode(), "media type 'image/svg+xml'"),
    ("data:image/png;base64," + base64.b64encode(b"hello world, no image").decode(), "not a PNG, JPEG"),
    ("data:image/png;base64,", "not a PNG, JPEG"),
])
def test_invalid_data_urls_are_refused(url: str, why: str) -> None:
    err = refused(guard(), chat(image(data_url(PNG)), image(url)))
    assert err.code == "invalid_image" and why in err.message
    assert err.param == "messages[1].content[2].image_url.url"


# --------------------------------------------------------------------------------------- counts and shapes
def test_the_image_count_limit_counts_across_messages() -> None:
    one = image(data_url(PNG))
    g = guard(max_images_per_request=3)
    assert g.inspect(chat(one, one, one), model=MODEL).images == 3
    body = chat(one, one)
    body["messages"].append({"role": "user", "content": [one, {"type": "text", "text": "and"}, one]})
    err = refused(g, body)
    assert err.code == "too_many_images" and err.param == "messages[2].content[2]"
    assert "more than 3 images" in err.message and "multimodal.max_images_per_request" in err.message


def test_text_only_model_refuses_an_image_naming_the_part() -> None:
    metrics = Recorder()
    err = refused(guard(False, metrics=metrics), chat(image(data_url(PNG))))
    assert err.param == "messages[1].content[1]" and err.code == "images_not_supported"
    assert f"the model '{MODEL}' does not accept images" in err.message
    assert err.to_dict()["error"]["param"] == "messages[1].content[1]"
    assert metrics.counts == {("refused", (MODEL, "text_only")): 1}


@pytest.mark.parametrize("part", [
    {"image_url": {"url": data_url(PNG)}},  # untyped: vLLM reads it as an image
    {"type": "input_image", "image_url": data_url(PNG)},
    {"type": "image_url", "image_url": {"url": "https://img.example.test/cat.png"}},
    {"type": "video_url", "video_url": {"url": "https://img.example.test/cat.mp4"}},
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
])
def test_text_only_model_refuses_every_media_part(part: dict[str, Any]) -> None:
    err = refused(guard(False), chat(part))
    assert err.code == "images_not_supported" and err.param == "messages[1].content[1]"


@pytest.mark.parametrize(("part", "param", "code"), [
    ({"type": "video_url", "video_url": {"url": "https://img.example.test/a.mp4"}}, "", "unsupported_content"),
    ({"type": "image_embeds", "image_embeds": "AAAA"}, "", "unsupported_content"),
    ({"type": "image_pil", "image_pil": None}, "", "unsupported_content"),
    ({"image_url": {"url": data_url(PNG)}}, ".type", "invalid_type"),
    ({"type": "image_url", "image_url": {"url": data_url(PNG)}, "uuid": "someone-elses-image"}, ".uuid",
     "unsupported_content"),
    ({"type": "image_url", "image_url": data_url(PNG)}, ".image_url", "invalid_type"),
    ({"type": "image_url", "image_url": {"detail": "auto"}}, ".image_url.url", "invalid_type"),
    ({"type": "image_url", "image_url": {"url": 7}}, ".image_url.url", "invalid_type"),
])
def test_vl_model_refuses_other_media_and_odd_image_parts(part: dict[str, Any], param: str, code: str) -> None:
    err = refused(guard(), chat(part))
    assert err.code == code and err.param == "messages[1].content[1]" + param


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://img.example.test/cat.png", "gopher://x/",
                                 "//img.example.test/cat.png", "img.example.test/cat.png", "javascript:alert(1)"])
def test_only_data_and_http_schemes(url: str) -> None:
    resolver = ScriptedResolver({})
    err = refused(guard(resolver=resolver, url_allowlist=["img.example.test"]), chat(image(url)))
    assert err.code == "invalid_image_url" and err.param == "messages[1].content[1].image_url.url"
    assert "only data: URLs and allowed http(s) URLs" in err.message
    assert resolver.calls == []


# --------------------------------------------------------------------------------------- remote URLs
def test_remote_urls_are_refused_by_default() -> None:
    resolver = ScriptedResolver({"img.example.test": [PUBLIC]})
    err = refused(guard(resolver=resolver), chat(image("https://img.example.test/cat.png")))
    assert err.code == "image_url_not_allowed" and "send the image as a data: URL" in err.message
    assert resolver.calls == []


@pytest.mark.parametrize(("host", "allowlist", "allowed"), [
    ("img.example.test", ["img.example.test"], True),
    ("img.example.test", ["*.example.test"], True),
    ("a.b.example.test", ["*.example.test"], True),
    ("example.test", ["*.example.test"], False),  # the suffix itself is not a subdomain
    ("badexample.test", ["*.example.test"], False),
    ("img.example.test.evil.test", ["*.example.test", "img.example.test"], False),
    ("other.example.test", ["img.example.test"], False),
])
def test_host_allowlist_matching(host: str, allowlist: list[str], allowed: bool) -> None:
    assert host_allowed(host, allowlist) is allowed


@pytest.mark.parametrize("url", ["http://evil.test/cat.png", "http://img.example.test@evil.test/cat.png",
                                 "http://user:pw@img.example.test/cat.png", "http://[::1]/cat.png",
                                 "http://127.0.0.1/cat.png"])
def test_urls_outside_the_allowlist_are_refused_before_any_lookup(url: str) -> None:
    resolver = ScriptedResolver({"img.example.test": [PUBLIC], "evil.test": [PUBLIC]})
    err = refused(guard(resolver=resolver, url_allowlist=["img.example.test"]), chat(image(url)))
    assert err.code in ("image_url_not_allowed", "invalid_image_url")
    assert resolver.calls == []


PRIVATE = ["10.1.2.3", "192.168.1.10", "172.16.0.1", "169.254.169.254", "127.0.0.1", "127.8.9.10", "0.0.0.0",
           "100.64.0.1", "224.0.0.1", "240.0.0.1", "255.255.255.255", "198.51.100.7", "::1", "::", "fc00::1",
           "fd12:3456::1", "fe80::1", "ff02::1", "::ffff:10.0.0.1", "::ffff:127.0.0.1", "2002:7f00:1::1",
           "64:ff9b::a00:1", "2001:db8::1"]


@pytest.mark.parametrize("address", PRIVATE)
async def test_private_and_special_addresses_are_refused_after_resolution(address: str) -> None:
    resolver = ScriptedResolver({"img.example.test": [address]})
    connectors, metrics = Connectors(), Recorder()
    g = guard(resolver=resolver, connectors=connectors, metrics=metrics, url_allowlist=["*.example.test"])
    err = await refused_on_fetch(g, chat(image("https://img.example.test/cat.png")))
    assert err.code == "image_url_not_allowed" and err.param == "messages[1].content[1].image_url.url"
    assert "only public addresses are fetched" in err.message
    assert resolver.calls == [("img.example.test", 443)] and connectors.pinned == []
    assert metrics.counts == {("refused", (MODEL, "address")): 1}


@pytest.mark.parametrize("address", PRIVATE)
def test_address_refusal_names_a_reason(address: str) -> None:
    assert address_refusal(address) is not None


@pytest.mark.parametrize("address", [PUBLIC, "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert address_refusal(address) is None


async def test_one_private_address_among_public_ones_is_enough_to_refuse() -> None:
    resolver = ScriptedResolver({"img.example.test": [PUBLIC, "8.8.8.8", "10.0.0.5"]})
    connectors = Connectors()
    g = guard(resolver=resolver, connectors=connectors, url_allowlist=["img.example.test"])
    err = await refused_on_fetch(g, chat(image("http://img.example.test/cat.png")))
    assert "private address" in err.message and connectors.pinned == []


async def test_an_unresolvable_host_is_refused() -> None:
    g = guard(resolver=ScriptedResolver({}), url_allowlist=["img.example.test"])
    err = await refused_on_fetch(g, chat(image("http://img.example.test/cat.png")))
    assert err.code == "image_fetch_failed" and "does not resolve" in err.message


async def test_an_allowed_remote_image_is_fetched_from_the_checked_address_and_inlined(image_server: int) -> None:
    resolver = ScriptedResolver({"img.example.test": [PUBLIC]})
    connectors, metrics = Connectors(), Recorder()
    g = guard(resolver=resolver, connectors=connectors, metrics=metrics, url_allowlist=["*.example.test"])
    body = chat(image(f"http://img.example.test:{image_server}/cat.png"), image(data_url(PNG)))
    found = g.inspect(body, model=MODEL)
    assert found.images == 2 and len(found.remote) == 1
    assert await found.fetch() is True
    assert body["messages"][1]["content"][1] == {"type": "image_url", "image_url": {"url": data_url(PNG)}}
    assert resolver.calls == [("img.example.test", image_server)] and connectors.pinned == [PUBLIC]
    assert metrics.counts == {("images", (MODEL, "data")): 1, ("bytes", (MODEL, "data")): len(PNG),
                              ("images", (MODEL, "remote")): 1, ("bytes", (MODEL, "remote")): len(PNG)}


async def test_a_rebinding_name_is_fetched_from_the_address_that_was_checked(image_server: int) -> None:
    """The name answers a public address first and loopback afterwards: the fetch must not look it up
    again (the connector only ever sees the checked address)."""
    resolver = ScriptedResolver({"img.example.test": [[PUBLIC], ["127.0.0.1"]]})
    connectors = Connectors()
    g = guard(resolver=resolver, connectors=connectors, url_allowlist=["img.example.test"])
    body = chat(image(f"http://img.example.test:{image_server}/cat.png"))
    assert await g.inspect(body, model=MODEL).fetch() is True
    assert len(resolver.calls) == 1 and connectors.pinned == [PUBLIC]


async def test_a_responses_input_image_is_inlined_too(image_server: int) -> None:
    g = guard(resolver=ScriptedResolver({"img.example.test": [PUBLIC]}), url_allowlist=["img.example.test"])
    body = {"model": MODEL, "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "what is it?"},
        {"type": "input_image", "image_url": f"http://img.example.test:{image_server}/cat.png"}]}]}
    assert await g.inspect(body, model=MODEL).fetch() is True
    assert body["input"][0]["content"][1]["image_url"] == data_url(PNG)


@pytest.mark.parametrize(("path", "code", "why"), [
    ("/moved.png", "image_fetch_failed", "HTTP 302 (redirects are not followed)"),
    ("/missing.png", "image_fetch_failed", "HTTP 404"),
    ("/page.html", "invalid_image", "did not return a PNG"),
    ("/lying.png", "invalid_image", "did not return a PNG"),
    ("/big.png", "image_too_large", "more than 1000 (multimodal.max_image_bytes)"),
])
async def test_remote_fetch_failures(image_server: int, path: str, code: str, why: str) -> None:
    g = guard(resolver=ScriptedResolver({"img.example.test": [PUBLIC]}), url_allowlist=["img.example.test"],
              max_image_bytes=1000)
    err = await refused_on_fetch(g, chat(image(f"http://img.example.test:{image_server}{path}")))
    assert err.code == code and why in err.message and err.param == "messages[1].content[1].image_url.url"


async def test_the_test_connector_refuses_any_other_address(image_server: int) -> None:
    """Were the guard to pin a different address than the one the tests vouch for, nothing would be sent."""
    fetcher = AiohttpFetcher(Connectors())
    from qwen_serve.gateway.multimodal import ImageFetchError

    with pytest.raises(ImageFetchError):
        await fetcher.fetch(f"http://img.example.test:{image_server}/cat.png", ip="10.0.0.1", max_bytes=10**6,
                            timeout_s=5)


# --------------------------------------------------------------------------------------- config and capability
def test_multimodal_config_defaults_and_key_paths() -> None:
    cfg = parse_config({"model": {"source": "qwen2.5-vl-7b-instruct"}})
    assert cfg.multimodal.max_images_per_request == 4
    assert cfg.multimodal.max_image_bytes == 10485760
    assert cfg.multimodal.url_allowlist == [] and cfg.multimodal.max_image_pixels == 1003520
    cfg = parse_config({"model": {"source": "x"}, "multimodal": {"url_allowlist": ["IMG.Example.Test.", "*.cdn.test"]}})
    assert cfg.multimodal.url_allowlist == ["img.example.test", "*.cdn.test"]
    for bad in (["https://img.example.test"], ["*"], ["img.example.test:443"], ["a.*.test"], [""]):
        with pytest.raises(ConfigError, match=r"multimodal\.url_allowlist: entries must be host names"):
            parse_config({"model": {"source": "x"}, "multimodal": {"url_allowlist": bad}})
    with pytest.raises(ConfigError, match=r"multimodal\.max_images_per_request: must be a positive integer"):
        parse_config({"model": {"source": "x"}, "multimodal": {"max_images_per_request": 0}})
    with pytest.raises(ConfigError, match=r"multimodal\.max_image_pixels: must be >= 3136"):
        parse_config({"model": {"source": "x"}, "multimodal": {"max_image_pixels": 100}})
    with pytest.raises(ConfigError, match=r"multimodal\.allow: unknown key"):
        parse_config({"model": {"source": "x"}, "multimodal": {"allow": True}})


def test_model_capability_from_the_source(tmp_path: Path) -> None:
    def accepts(source: str) -> bool:
        return model_accepts_images(parse_config({"model": {"source": source}}, base_dir=tmp_path))

    assert accepts("qwen2.5-vl-7b-instruct") and accepts("Qwen/Qwen2.5-VL-72B-Instruct")
    assert not accepts("qwen2.5-7b-instruct") and not accepts("meta-llama/Llama-3.1-8B-Instruct")
    text = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 128,
            "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
            "vocab_size": 1024, "max_position_embeddings": 2048}
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "config.json").write_text(json.dumps(text))
    (tmp_path / "vl").mkdir()
    (tmp_path / "vl" / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "text_config": text,
        "vision_config": {"depth": 2, "hidden_size": 64, "intermediate_size": 64, "num_heads": 2,
                          "out_hidden_size": 128}}))
    assert not accepts("text") and accepts("vl")


async def test_the_socket_guard_stops_the_default_connector_too() -> None:
    """The production connector pinned to a private address: the autouse guard refuses the connect, so even a
    guard that forgot its address check could not reach the network from these tests."""
    from qwen_serve.gateway.multimodal import ImageFetchError

    with pytest.raises(ImageFetchError, match="ClientConnectorError|ClientOSError"):
        await AiohttpFetcher().fetch("http://img.example.test/cat.png", ip="10.0.0.1", max_bytes=10, timeout_s=5)
