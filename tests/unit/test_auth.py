"""qwen_serve.gateway.auth: header → Principal, every reject reason, hot reload of the keys file."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from qwen_serve.config import AuthConfig
from qwen_serve.errors import AuthError, ConfigError, ModelNotAllowed
from qwen_serve import keys as keys_module
from qwen_serve.gateway import auth as auth_module
from qwen_serve.gateway.auth import (
    ANONYMOUS,
    AnonymousAuth,
    KeyFileAuth,
    Principal,
    build_authenticator,
)
from qwen_serve.keys import KeysFile, create_key, hash_secret, load_keys_file, revoke_key, rotate_key

NO_LIMITS: dict[str, object] = {"models": None, "rpm": None, "tpm": None, "max_concurrent": None, "expires": None}


def raw(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """Headers as the ASGI server hands them over (``scope["headers"]``)."""
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


def bearer(secret: str) -> list[tuple[bytes, bytes]]:
    return raw({"authorization": f"Bearer {secret}"})


def reason_of(auth: KeyFileAuth | AnonymousAuth, headers: dict[str, str] | list[tuple[bytes, bytes]]) -> str:
    with pytest.raises(AuthError) as info:
        auth.authenticate(raw(headers) if isinstance(headers, dict) else headers)
    assert info.value.status == 401 and info.value.code == "invalid_api_key"
    return info.value.reason


async def eventually(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def works(auth: KeyFileAuth, secret: str) -> bool:
    try:
        auth.authenticate(bearer(secret))
    except AuthError:
        return False
    return True


@pytest.fixture
def keys_path(tmp_path: Path) -> Path:
    return tmp_path / "keys.yaml"


@pytest.fixture
def secret(keys_path: Path) -> str:
    return create_key(keys_path, "team-a", models=["qwen2.5-*"], rpm=60, tpm=1000, max_concurrent=2, expires=None)


# --- Principal --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("models", "model", "allowed"),
    [
        (("*",), "anything", True),
        (("qwen2.5-7b-instruct",), "qwen2.5-7b-instruct", True),
        (("qwen2.5-7b-instruct",), "qwen2.5-0.5b-instruct", False),
        (("qwen2.5-*",), "qwen2.5-0.5b-instruct", True),
        (("qwen2.5-*",), "llama-3", False),
        (("qwen2.5-*",), "Qwen2.5-7B", False),  # case-sensitive, like the served names
        (("a", "b?"), "bc", True),
        ((), "a", False),
    ],
)
def test_principal_allows(models: tuple[str, ...], model: str, allowed: bool) -> None:
    assert Principal("k", models).allows(model) is allowed


def test_principal_require_raises_403() -> None:
    Principal("k", ("qwen2.5-*",)).require("qwen2.5-7b")
    with pytest.raises(ModelNotAllowed) as info:
        Principal("k", ("qwen2.5-*",)).require("llama")
    assert (info.value.status, info.value.type, info.value.code, info.value.param) == (
        403, "permission_error", "model_not_allowed", "model",
    )
    assert info.value.message == "The API key 'k' may not use the model 'llama'."


# --- anonymous --------------------------------------------------------------------------------------------


async def test_anonymous_auth_accepts_everything() -> None:
    auth = AnonymousAuth()
    await auth.start()
    assert auth.authenticate([]) is ANONYMOUS
    assert auth.authenticate(bearer("whatever")) == Principal("anonymous", ("*",), None, None, None)
    assert auth.key_ids == frozenset({"anonymous"})
    await auth.aclose()


def test_build_authenticator(keys_path: Path, secret: str) -> None:
    resolved: list[str] = []

    def resolve(value: str) -> Path:
        resolved.append(value)
        return keys_path

    assert isinstance(build_authenticator(AuthConfig(enabled=False), resolve), AnonymousAuth)
    auth = build_authenticator(AuthConfig(keys_file="k.yaml", reload_interval_s=0.5), resolve)
    assert isinstance(auth, KeyFileAuth) and auth.reload_interval_s == 0.5
    assert resolved == ["k.yaml"]
    assert auth.authenticate(bearer(secret)).key_id == "team-a"


# --- key file: accept and reject --------------------------------------------------------------------------


def test_valid_key_gives_its_principal(keys_path: Path, secret: str) -> None:
    auth = KeyFileAuth(keys_path, 1)
    expected = Principal("team-a", ("qwen2.5-*",), 60, 1000, 2)
    assert auth.authenticate(bearer(secret)) == expected
    assert auth.authenticate(raw({"authorization": f"bearer   {secret}  "})) == expected
    assert auth.authenticate(raw({"x-api-key": secret})) == expected
    assert auth.authenticate(raw({"authorization": "Basic dXNlcjpwYXNz", "x-api-key": secret})) == expected
    assert auth.key_ids == frozenset({"team-a"})


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": ""}, {"authorization": "Bearer "}, {"authorization": "Bearer"},
     {"authorization": "Basic dXNlcjpwYXNz"}, {"x-api-key": "  "}],
)
def test_missing_key(keys_path: Path, secret: str, headers: dict[str, str]) -> None:
    assert reason_of(KeyFileAuth(keys_path, 1), headers) == "missing"


@pytest.mark.parametrize("presented", ["qs-" + "x" * 43, "nonsense", "é" * 10])
def test_invalid_key(keys_path: Path, secret: str, presented: str) -> None:
    auth = KeyFileAuth(keys_path, 1)
    assert reason_of(auth, bearer(presented)) == "invalid"
    assert reason_of(auth, {"x-api-key": presented}) == "invalid"


def test_header_order_and_repeats(keys_path: Path, secret: str) -> None:
    """The first Authorization counts, a bearer token wins over x-api-key in any order, and a first
    Authorization without a bearer token falls back to x-api-key (a later Authorization is ignored)."""
    auth = KeyFileAuth(keys_path, 1)
    first_wins = [(b"authorization", f"Bearer {secret}".encode()), (b"authorization", b"Bearer wrong")]
    assert auth.authenticate(first_wins).key_id == "team-a"
    assert reason_of(auth, first_wins[::-1]) == "invalid"
    key_first = [(b"x-api-key", b"wrong"), (b"authorization", f"Bearer {secret}".encode())]
    assert auth.authenticate(key_first).key_id == "team-a"
    basic_then_key = [(b"authorization", b"Basic dXNlcjpwYXNz"), (b"authorization", b"Bearer wrong"),
                      (b"x-api-key", f" {secret} ".encode())]
    assert auth.authenticate(basic_then_key).key_id == "team-a"
    assert auth.authenticate([(b"x-api-key", secret.encode()), (b"x-api-key", b"wrong")]).key_id == "team-a"
    assert auth.authenticate(raw({"authorization": f"BEARER  {secret}"})).key_id == "team-a"  # scheme in any case
    assert reason_of(auth, raw({"authorization": f"Bearer{secret}"})) == "missing"  # no separator: no scheme


def test_digest_matches_hashlib() -> None:
    """The compact SHA-256 the gateway hashes with gives hashlib's digests (the keys file stores those)."""
    import hashlib

    from qwen_serve.gateway import auth

    for data in (b"", b"qs-" + b"x" * 43, "é".encode() * 100, bytes(range(256)) * 3):
        assert auth.sha256(data).digest() == hashlib.sha256(data).digest()


def test_a_stored_hash_is_not_a_key(keys_path: Path, secret: str) -> None:
    assert reason_of(KeyFileAuth(keys_path, 1), bearer(hash_secret(secret))) == "invalid"


def test_bearer_wins_over_x_api_key(keys_path: Path, secret: str) -> None:
    auth = KeyFileAuth(keys_path, 1)
    assert reason_of(auth, {"authorization": "Bearer wrong", "x-api-key": secret}) == "invalid"


def test_expired_key(keys_path: Path) -> None:
    past = datetime.now(timezone.utc) - timedelta(seconds=1)
    future = datetime.now(timezone.utc) + timedelta(days=1)
    old = create_key(keys_path, "old", **{**NO_LIMITS, "expires": past})  # type: ignore[arg-type]
    new = create_key(keys_path, "new", **{**NO_LIMITS, "expires": future})  # type: ignore[arg-type]
    auth = KeyFileAuth(keys_path, 1)
    with pytest.raises(AuthError, match="'old' expired at") as info:
        auth.authenticate(bearer(old))
    assert info.value.reason == "expired"
    assert auth.authenticate(bearer(new)).key_id == "new"


def test_disabled_key(keys_path: Path, secret: str) -> None:
    revoke_key(keys_path, "team-a")
    assert reason_of(KeyFileAuth(keys_path, 1), bearer(secret)) == "disabled"


def test_messages_never_contain_the_secret(keys_path: Path, secret: str) -> None:
    revoke_key(keys_path, "team-a")
    auth = KeyFileAuth(keys_path, 1)
    for presented in (secret, "qs-" + "y" * 43):
        with pytest.raises(AuthError) as info:
            auth.authenticate(bearer(presented))
        assert presented not in info.value.message and hash_secret(presented) not in info.value.message


# --- start-up ---------------------------------------------------------------------------------------------


def test_missing_file_at_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read keys file"):
        KeyFileAuth(tmp_path / "keys.yaml", 1)


def test_broken_file_at_start_is_an_error(keys_path: Path) -> None:
    keys_path.write_text("keys:\n  - id: a\n    sha256: nope\n")
    with pytest.raises(ConfigError, match=r"keys\[0\].sha256"):
        build_authenticator(AuthConfig(), lambda _: keys_path)


# --- reload -----------------------------------------------------------------------------------------------


async def test_the_watcher_rereads_the_file_only_when_it_changed(keys_path: Path, secret: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[Path] = []

    def counting_load(path: Path) -> KeysFile:
        reads.append(path)
        return load_keys_file(path)

    monkeypatch.setattr(auth_module, "load_keys_file", counting_load)
    auth = KeyFileAuth(keys_path, reload_interval_s=0.01)
    assert len(reads) == 1  # the load at construction
    await auth.start()
    try:
        await asyncio.sleep(0.2)  # about 20 checks of an unchanged file
        assert len(reads) == 1
        other = create_key(keys_path, "team-b", **NO_LIMITS)  # type: ignore[arg-type]
        await eventually(lambda: works(auth, other))
        assert works(auth, secret) and auth.key_ids == frozenset({"team-a", "team-b"})
        await asyncio.sleep(0.2)
        assert len(reads) == 2  # one re-read for the one change
    finally:
        await auth.aclose()


async def test_watcher_picks_up_new_and_revoked_keys(keys_path: Path, secret: str) -> None:
    auth = KeyFileAuth(keys_path, reload_interval_s=0.05)
    await auth.start()
    try:
        held = auth.authenticate(bearer(secret))
        other = create_key(keys_path, "team-b", **NO_LIMITS)  # type: ignore[arg-type]
        await eventually(lambda: works(auth, other))
        revoke_key(keys_path, "team-a")
        await eventually(lambda: not works(auth, secret))
        assert reason_of(auth, bearer(secret)) == "disabled"
        assert held.key_id == "team-a" and held.rpm == 60  # a request's principal is unaffected
        assert works(auth, other)
    finally:
        await auth.aclose()
    assert auth._task is None


async def test_in_place_rewrite_is_detected(keys_path: Path, secret: str) -> None:
    auth = KeyFileAuth(keys_path, reload_interval_s=0.05)
    await auth.start()
    try:
        text = keys_path.read_text()
        keys_path.write_text(text.replace("disabled: false", "disabled: true"))  # same inode
        await eventually(lambda: not works(auth, secret))
    finally:
        await auth.aclose()


async def test_broken_file_keeps_last_good_set_and_logs_once(
    keys_path: Path, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="qwen_serve.gateway.auth")
    auth = KeyFileAuth(keys_path, reload_interval_s=0.02)
    good = keys_path.read_text()
    await auth.start()
    try:
        keys_path.write_text(good + "  rpm: -1\n")  # the last entry now has a bad rpm
        await eventually(lambda: any(r.levelno == logging.WARNING for r in caplog.records))
        await asyncio.sleep(0.2)  # many more ticks
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "keeping the last good set of 1 API keys" in warnings[0].getMessage()
        assert "rpm: must be a positive integer" in warnings[0].getMessage()
        assert works(auth, secret)  # still the last good set

        keys_path.unlink()  # a missing file is a broken file too
        await eventually(lambda: sum(r.levelno == logging.WARNING for r in caplog.records) == 2)
        assert works(auth, secret)

        keys_path.write_text(good.replace("disabled: false", "disabled: true"))  # fixed: applied again
        await eventually(lambda: not works(auth, secret))
    finally:
        await auth.aclose()
    for record in caplog.records:
        assert secret not in record.getMessage() and hash_secret(secret) not in record.getMessage()


def _secret_volume(root: Path, version: str, secret_text: str) -> None:
    """Write a kubelet-style Secret version dir and atomically point ``..data`` at it."""
    (root / version).mkdir()
    (root / version / "keys.yaml").write_text(secret_text)
    tmp_link = root / "..data_tmp"
    tmp_link.symlink_to(version)
    os.replace(tmp_link, root / "..data")  # rename(2) over the old link, as kubelet's AtomicWriter does


async def test_kubernetes_secret_symlink_swap_is_detected(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch.yaml"
    first = create_key(scratch, "team-a", **NO_LIMITS)  # type: ignore[arg-type]
    v1 = scratch.read_text()
    second = create_key(scratch, "team-b", **NO_LIMITS)  # type: ignore[arg-type]
    v2 = scratch.read_text()

    volume = tmp_path / "secret"
    volume.mkdir()
    _secret_volume(volume, "..2026_01_01_00_00_00.1", v1)
    (volume / "keys.yaml").symlink_to("..data/keys.yaml")

    auth = KeyFileAuth(volume / "keys.yaml", reload_interval_s=0.05)
    assert works(auth, first) and not works(auth, second)
    await auth.start()
    try:
        _secret_volume(volume, "..2026_01_01_00_05_00.2", v2)
        await eventually(lambda: works(auth, second))
        assert works(auth, first)
    finally:
        await auth.aclose()


async def test_aclose_without_start_and_double_start(keys_path: Path, secret: str) -> None:
    auth = KeyFileAuth(keys_path, 0.05)
    await auth.aclose()
    await auth.start()
    task = auth._task
    await auth.start()
    assert auth._task is task
    await auth.aclose()


# --- rotation with a grace period -------------------------------------------------------------------------


def test_previous_secret_works_as_the_same_key_until_its_grace_ends(keys_path: Path, secret: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    new = rotate_key(keys_path, "team-a", grace_s=60)
    auth = KeyFileAuth(keys_path, 1)
    assert auth.authenticate(bearer(new)) == auth.authenticate(bearer(secret))
    assert auth.authenticate(bearer(secret)).key_id == "team-a" and auth.key_ids == frozenset({"team-a"})

    later = datetime.now(timezone.utc) + timedelta(seconds=61)

    class _Later(datetime):
        @classmethod
        def now(cls, tz: object = None) -> datetime:  # type: ignore[override]
            return later

    monkeypatch.setattr(keys_module, "datetime", _Later)  # the clock of keys.has_expired
    with pytest.raises(AuthError, match="'team-a' was rotated; its previous secret stopped working") as info:
        auth.authenticate(bearer(secret))
    assert info.value.reason == "expired" and secret not in info.value.message
    assert works(auth, new)  # no reload needed for the grace to end


def test_revoke_ends_the_grace_too(keys_path: Path, secret: str) -> None:
    new = rotate_key(keys_path, "team-a", grace_s=600)
    revoke_key(keys_path, "team-a")
    auth = KeyFileAuth(keys_path, 1)
    assert reason_of(auth, bearer(secret)) == "disabled" and reason_of(auth, bearer(new)) == "disabled"


def test_rotation_without_grace_refuses_the_old_secret(keys_path: Path, secret: str) -> None:
    new = rotate_key(keys_path, "team-a")
    auth = KeyFileAuth(keys_path, 1)
    assert works(auth, new) and reason_of(auth, bearer(secret)) == "invalid"


async def test_a_rotation_reaches_the_running_gateway(keys_path: Path, secret: str) -> None:
    auth = KeyFileAuth(keys_path, 0.02)
    await auth.start()
    try:
        new = rotate_key(keys_path, "team-a", grace_s=60)
        await eventually(lambda: works(auth, new))
        assert works(auth, secret)  # still inside its grace period
        rotate_key(keys_path, "team-a")
        await eventually(lambda: not works(auth, secret) and not works(auth, new))
    finally:
        await auth.aclose()
