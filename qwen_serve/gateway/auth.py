"""Stage 1 of the gateway pipeline: request headers → :class:`Principal`.

The pipeline calls ``authenticator.authenticate(headers)`` first, once per request, with the raw ASGI
headers (``scope["headers"]``: ``(name, value)`` byte pairs, names lower-case as ASGI servers send them;
no header object is built on the hot path). The key is read from ``Authorization: Bearer <key>`` or,
failing that, ``x-api-key``. It returns the caller's :class:`Principal` or raises
:class:`~qwen_serve.errors.AuthError` (401) whose ``reason`` — ``missing``, ``invalid``, ``expired`` or
``disabled`` — is the ``qwen_serve_auth_failures_total`` label. ``principal.require(model)`` raises
:class:`~qwen_serve.errors.ModelNotAllowed` (403); ``principal.allows(model)`` filters ``/v1/models``.

Implementations (:func:`build_authenticator` picks one from :class:`~qwen_serve.config.AuthConfig`):

* :class:`AnonymousAuth` (``auth.enabled: false``): everyone is ``anonymous``, every model, no limits.
* :class:`KeyFileAuth`: the keys file (:mod:`qwen_serve.keys`). The presented secret (its header bytes, as
  sent) is hashed with SHA-256 and looked up by digest, then confirmed with :func:`hmac.compare_digest`;
  timing depends only on the hash of what was presented, never on a stored secret (none is stored, not
  even in memory). Secrets and hashes are never logged. The hot path stays in bytes: no header object, no
  text decoding, raw 32-byte digests, CPython's compact SHA-256 (about 1 µs per request in a tight loop,
  3 µs in the serving gateway, where its code and data are cold each time).
  A key rotated with a grace period (``qwen-serve keys rotate --grace S``) has two digests in the lookup
  table, the new secret's and the previous one's, both giving the same :class:`Principal`; the previous one
  carries its own expiry (``previous_expires``, or the key's ``expires`` if sooner), checked like any other,
  so a request costs the same whichever secret it presents and no reload is needed when the grace ends.

Reload: the app's lifespan owns the authenticator — ``await auth.start()`` after construction,
``await auth.aclose()`` on exit. :class:`KeyFileAuth` then checks the file every ``reload_interval_s``
(``os.stat`` following symlinks, the resolved path, and the ``..data`` link Kubernetes swaps when a Secret
changes) and re-reads it when anything changed. A broken or missing file keeps the last good key set and
logs the reason at WARNING (once per change). A :class:`Principal` is immutable, so a request keeps the
identity it was admitted with; a revoke affects only later requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import importlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Protocol

from qwen_serve.config import AuthConfig
from qwen_serve.constants import ANONYMOUS_KEY_ID, API_KEY_HEADER
from qwen_serve.errors import AuthError, ConfigError, ModelNotAllowed
from qwen_serve.keys import KeysFile, has_expired, load_keys_file

__all__ = [
    "ANONYMOUS",
    "AnonymousAuth",
    "Authenticator",
    "KeyFileAuth",
    "Principal",
    "RawHeaders",
    "build_authenticator",
]

logger = logging.getLogger(__name__)

RawHeaders = Sequence[tuple[bytes, bytes]]


class _Hash(Protocol):
    def digest(self) -> bytes: ...


def _compact_sha256() -> Callable[[bytes], _Hash]:
    """CPython's own SHA-256 (``_sha2`` from 3.12, ``_sha256`` before), else OpenSSL's via :mod:`hashlib`.

    The same digest either way. The gateway hashes one short secret per request, between everything else
    the request does, so the code is cold every time: measured in the running gateway, OpenSSL's EVP path
    took 2.3 to 4.4 µs per request and CPython's compact implementation 0.7 to 1.1 µs (in a tight loop both
    take 0.3 µs). Builds without the built-in hashes (``--without-builtin-hashlib-hashes``, e.g. for FIPS)
    fall back to OpenSSL.
    """
    for name in ("_sha2", "_sha256"):
        try:
            return importlib.import_module(name).sha256  # type: ignore[no-any-return]
        except (ImportError, AttributeError):
            continue
    return hashlib.sha256


sha256 = _compact_sha256()
_API_KEY_HEADER = API_KEY_HEADER.encode()
_MISSING = "Missing API key. Send it as 'Authorization: Bearer <key>' or in the 'x-api-key' header."
_INVALID = "Incorrect API key provided."


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling and what they may do. ``None`` limits are unlimited."""

    key_id: str
    models: tuple[str, ...] = ("*",)
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None

    def allows(self, model: str) -> bool:
        """Whether ``model`` matches one of ``models`` (exact, ``*``, or an fnmatch pattern, case-sensitive)."""
        return any(p == "*" or p == model or fnmatchcase(model, p) for p in self.models)

    def require(self, model: str) -> None:
        """Raise :class:`ModelNotAllowed` (403, ``param="model"``) unless :meth:`allows`: the gateway's one
        model-scope check (the pipeline's, for every route that names a model)."""
        if not self.allows(model):
            raise ModelNotAllowed(f"The API key '{self.key_id}' may not use the model '{model}'.", param="model")


ANONYMOUS = Principal(ANONYMOUS_KEY_ID, ("*",), None, None, None)


class Authenticator(Protocol):
    """What the pipeline needs from an auth backend."""

    @property
    def key_ids(self) -> frozenset[str]:
        """Every configured key id: the only ``key_id`` label values besides ``anonymous``."""
        ...

    def authenticate(self, headers: RawHeaders) -> Principal:
        """The caller's principal, or :class:`AuthError` with ``reason``."""
        ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


class AnonymousAuth:
    """``auth.enabled: false``: every request is :data:`ANONYMOUS`, whatever it sends."""

    key_ids: frozenset[str] = frozenset({ANONYMOUS_KEY_ID})

    def authenticate(self, headers: RawHeaders) -> Principal:
        return ANONYMOUS

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class _Record:
    principal: Principal
    digest: bytes  # the raw SHA-256 of the secret (the file stores it as hex)
    expires: datetime | None
    disabled: bool
    previous: bool = False  # the secret before a rotation, accepted until ``expires`` (its grace period)


@dataclass(frozen=True, slots=True)
class _KeySet:
    """One immutable snapshot of the file, swapped in whole on reload."""

    by_digest: dict[bytes, _Record]
    key_ids: frozenset[str]

    @classmethod
    def from_file(cls, keys: KeysFile) -> _KeySet:
        records = {}
        for k in keys.keys:
            digest = bytes.fromhex(k.sha256)
            principal = Principal(k.id, k.models, k.rpm, k.tpm, k.max_concurrent)
            records[digest] = _Record(principal, digest, k.expires, k.disabled)
            if k.previous_sha256 is not None and k.previous_expires is not None:
                old = bytes.fromhex(k.previous_sha256)
                until = k.previous_expires if k.expires is None else min(k.previous_expires, k.expires)
                records[old] = _Record(principal, old, until, k.disabled, previous=True)
        return cls(records, frozenset(k.id for k in keys.keys))


_Signature = tuple[object, ...]


def _signature(path: Path) -> _Signature | None:
    """What changes when the file is rewritten, replaced, or its Secret ``..data`` link swapped."""
    try:
        st = os.stat(path)  # follows symlinks
        real = os.path.realpath(path)
    except OSError:
        return None
    try:
        data_link: str | None = os.readlink(path.parent / "..data")
    except OSError:
        data_link = None
    return (real, data_link, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class KeyFileAuth:
    """Keys from a YAML keys file, re-read while serving.

    Construction loads the file and raises :class:`ConfigError` when it is missing or broken: the gateway
    must not start without keys when auth is enabled.
    """

    def __init__(self, path: Path, reload_interval_s: float = 2.0) -> None:
        self.path = Path(path)
        self.reload_interval_s = reload_interval_s
        self._task: asyncio.Task[None] | None = None
        self._last_failure: tuple[_Signature | None, str] | None = None
        signature = _signature(self.path)  # before reading: a change in between is seen on the next check
        keys = load_keys_file(self.path)
        self._set = _KeySet.from_file(keys)
        self._signature = signature
        logger.info("loaded %d API keys from %s", len(keys.keys), self.path)

    @property
    def key_ids(self) -> frozenset[str]:
        return self._set.key_ids

    def authenticate(self, headers: RawHeaders) -> Principal:
        # In bytes end to end. Measured with the limiter's ledgers: auth + limits 32,000 → 21,400 instructions
        # of a ~444,000-instruction request, −2.4% (benchmarks/RESULTS.md, 2026-11-29, "auth in bytes").
        digest = sha256(_presented_secret(headers)).digest()
        record = self._set.by_digest.get(digest)
        if record is None or not hmac.compare_digest(record.digest, digest):
            raise AuthError(_INVALID, reason="invalid")
        key_id = record.principal.key_id
        if record.disabled:
            raise AuthError(f"The API key '{key_id}' has been revoked.", reason="disabled")
        expires = record.expires
        if expires is not None and has_expired(expires):
            if record.previous:
                raise AuthError(f"The API key '{key_id}' was rotated; its previous secret stopped working at "
                                f"{expires.isoformat()}.", reason="expired")
            raise AuthError(f"The API key '{key_id}' expired at {expires.isoformat()}.", reason="expired")
        return record.principal

    async def start(self) -> None:
        """Start the watcher task (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._watch(), name="qwen-serve-keys-watcher")

    async def aclose(self) -> None:
        """Stop the watcher task."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval_s)
            try:
                # All on the loop: the stat is a few µs, and re-reading a changed file takes ~5 ms for 100
                # keys (~60 ms for 1,000). Not in a thread: while the loop relays a stream it releases the
                # GIL for every socket call and takes it straight back, so a waiting thread is woken at each
                # release but never times out to claim it (CPython's convoy effect). A reload in a thread
                # was held until the stream ended (3.4 to 3.7 s in CI) and a revoke came late.
                signature = _signature(self.path)
                if signature is None or signature != self._signature:
                    self._reload(signature)
            except Exception:  # never let the watcher die; the next tick retries
                logger.exception("checking the keys file %s failed", self.path)

    def _reload(self, signature: _Signature | None) -> None:
        try:
            keys = load_keys_file(self.path)
        except ConfigError as exc:
            # The signature of the good set stays, so every tick retries; log each distinct failure once.
            if self._last_failure != (signature, exc.message):
                self._last_failure = (signature, exc.message)
                logger.warning("keeping the last good set of %d API keys: %s", len(self._set.by_digest), exc.message)
            return
        self._set = _KeySet.from_file(keys)
        self._signature = signature
        self._last_failure = None
        logger.info("reloaded %d API keys from %s", len(keys.keys), self.path)


def _presented_secret(headers: RawHeaders) -> bytes:
    """The secret as sent: the token of ``Authorization: Bearer <token>`` (scheme case-insensitive), else the
    ``x-api-key`` value; surrounding whitespace removed. Bytes, as the secret's SHA-256 is taken over its
    UTF-8 bytes (``keys.hash_secret``) and secrets are sent as those bytes. The first of repeated headers
    counts. Stops at the first ``Authorization`` that carries a bearer token (the usual request), so the
    headers after it are not scanned."""
    api_key: bytes | None = None
    seen_authorization = False
    for name, value in headers:
        if name == b"authorization":
            if seen_authorization:
                continue
            seen_authorization = True
            if value[:7] == b"Bearer ":  # the common spelling, without splitting
                token = value[7:].strip()
            else:
                scheme, _, token = value.strip().partition(b" ")
                token = token.strip() if scheme.lower() == b"bearer" else b""
            if token:
                return token
        elif name == _API_KEY_HEADER and api_key is None:
            api_key = value
    if api_key is not None:
        api_key = api_key.strip()
        if api_key:
            return api_key
    raise AuthError(_MISSING, reason="missing")


def build_authenticator(auth_config: AuthConfig, resolve_path: Callable[[str], Path]) -> Authenticator:
    """:class:`KeyFileAuth` on ``resolve_path(auth_config.keys_file)``, or :class:`AnonymousAuth` when disabled.

    Raises :class:`ConfigError` when auth is enabled and the keys file is missing or broken.
    """
    if not auth_config.enabled:
        return AnonymousAuth()
    return KeyFileAuth(resolve_path(auth_config.keys_file), auth_config.reload_interval_s)
