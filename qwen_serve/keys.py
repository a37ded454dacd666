"""The API keys file: parse and validate it; create, rotate, revoke and list entries.

The file is YAML with one top-level key, ``keys``, a list of entries::

    keys:
      - id: team-a                      # the key_id metric label: letters, digits, ".", "_", "-"
        sha256: 9f86d081884c7d65…       # SHA-256 hex of the secret; the secret itself is never stored
        models: ["*"]                   # exact names or fnmatch patterns ("qwen2.5-*"); default all
        rpm: 60                         # requests per minute (optional)
        tpm: 100000                     # prompt+completion tokens per minute (optional)
        max_concurrent: 4               # requests in flight (optional)
        expires: 2026-12-31T00:00:00Z   # optional; kept in UTC; a date or a time without offset means UTC
        created: 2026-01-05T09:30:00Z   # optional, written by ``keys create``
        disabled: false
        previous_sha256: 2c26b46b68ffc6…  # optional, written by ``keys rotate --grace S``: the secret
        previous_expires: 2026-02-01T10:00:00Z  # before the rotation stays valid until then (both or neither)

``keys: []`` is a valid file (every request is refused); an *empty* file is an error, so a writer that
truncates before writing never revokes every key at once.

Who calls what:

* :class:`~qwen_serve.gateway.auth.KeyFileAuth` calls :func:`load_keys_file` at start-up and whenever the
  file changes.
* ``qwen-serve keys create|rotate|revoke`` call :func:`create_key` / :func:`rotate_key` / :func:`revoke_key`.
  They rewrite the whole file atomically (temporary file in the same directory, fsync, rename), so a watcher
  never sees half a file; comments are not preserved. They are not safe against two concurrent writers.
  ``qwen-serve keys list`` reads :func:`load_keys_file` and shows :meth:`KeyEntry.state`.

A key is usable while it is not ``disabled`` and not past ``expires``. After a rotation with a grace period
its previous secret is usable too, as the same key, until ``previous_expires`` (or ``expires``, if sooner);
revoking the key ends both. Hashes (current and previous) are unique across the file.

Every problem raises :class:`~qwen_serve.errors.ConfigError` naming the file and the entry
(``keys.yaml: keys[2].rpm: must be a positive integer``). Messages never contain secrets or hashes.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import secrets
import stat
import tempfile
from collections.abc import Sequence
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator

from qwen_serve.constants import ANONYMOUS_KEY_ID
from qwen_serve.errors import ConfigError
from qwen_serve.yaml_errors import format_validation_error, format_yaml_error

__all__ = [
    "SECRET_PREFIX",
    "KeyEntry",
    "KeysFile",
    "create_key",
    "generate_secret",
    "has_expired",
    "hash_secret",
    "load_keys_file",
    "parse_keys",
    "revoke_key",
    "rotate_key",
]

SECRET_PREFIX = "qs-"
_SECRET_BYTES = 32  # secrets.token_urlsafe(32) → 43 url-safe characters
_HEADER = (
    "# qwen-serve API keys: only SHA-256 hashes of the secrets are stored.\n"
    "# Managed by `qwen-serve keys create|rotate|revoke|list`; re-read by the gateway while it runs.\n"
)

_Limit = Annotated[int, Field(strict=True, gt=0)]
_Pattern = Annotated[str, Field(min_length=1)]

# One message per field, so errors read the same whatever pydantic's error type was.
_FIELD_MESSAGES = {
    "id": "must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit",
    "sha256": "must be the 64-character hex SHA-256 of the secret",
    "models": "must be a non-empty list of model names or patterns ('*' for all)",
    "rpm": "must be a positive integer",
    "tpm": "must be a positive integer",
    "max_concurrent": "must be a positive integer",
    "expires": "must be an ISO 8601 date or date-time",
    "created": "must be an ISO 8601 date or date-time",
    "disabled": "must be true or false",
    "previous_sha256": "must be the 64-character hex SHA-256 of the previous secret",
    "previous_expires": "must be an ISO 8601 date or date-time",
    "keys": "must be a list of key entries",
}


def has_expired(expires: datetime | None, now: datetime | None = None) -> bool:
    """Whether a secret valid until ``expires`` (aware, UTC) no longer is at ``now`` (default: the current
    time): true from ``expires`` on, never when it is ``None``. The gateway's check and ``keys list`` both."""
    return expires is not None and expires <= (now or datetime.now(timezone.utc))


class KeyEntry(BaseModel):
    """One key: who it is (``id``), how to recognise it (``sha256``), what it may do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    models: tuple[_Pattern, ...] = Field(default=("*",), min_length=1)
    rpm: _Limit | None = None
    tpm: _Limit | None = None
    max_concurrent: _Limit | None = None
    expires: datetime | None = None
    created: datetime | None = None
    disabled: StrictBool = False
    previous_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    previous_expires: datetime | None = None

    @field_validator("id")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value == ANONYMOUS_KEY_ID:
            raise ValueError(f"'{ANONYMOUS_KEY_ID}' is reserved for auth.enabled: false")
        return value

    @field_validator("sha256", "previous_sha256", mode="before")
    @classmethod
    def _lower_hex(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("expires", "created", "previous_expires", mode="before")
    @classmethod
    def _date_is_midnight(cls, value: Any) -> Any:
        if isinstance(value, date) and not isinstance(value, datetime):
            return datetime(value.year, value.month, value.day, tzinfo=timezone.utc)
        return value

    @field_validator("expires", "created", "previous_expires")
    @classmethod
    def _to_utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)

    @model_validator(mode="after")
    def _previous_pair(self) -> KeyEntry:
        if (self.previous_sha256 is None) != (self.previous_expires is None):
            raise ValueError("previous_sha256 and previous_expires go together (written by `keys rotate --grace`)")
        return self

    def is_expired(self, now: datetime | None = None) -> bool:
        """True once ``expires`` has passed (never when it is unset)."""
        return has_expired(self.expires, now)

    def previous_valid_until(self, now: datetime | None = None) -> datetime | None:
        """Until when the secret before the last rotation is still accepted, or ``None`` when it is not."""
        if self.previous_expires is None or self.disabled:
            return None
        until = min(self.previous_expires, self.expires) if self.expires is not None else self.previous_expires
        return None if has_expired(until, now) else until

    def state(self, now: datetime | None = None) -> str:
        """``revoked``, ``expired``, ``active``, or ``active, previous secret until <time>`` (UTC, seconds)."""
        now = now or datetime.now(timezone.utc)
        if self.disabled:
            return "revoked"
        if self.is_expired(now):
            return "expired"
        previous = self.previous_valid_until(now)
        return "active" if previous is None else f"active, previous secret until {_iso(previous)}"


class KeysFile(BaseModel):
    """The whole file. Ids and hashes are unique (checked by :func:`parse_keys`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: tuple[KeyEntry, ...] = ()

    def get(self, key_id: str) -> KeyEntry | None:
        return next((k for k in self.keys if k.id == key_id), None)


def hash_secret(secret: str) -> str:
    """The SHA-256 hex digest stored for ``secret``."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def generate_secret() -> str:
    """A new secret: ``qs-`` + 43 url-safe characters (256 random bits)."""
    return SECRET_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)


def parse_keys(data: Any, source: str = "keys file") -> KeysFile:
    """Validate already-parsed YAML; ``source`` prefixes every error message."""
    if data is None:
        raise ConfigError(f"{source}: file is empty (write 'keys: []' for a file without keys)")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping with a 'keys' list")
    try:
        parsed = KeysFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {format_validation_error(exc, _FIELD_MESSAGES)}") from None
    problems: list[str] = []
    first_id: dict[str, int] = {}
    first_hash: dict[str, int] = {}
    for i, key in enumerate(parsed.keys):
        if key.id in first_id:
            problems.append(f"keys[{i}].id: duplicate id '{key.id}' (also keys[{first_id[key.id]}])")
        first_id.setdefault(key.id, i)
        for field, digest in (("sha256", key.sha256), ("previous_sha256", key.previous_sha256)):
            if digest is None:
                continue
            if digest in first_hash:
                problems.append(f"keys[{i}].{field}: same secret as keys[{first_hash[digest]}]")
            first_hash.setdefault(digest, i)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return parsed


def load_keys_file(path: Path) -> KeysFile:
    """Read and validate the keys file; :class:`ConfigError` naming the problem when it is missing or broken."""
    return parse_keys(_read_yaml(Path(path)), str(path))


def create_key(
    path: Path,
    key_id: str,
    *,
    models: Sequence[str] | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    max_concurrent: int | None = None,
    expires: datetime | None = None,
) -> str:
    """Append a new key to ``path`` (created if missing) and return its secret, which is stored nowhere.

    Refuses (``ConfigError``, file untouched) a duplicate id, invalid settings, or an existing file that is
    broken.
    """
    path = Path(path)
    data: dict[str, Any] = _read_yaml(path) if path.exists() else {"keys": []}
    current = parse_keys(data, str(path))
    existing = current.get(key_id)
    if existing is not None:
        rotate = f"`qwen-serve keys rotate --file {path} --id {key_id}`"
        if existing.disabled:
            raise ConfigError(f"{path}: key '{key_id}' exists and is revoked; {rotate} gives it a new secret and "
                              f"enables it again (same id, models and limits), or choose another id")
        raise ConfigError(f"{path}: a key with id '{key_id}' already exists; {rotate} gives it a new secret "
                          f"(add --grace SECONDS to keep the old one valid meanwhile), or choose another id")
    secret = generate_secret()
    raw: dict[str, Any] = {"id": key_id, "sha256": hash_secret(secret), "models": list(models or ["*"])}
    for name, value in (("rpm", rpm), ("tpm", tpm), ("max_concurrent", max_concurrent), ("expires", expires)):
        if value is not None:
            raw[name] = value
    raw["created"] = datetime.now(timezone.utc).replace(microsecond=0)
    raw["disabled"] = False
    try:
        entry = KeyEntry.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, _FIELD_MESSAGES)) from None
    if entry.expires is not None:
        raw["expires"] = entry.expires  # normalised to UTC
    _write_atomic(path, {**data, "keys": [*(data.get("keys") or []), raw]})
    return secret


def rotate_key(path: Path, key_id: str, *, grace_s: float = 0, expires: datetime | None = None) -> str:
    """Give ``key_id`` a new secret and return it; the file keeps only its hash.

    The old secret stays valid for ``grace_s`` seconds (``previous_sha256`` / ``previous_expires``; 0: it stops
    at once). An earlier rotation's secret, still in its grace period, stops at once. A revoked key is enabled
    again, and neither a revoked nor an expired secret gets a grace period. ``expires`` replaces the key's expiry (required when
    it has passed). Models, limits and ``created`` are kept. ``ConfigError``, file untouched, for an unknown
    id, a negative grace, an expiry in the past, or a broken file.
    """
    path = Path(path)
    if not grace_s >= 0:
        raise ConfigError(f"--grace: must be 0 or more seconds (got {grace_s:g})")
    data = _read_yaml(path)
    current = parse_keys(data, str(path))
    index = next((i for i, k in enumerate(current.keys) if k.id == key_id), None)
    if index is None:
        raise ConfigError(f"{path}: no key with id '{key_id}' (create it with `qwen-serve keys create`)")
    entry = current.keys[index]
    now = datetime.now(timezone.utc).replace(microsecond=0)
    new_expires = _utc(expires) if expires is not None else entry.expires
    if new_expires is not None and new_expires <= now:
        raise ConfigError(f"{path}: key '{key_id}' expires{'d' if expires is None else ''} at {_iso(new_expires)}; "
                          f"pass --expires with a later time")
    secret = generate_secret()
    raw: dict[str, Any] = dict(data["keys"][index])
    raw.pop("previous_sha256", None)
    raw.pop("previous_expires", None)
    raw["sha256"] = hash_secret(secret)
    if expires is not None:
        raw["expires"] = new_expires
    if grace_s > 0 and not entry.disabled and not entry.is_expired(now):  # never revive a dead secret
        raw["previous_sha256"] = entry.sha256
        raw["previous_expires"] = now + timedelta(seconds=math.ceil(grace_s))
    raw["disabled"] = False
    data["keys"][index] = raw
    parse_keys(data, str(path))  # the result must be a valid file before it replaces the old one
    _write_atomic(path, data)
    return secret


def revoke_key(path: Path, key_id: str) -> None:
    """Set ``disabled: true`` on ``key_id`` (idempotent); ``ConfigError`` for an unknown id or a broken file."""
    path = Path(path)
    data = _read_yaml(path)
    current = parse_keys(data, str(path))
    index = next((i for i, k in enumerate(current.keys) if k.id == key_id), None)
    if index is None:
        raise ConfigError(f"{path}: no key with id '{key_id}'")
    data["keys"][index]["disabled"] = True
    _write_atomic(path, data)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _iso(value: datetime) -> str:
    """``2026-02-01T10:00:00Z``: UTC to the second, as the file and ``keys list`` show times."""
    return _utc(value).replace(microsecond=0).isoformat().replace("+00:00", "Z")


_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10x faster; the gateway re-reads on its loop


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"{path}: cannot read keys file ({reason})") from None
    try:
        return yaml.load(text, Loader=_SAFE_LOADER)  # noqa: S506 - a safe loader (libyaml's when built with it)
    except yaml.YAMLError as exc:  # the message never quotes the offending line, which may hold a hash
        raise ConfigError(format_yaml_error(exc, str(path))) from None


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    text = _HEADER + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, allow_unicode=True)
    target = Path(os.path.realpath(path))  # keep a symlinked keys file a symlink
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write keys file ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if target.exists():
            os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ConfigError(f"{path}: cannot write keys file ({exc.strerror or exc})") from None
    with contextlib.suppress(OSError):  # make the rename durable
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
