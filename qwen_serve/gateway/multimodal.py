"""Image inputs: the gateway's checks of OpenAI image content parts, and the fetch of allowed remote images.

Called by the pipeline for ``/v1/chat/completions`` (and any body with chat ``messages`` or Responses
``input`` items). Built once per app: ``ImageGuard(config.multimodal, accepts_images=model_accepts_images(config),
metrics=...)``. Per request, two steps:

1. :meth:`ImageGuard.inspect` (no I/O, before the rate-limit lease): walks the content parts and raises
   :class:`~qwen_serve.errors.InvalidRequest` (400, ``param`` the part's path, e.g. ``messages[0].content[1]``)
   for an image sent to a text-only model, more than ``multimodal.max_images_per_request`` images, a
   ``data:`` URL that is not base64 of a PNG/JPEG/GIF/WebP/BMP image or whose decoded size exceeds
   ``multimodal.max_image_bytes`` (computed from the base64 length; only the first bytes are decoded, to
   recognise the format), a scheme other than ``data:``/``http:``/``https:``, or a remote host outside
   ``multimodal.url_allowlist``. Other media parts (``video_url``, ``input_audio``, ``image_embeds``, ...),
   parts with a cache ``uuid`` and untyped media parts are refused too. Returns an :class:`ImageRequest`.
2. :meth:`ImageRequest.fetch` (after the lease): resolves each remote host with the injectable ``resolver``
   (default ``loop.getaddrinfo``), refuses it when **any** address is not globally routable (loopback,
   private, link-local, CGNAT, multicast, reserved, unspecified, documentation ranges; IPv4 inside
   IPv4-mapped, 6to4, Teredo and NAT64 IPv6 addresses is checked as IPv4), then fetches the image through
   the injectable ``fetcher``, which connects only to the address that was checked (no second DNS lookup:
   no DNS rebinding), follows no redirect, ignores proxy variables, and stops reading past
   ``max_image_bytes``. The image replaces the URL as a ``data:`` URL, so the engine never fetches anything
   (the plan also gives vLLM ``--allowed-media-domains invalid``). Returns whether the body changed.

Text-only models: any image part is a 400 naming it, before anything reaches the engine (the engine
refuses them too, less clearly). The guard owns no resources; the default fetcher opens one aiohttp
session per remote image and closes it before returning.

Metrics: the guard counts accepted images and their decoded bytes (``source`` ``data``|``remote``) and
refusals by ``reason`` through an :class:`ImageMetrics` (``GatewayMetrics`` provides the three collectors).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol
from urllib.parse import urlsplit

from qwen_serve.config import Config, MultimodalConfig
from qwen_serve.errors import InvalidRequest, PlanError
from qwen_serve.presets import resolve_geometry

__all__ = [
    "AiohttpFetcher",
    "FetchedImage",
    "ImageFetchError",
    "ImageFetcher",
    "ImageGuard",
    "ImageMetrics",
    "ImageRequest",
    "Resolver",
    "address_refusal",
    "host_allowed",
    "model_accepts_images",
    "system_resolver",
]

#: ``(host, port) -> IP address strings``; every one of them is checked.
Resolver = Callable[[str, int], Awaitable[list[str]]]

# Refusal reasons (the ``reason`` label of qwen_serve_images_refused_total).
TEXT_ONLY, TOO_MANY, TOO_LARGE, INVALID, URL_NOT_ALLOWED, ADDRESS, FETCH, UNSUPPORTED = (
    "text_only", "too_many", "too_large", "invalid", "url_not_allowed", "address", "fetch", "unsupported")

_IMAGE_TYPES = ("image_url", "input_image")  # OpenAI chat / Responses image parts
# Other media parts vLLM understands (typed, or recognised by their key when untyped): never passed on.
_OTHER_MEDIA = ("image_pil", "image_embeds", "audio_embeds", "video_embeds", "prompt_embeds", "audio_url",
                "input_audio", "video_url", "input_file", "file")
_MEDIA_KEYS = ("image_url", *_OTHER_MEDIA)
_DATA_MIME = frozenset({"image", "image/png", "image/jpeg", "image/jpg", "image/gif", "image/webp", "image/bmp"})
_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_SNIFF_CHARS = 16  # base64 characters decoded to recognise the format (12 bytes)


def _sniff(head: bytes) -> str | None:
    """The MIME type of an image from its first bytes; None when it is none of the formats served."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith(b"BM"):
        return "image/bmp"
    return None


# --------------------------------------------------------------------------------------- capability
def model_accepts_images(config: Config) -> bool:
    """Whether the served model takes images: ``model.source`` is a vision-language preset
    (``qwen2.5-vl-*`` or its Hugging Face id) or a local directory whose ``config.json`` has a
    ``vision_config``. An unknown source counts as text-only. Reads at most one file: call it once, at
    start-up."""
    source = config.model.source
    local = config.resolve_path(source)
    try:
        return resolve_geometry(str(local) if local.is_dir() else source).accepts_images
    except PlanError:
        return False


# --------------------------------------------------------------------------------------- addresses
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def address_refusal(address: str) -> str | None:
    """Why ``address`` may not be fetched from (``"loopback"``, ``"private"``, ...), or None for a globally
    routable unicast address. IPv4 carried inside IPv6 (mapped, 6to4, Teredo, NAT64) is judged as IPv4."""
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address)
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return address_refusal(str(embedded))
    for kind in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local"
    if not ip.is_global:
        return "not globally routable"
    return None


def host_allowed(host: str, allowlist: list[str]) -> bool:
    """``host`` (lower case, no trailing dot) matches an entry: the same name, or ``*.suffix`` and
    ``host`` ends with ``.suffix`` (a subdomain; the bare suffix does not match)."""
    for entry in allowlist:
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and len(host) > len(entry) - 1:
                return True
        elif host == entry:
            return True
    return False


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for ``host`` (``loop.getaddrinfo``, TCP)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


# --------------------------------------------------------------------------------------- fetching
@dataclass(frozen=True)
class FetchedImage:
    content_type: str  # the response's Content-Type (without parameters)
    data: bytes


class ImageFetchError(Exception):
    """A remote image could not be fetched; the message is safe to show the client. ``too_large``: it was
    refused for its size."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


class ImageFetcher(Protocol):
    async def fetch(self, url: str, *, ip: str, max_bytes: int, timeout_s: float) -> FetchedImage:
        """GET ``url`` connecting to ``ip`` only (TLS still verifies the URL's host name); no redirects.
        Raises :class:`ImageFetchError` for a non-200 answer, a body over ``max_bytes`` or a failure."""
        ...


ConnectorFactory = Callable[[str], Any]  # pinned IP -> aiohttp.BaseConnector


class AiohttpFetcher:
    """The default :class:`ImageFetcher`: one aiohttp session per image, whose connector resolves the URL's
    host to the checked address only (``connector_factory(ip)``, replaceable in tests), with
    ``trust_env=False`` (an HTTP proxy would resolve the name again) and redirects refused."""

    def __init__(self, connector_factory: ConnectorFactory | None = None) -> None:
        self._connector_factory = connector_factory or _pinned_connector

    async def fetch(self, url: str, *, ip: str, max_bytes: int, timeout_s: float) -> FetchedImage:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with aiohttp.ClientSession(connector=self._connector_factory(ip), timeout=timeout,
                                             trust_env=False, auto_decompress=False) as session:
                async with session.get(url, allow_redirects=False,
                                       headers={"Accept": "image/*", "Accept-Encoding": "identity"}) as resp:
                    if resp.status != 200:
                        where = " (redirects are not followed)" if 300 <= resp.status < 400 else ""
                        raise ImageFetchError(f"the image server answered HTTP {resp.status}{where}")
                    if resp.content_length is not None and resp.content_length > max_bytes:
                        raise ImageFetchError(f"the image is {resp.content_length} bytes, more than {max_bytes}",
                                              too_large=True)
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in resp.content.iter_chunked(64 * 1024):
                        size += len(chunk)
                        if size > max_bytes:
                            raise ImageFetchError(f"the image is more than {max_bytes} bytes", too_large=True)
                        chunks.append(chunk)
                    return FetchedImage(resp.content_type, b"".join(chunks))
        except asyncio.TimeoutError:
            raise ImageFetchError(f"fetching the image took longer than {timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            raise ImageFetchError(f"fetching the image failed ({type(exc).__name__})") from None


def _pinned_connector(ip: str) -> Any:
    import aiohttp
    from aiohttp.abc import AbstractResolver, ResolveResult

    class _Pinned(AbstractResolver):
        """Resolves every name to the one address the guard checked."""

        async def resolve(self, host: str, port: int = 0,
                          family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
            fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
            return [ResolveResult(hostname=host, host=ip, port=port, family=fam, proto=0,
                                  flags=socket.AI_NUMERICHOST)]

        async def close(self) -> None:
            pass

    return aiohttp.TCPConnector(resolver=_Pinned(), use_dns_cache=False, force_close=True, limit=1)


# --------------------------------------------------------------------------------------- the guard
class _Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class _Labelled(Protocol):
    def labels(self, *values: str) -> _Counter: ...


class ImageMetrics(Protocol):
    """What the guard counts (``GatewayMetrics`` has these; labels in this order)."""

    @property
    def images(self) -> _Labelled: ...  # {model, source}

    @property
    def image_bytes(self) -> _Labelled: ...  # {model, source}, decoded

    @property
    def images_refused(self) -> _Labelled: ...  # {model, reason}


@dataclass
class _Remote:
    target: dict[str, Any]  # the object holding the URL: target[key] is rewritten to a data: URL
    key: str
    param: str  # the URL's path, for errors
    url: str
    host: str
    port: int


@dataclass
class ImageRequest:
    """One request's images, as :meth:`ImageGuard.inspect` found them."""

    images: int = 0  # image parts (data: and remote)
    tokens: int = 0  # at most this many image tokens (the pixel cap's worth per image; 0 for text-only models)
    remote: list[_Remote] = field(default_factory=list)
    _guard: ImageGuard | None = None
    _model: str = ""

    async def fetch(self) -> bool:
        """Resolve, check and fetch every remote image and inline it as a ``data:`` URL in the body; True
        when the body changed. Raises :class:`InvalidRequest` (param: the part's ``url``) on refusal."""
        if not self.remote or self._guard is None:
            return False
        for remote in self.remote:
            await self._guard._inline(remote, self._model)
        return True


class ImageGuard:
    """Checks image content parts against :class:`MultimodalConfig` (module docstring)."""

    def __init__(self, config: MultimodalConfig, *, accepts_images: bool, metrics: ImageMetrics | None = None,
                 resolver: Resolver | None = None, fetcher: ImageFetcher | None = None,
                 tokens_per_image: int = 0) -> None:
        self.config = config
        self.accepts_images = accepts_images
        self._metrics = metrics
        self._resolver = resolver or system_resolver
        self._fetcher = fetcher or AiohttpFetcher()
        # Upper bound of one image's tokens (28 x 28 pixels per token after Qwen-VL's 2 x 2 merge).
        self.tokens_per_image = tokens_per_image or max(1, config.max_image_pixels // (28 * 28))

    # ------------------------------------------------------------------ step 1: no I/O
    def inspect(self, body: Mapping[str, Any], *, model: str) -> ImageRequest:
        """Validate every image part of ``body`` (module docstring); raises :class:`InvalidRequest`."""
        found = ImageRequest(_guard=self, _model=model)
        accepted: list[int] = []  # decoded sizes of the data: images
        for param, part in _parts(body):
            kind = _media_kind(part)
            if kind is None:
                continue
            if not self.accepts_images:
                self._refuse(model, TEXT_ONLY, f"the model '{model}' does not accept images: {param} is a "
                             f"'{kind}' part; send text only, or use a vision-language model", param,
                             "images_not_supported")
            if kind not in _IMAGE_TYPES:
                self._refuse(model, UNSUPPORTED, f"{param}: content parts of type '{kind}' are not accepted; "
                             "send images as image_url parts", param, "unsupported_content")
            if not isinstance(part.get("type"), str):
                self._refuse(model, INVALID, f"{param}: an image part needs \"type\": \"image_url\"",
                             f"{param}.type", "invalid_type")
            if "uuid" in part:
                self._refuse(model, UNSUPPORTED, f"{param}: 'uuid' (the engine's media cache) is not accepted",
                             f"{param}.uuid", "unsupported_content")
            found.images += 1
            if found.images > self.config.max_images_per_request:
                self._refuse(model, TOO_MANY, f"{param}: more than {self.config.max_images_per_request} images "
                             "in one request (multimodal.max_images_per_request)", param, "too_many_images")
            url, url_param = self._url(part, kind, param, model)
            scheme = url.split(":", 1)[0].lower() if ":" in url else ""
            if scheme == "data":
                accepted.append(self._check_data_url(url, url_param, model))
            elif scheme in ("http", "https"):
                found.remote.append(self._check_remote(part, kind, url, url_param, model))
            else:
                self._refuse(model, URL_NOT_ALLOWED, f"{url_param}: only data: URLs"
                             + (" and allowed http(s) URLs" if self.config.url_allowlist else "")
                             + f" are accepted, not '{scheme or url[:16]}'", url_param, "invalid_image_url")
        if self._metrics is not None:
            for size in accepted:
                self._metrics.images.labels(model, "data").inc()
                self._metrics.image_bytes.labels(model, "data").inc(size)
        if self.accepts_images:
            found.tokens = found.images * self.tokens_per_image
        return found

    def _url(self, part: dict[str, Any], kind: str, param: str, model: str) -> tuple[str, str]:
        if kind == "input_image":  # Responses shape: "image_url" is the URL itself
            url, url_param = part.get("image_url"), f"{param}.image_url"
        else:
            inner = part.get("image_url")
            if not isinstance(inner, dict):
                self._refuse(model, INVALID, f"{param}.image_url: must be an object with a 'url'",
                             f"{param}.image_url", "invalid_type")
            url, url_param = inner.get("url"), f"{param}.image_url.url"
        if not isinstance(url, str) or not url:
            self._refuse(model, INVALID, f"{url_param}: must be a non-empty string", url_param, "invalid_type")
        return url, url_param

    def _check_data_url(self, url: str, param: str, model: str) -> int:
        """The decoded size of a ``data:`` image URL, after checking it (no full decode)."""
        header, sep, payload = url.partition(",")
        media = header[5:].lower()
        if not sep or not media.endswith(";base64"):
            self._refuse(model, INVALID, f"{param}: a data: URL must be base64 (data:image/png;base64,...)",
                         param, "invalid_image")
        mime = media.removesuffix(";base64").split(";", 1)[0].strip()
        if mime not in _DATA_MIME:
            self._refuse(model, INVALID, f"{param}: data: URL media type '{mime}' is not an image type served "
                         "(png, jpeg, gif, webp, bmp)", param, "invalid_image")
        limit = self.config.max_image_bytes
        if len(payload) > 4 * (-(-limit // 3)):  # longer than any base64 of `limit` bytes
            self._refuse(model, TOO_LARGE, f"{param}: the image is more than {limit} bytes "
                         "(multimodal.max_image_bytes)", param, "image_too_large")
        if len(payload) % 4 or not _B64.fullmatch(payload):
            self._refuse(model, INVALID, f"{param}: the data: URL is not valid base64", param, "invalid_image")
        size = len(payload) // 4 * 3 - (len(payload) - len(payload.rstrip("=")))
        if size > limit:
            self._refuse(model, TOO_LARGE, f"{param}: the image is {size} bytes, more than {limit} "
                         "(multimodal.max_image_bytes)", param, "image_too_large")
        try:
            head = base64.b64decode(payload[:_SNIFF_CHARS], validate=True)
        except binascii.Error:
            head = b""
        if _sniff(head) is None:
            self._refuse(model, INVALID, f"{param}: the data is not a PNG, JPEG, GIF, WebP or BMP image",
                         param, "invalid_image")
        return size

    def _check_remote(self, part: dict[str, Any], kind: str, url: str, param: str, model: str) -> _Remote:
        if not self.config.url_allowlist:
            self._refuse(model, URL_NOT_ALLOWED, f"{param}: remote image URLs are not accepted here; send the "
                         "image as a data: URL", param, "image_url_not_allowed")
        try:
            parts = urlsplit(url)
            host = (parts.hostname or "").rstrip(".")
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError:
            self._refuse(model, INVALID, f"{param}: not a valid URL", param, "invalid_image_url")
        if not host or parts.username is not None or parts.password is not None:
            self._refuse(model, INVALID, f"{param}: a remote image URL needs a host and no user name",
                         param, "invalid_image_url")
        if not host_allowed(host, self.config.url_allowlist):
            self._refuse(model, URL_NOT_ALLOWED, f"{param}: the host '{host}' is not in "
                         "multimodal.url_allowlist", param, "image_url_not_allowed")
        if kind == "input_image":  # Responses shape: {"type": "input_image", "image_url": URL}
            return _Remote(target=part, key="image_url", param=param, url=url, host=host, port=port)
        return _Remote(target=part["image_url"], key="url", param=param, url=url, host=host, port=port)

    # ------------------------------------------------------------------ step 2: resolve, check, fetch
    async def _inline(self, remote: _Remote, model: str) -> None:
        param, limit = remote.param, self.config.max_image_bytes
        try:
            addresses = await self._resolver(remote.host, remote.port)
        except (OSError, UnicodeError):
            addresses = []
        if not addresses:
            self._refuse(model, FETCH, f"{param}: the host '{remote.host}' does not resolve", param,
                         "image_fetch_failed")
        for address in addresses:
            why = address_refusal(address)
            if why is not None:
                self._refuse(model, ADDRESS, f"{param}: the host '{remote.host}' resolves to a {why} address; "
                             "only public addresses are fetched", param, "image_url_not_allowed")
        try:
            image = await self._fetcher.fetch(remote.url, ip=addresses[0], max_bytes=limit,
                                              timeout_s=self.config.fetch_timeout_s)
        except ImageFetchError as exc:
            if exc.too_large:
                self._refuse(model, TOO_LARGE, f"{param}: {exc} (multimodal.max_image_bytes)", param,
                             "image_too_large")
            self._refuse(model, FETCH, f"{param}: {exc}", param, "image_fetch_failed")
        if len(image.data) > limit:  # a fetcher that did not stop at max_bytes
            self._refuse(model, TOO_LARGE, f"{param}: the image is more than {limit} bytes", param, "image_too_large")
        mime = _sniff(image.data[:16])
        if mime is None or not image.content_type.lower().startswith("image/"):
            self._refuse(model, INVALID, f"{param}: the URL did not return a PNG, JPEG, GIF, WebP or BMP image",
                         param, "invalid_image")
        remote.target[remote.key] = f"data:{mime};base64," + base64.b64encode(image.data).decode("ascii")
        if self._metrics is not None:
            self._metrics.images.labels(model, "remote").inc()
            self._metrics.image_bytes.labels(model, "remote").inc(len(image.data))

    def _refuse(self, model: str, reason: str, message: str, param: str, code: str) -> NoReturn:
        if self._metrics is not None:
            self._metrics.images_refused.labels(model, reason).inc()
        raise InvalidRequest(message, param=param, code=code)


# --------------------------------------------------------------------------------------- walking bodies
def _parts(body: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(param path, part)`` for every content part object in chat ``messages`` and Responses ``input``."""
    for key in ("messages", "input"):
        items = body.get(key)
        if not isinstance(items, list):
            continue
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                continue
            if key == "input" and isinstance(item.get("type"), str) and item["type"] in _IMAGE_TYPES + _OTHER_MEDIA:
                yield f"{key}[{i}]", item  # a bare part in the input list
                continue
            content = item.get("content")
            if not isinstance(content, list):
                continue
            for j, part in enumerate(content):
                if isinstance(part, dict):
                    yield f"{key}[{i}].content[{j}]", part


def _media_kind(part: Mapping[str, Any]) -> str | None:
    """The media kind of a content part (its ``type``, or for an untyped part the media key vLLM would read
    it by); None for text and every other non-media part."""
    kind = part.get("type")
    if isinstance(kind, str) and kind in _IMAGE_TYPES + _OTHER_MEDIA:
        return kind
    if not isinstance(kind, str) or "uuid" in part:
        for key in _MEDIA_KEYS:
            if key in part:
                return key
    return None
