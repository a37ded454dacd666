"""qwen_serve.keys: the keys file format, create, rotate, revoke and each key's state."""

from __future__ import annotations

import hashlib
import os
import re
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from qwen_serve.errors import ConfigError
from qwen_serve.keys import (
    KeysFile,
    create_key,
    generate_secret,
    has_expired,
    hash_secret,
    load_keys_file,
    parse_keys,
    revoke_key,
    rotate_key,
)

SECRET_RE = re.compile(r"^qs-[A-Za-z0-9_-]{43}$")
HASH = "a" * 64


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def entry(key_id: str = "a", sha: str = HASH, **extra: object) -> dict[str, object]:
    return {"id": key_id, "sha256": sha, **extra}


def error_of(data: object) -> str:
    with pytest.raises(ConfigError) as info:
        parse_keys(data, "keys.yaml")
    return info.value.message


# --- hashing and secrets ----------------------------------------------------------------------------------


def test_hash_secret_is_sha256_hex() -> None:
    assert hash_secret("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_generated_secrets_have_the_contract_format_and_differ() -> None:
    secrets = {generate_secret() for _ in range(50)}
    assert len(secrets) == 50
    assert all(SECRET_RE.match(s) for s in secrets)


# --- parsing ----------------------------------------------------------------------------------------------


def test_minimal_entry_gets_defaults() -> None:
    parsed = parse_keys({"keys": [entry()]})
    key = parsed.keys[0]
    assert (key.models, key.rpm, key.tpm, key.max_concurrent, key.expires, key.disabled) == (
        ("*",), None, None, None, None, False,
    )


def test_full_entry_round_trips_from_yaml(tmp_path: Path) -> None:
    path = write(tmp_path / "keys.yaml", f"""
keys:
  - id: team-a
    sha256: {HASH.upper()}
    models: ["qwen2.5-*", "other"]
    rpm: 60
    tpm: 100000
    max_concurrent: 4
    expires: 2030-01-02T03:04:05+02:00
    disabled: true
""")
    key = load_keys_file(path).keys[0]
    assert key.sha256 == HASH  # normalised to lower case
    assert key.models == ("qwen2.5-*", "other")
    assert (key.rpm, key.tpm, key.max_concurrent, key.disabled) == (60, 100000, 4, True)
    assert key.expires == datetime(2030, 1, 2, 1, 4, 5, tzinfo=timezone.utc)


def test_dates_and_naive_times_are_utc() -> None:
    parsed = parse_keys({"keys": [entry("a", expires=date(2030, 1, 1)),
                                  entry("b", "b" * 64, expires=datetime(2030, 1, 1, 12))]})
    assert parsed.keys[0].expires == datetime(2030, 1, 1, tzinfo=timezone.utc)
    assert parsed.keys[1].expires == datetime(2030, 1, 1, 12, tzinfo=timezone.utc)
    assert parsed.keys[0].is_expired(datetime(2030, 1, 1, tzinfo=timezone.utc))
    assert not parsed.keys[0].is_expired(datetime(2029, 12, 31, tzinfo=timezone.utc))


def test_empty_list_is_valid_but_empty_file_is_not() -> None:
    assert parse_keys({"keys": []}) == KeysFile()
    assert "file is empty" in error_of(None)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"keys": [entry(), entry("b", "b" * 64), entry("c", "c" * 64, rpm=0)]},
         "keys.yaml: keys[2].rpm: must be a positive integer"),
        ({"keys": [entry(tpm=-5)]}, "keys[0].tpm: must be a positive integer"),
        ({"keys": [entry(max_concurrent="4")]}, "keys[0].max_concurrent: must be a positive integer"),
        ({"keys": [entry(rpm=True)]}, "keys[0].rpm: must be a positive integer"),
        ({"keys": [entry(rpm=1.5)]}, "keys[0].rpm: must be a positive integer"),
        ({"keys": [entry(sha="xyz")]}, "keys[0].sha256: must be the 64-character hex SHA-256"),
        ({"keys": [entry(key_id="has space")]}, "keys[0].id: must be 1-64 characters"),
        ({"keys": [entry(key_id="anonymous")]}, "keys[0].id: 'anonymous' is reserved"),
        ({"keys": [entry(models=[])]}, "keys[0].models: must be a non-empty list"),
        ({"keys": [entry(models=[""])]}, "keys[0].models[0]: must be a non-empty list"),
        ({"keys": [entry(expires="soon")]}, "keys[0].expires: must be an ISO 8601"),
        ({"keys": [entry(disabled="no")]}, "keys[0].disabled: must be true or false"),
        ({"keys": [entry(color="red")]}, "keys[0].color: unknown key"),
        ({"keys": [{"id": "a"}]}, "keys[0].sha256: required key is missing"),
        ({"keys": ["qs-abc"]}, "keys[0]: must be a mapping"),
        ({"keys": 3}, "keys: must be a list of key entries"),
        ({"keys": [], "extra": 1}, "extra: unknown key"),
        (["keys"], "top level must be a mapping"),
        ({"keys": [entry("a"), entry("b", "b" * 64), entry("a", "c" * 64)]},
         "keys[2].id: duplicate id 'a' (also keys[0])"),
        ({"keys": [entry("a"), entry("b")]}, "keys[1].sha256: same secret as keys[0]"),
    ],
)
def test_invalid_files_name_the_problem(data: object, message: str) -> None:
    assert message in error_of(data)


def test_errors_never_echo_hashes() -> None:
    bad_hash = "f" * 63
    assert bad_hash not in error_of({"keys": [entry(sha=bad_hash)]})


def test_invalid_yaml_names_the_line_without_quoting_it(tmp_path: Path) -> None:
    path = write(tmp_path / "keys.yaml", f"keys:\n  - id: a\n    sha256: {HASH}\n\t- id: b\n")
    with pytest.raises(ConfigError) as info:
        load_keys_file(path)
    assert "invalid YAML" in info.value.message and "line 4" in info.value.message
    assert HASH not in info.value.message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read keys file"):
        load_keys_file(tmp_path / "nope.yaml")


# --- create -----------------------------------------------------------------------------------------------


def test_create_makes_the_file_and_stores_only_the_hash(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "keys.yaml"
    secret = create_key(path, "team-a", models=None, rpm=None, tpm=None, max_concurrent=None, expires=None)
    assert SECRET_RE.match(secret)
    text = path.read_text()
    assert secret not in text and secret[3:] not in text
    assert hashlib.sha256(secret.encode()).hexdigest() in text
    key = load_keys_file(path).keys[0]
    assert (key.id, key.sha256, key.models, key.disabled) == ("team-a", hash_secret(secret), ("*",), False)
    assert key.created is not None
    assert sorted(os.listdir(path.parent)) == ["keys.yaml"]  # no temporary file left behind


def test_create_appends_with_settings(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    first = create_key(path, "a", models=None, rpm=None, tpm=None, max_concurrent=None, expires=None)
    expires = datetime(2031, 5, 6, 7, 8, 9, tzinfo=timezone(timedelta(hours=2)))
    second = create_key(path, "b", models=["qwen2.5-*", "x"], rpm=60, tpm=1000, max_concurrent=3, expires=expires)
    assert first != second
    keys = load_keys_file(path).keys
    assert [k.id for k in keys] == ["a", "b"]
    b = keys[1]
    assert (b.models, b.rpm, b.tpm, b.max_concurrent) == (("qwen2.5-*", "x"), 60, 1000, 3)
    assert b.expires == expires and b.expires.utcoffset() == timedelta(0)
    raw = yaml.safe_load(path.read_text())["keys"]
    assert "rpm" not in raw[0] and "expires" not in raw[0]  # unset limits are not written as nulls


def test_create_refuses_a_duplicate_id_and_leaves_the_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    create_key(path, "a", models=None, rpm=None, tpm=None, max_concurrent=None, expires=None)
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        create_key(path, "a", models=None, rpm=None, tpm=None, max_concurrent=None, expires=None)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rpm": 0}, "rpm: must be a positive integer"),
        ({"models": ["ok", ""]}, "models[1]"),
        ({"key_id": "bad id"}, "id: must be"),
        ({"key_id": "anonymous"}, "reserved"),
    ],
)
def test_create_validates_its_arguments(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    path = tmp_path / "keys.yaml"
    args: dict[str, object] = {"models": None, "rpm": None, "tpm": None, "max_concurrent": None, "expires": None}
    key_id = str(kwargs.pop("key_id", "a"))
    args.update(kwargs)
    with pytest.raises(ConfigError, match=re.escape(message)):
        create_key(path, key_id, **args)  # type: ignore[arg-type]
    assert not path.exists()


def test_create_refuses_to_rewrite_a_broken_file(tmp_path: Path) -> None:
    path = write(tmp_path / "keys.yaml", "keys: [[[\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        create_key(path, "a", models=None, rpm=None, tpm=None, max_concurrent=None, expires=None)
    assert path.read_text() == "keys: [[[\n"


def test_create_through_a_symlink_keeps_the_link(tmp_path: Path) -> None:
    real = tmp_path / "real.yaml"
    create_key(real, "a", models=None, rpm=None, tpm=None, max_concurrent=None, expires=None)
    link = tmp_path / "keys.yaml"
    link.symlink_to(real)
    create_key(link, "b", models=None, rpm=None, tpm=None, max_concurrent=None, expires=None)
    assert link.is_symlink()
    assert [k.id for k in load_keys_file(real).keys] == ["a", "b"]


def test_rewrite_keeps_the_file_mode(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    create_key(path, "a", models=None, rpm=None, tpm=None, max_concurrent=None, expires=None)
    path.chmod(0o640)
    create_key(path, "b", models=None, rpm=None, tpm=None, max_concurrent=None, expires=None)
    assert path.stat().st_mode & 0o777 == 0o640


# --- revoke -----------------------------------------------------------------------------------------------


def test_revoke_disables_only_that_key_and_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    for key_id in ("a", "b"):
        create_key(path, key_id, models=None, rpm=5, tpm=None, max_concurrent=None, expires=None)
    revoke_key(path, "a")
    revoke_key(path, "a")
    keys = {k.id: k for k in load_keys_file(path).keys}
    assert keys["a"].disabled and not keys["b"].disabled
    assert keys["a"].rpm == 5  # everything else kept


def test_revoke_unknown_id(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    create_key(path, "a", models=None, rpm=None, tpm=None, max_concurrent=None, expires=None)
    with pytest.raises(ConfigError, match="no key with id 'zz'"):
        revoke_key(path, "zz")


def test_revoke_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        revoke_key(tmp_path / "keys.yaml", "a")


# --- rotate -----------------------------------------------------------------------------------------------

NONE: dict[str, object] = {"models": None, "rpm": None, "tpm": None, "max_concurrent": None, "expires": None}


def test_rotate_replaces_the_hash_and_keeps_the_old_one_for_the_grace(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    old = create_key(path, "a", models=["qwen2.5-*"], rpm=5, tpm=None, max_concurrent=2, expires=None)
    before = load_keys_file(path).keys[0]
    t0 = datetime.now(timezone.utc)
    new = rotate_key(path, "a", grace_s=90)
    assert SECRET_RE.match(new) and new != old
    text = path.read_text()
    assert old not in text and new not in text  # only hashes are stored
    key = load_keys_file(path).keys[0]
    assert (key.sha256, key.previous_sha256) == (hash_secret(new), hash_secret(old))
    assert key.previous_expires is not None
    assert t0 + timedelta(seconds=88) <= key.previous_expires <= t0 + timedelta(seconds=92)
    assert (key.models, key.rpm, key.max_concurrent, key.created) == (before.models, 5, 2, before.created)
    assert key.state().startswith("active, previous secret until ")


def test_rotate_without_grace_and_twice(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    create_key(path, "a", **NONE)  # type: ignore[arg-type]
    rotate_key(path, "a")
    assert load_keys_file(path).keys[0].previous_sha256 is None
    second = rotate_key(path, "a", grace_s=60)
    third = rotate_key(path, "a", grace_s=60)
    key = load_keys_file(path).keys[0]
    assert (key.sha256, key.previous_sha256) == (hash_secret(third), hash_secret(second))  # one previous at most


def test_rotate_re_enables_a_revoked_key_without_reviving_its_secret(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    create_key(path, "a", **NONE)  # type: ignore[arg-type]
    revoke_key(path, "a")
    rotate_key(path, "a", grace_s=600)
    key = load_keys_file(path).keys[0]
    assert not key.disabled and key.previous_sha256 is None and key.state() == "active"


def test_rotate_an_expired_key_needs_a_new_expiry(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    past = datetime.now(timezone.utc) - timedelta(days=1)
    create_key(path, "a", **{**NONE, "expires": past})  # type: ignore[arg-type]
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="pass --expires"):
        rotate_key(path, "a", grace_s=60)
    assert path.read_bytes() == before
    later = datetime.now(timezone.utc) + timedelta(days=30)
    rotate_key(path, "a", grace_s=60, expires=later)
    key = load_keys_file(path).keys[0]
    assert key.state() == "active" and key.previous_sha256 is None  # the expired secret stays dead


def test_rotate_refuses_unknown_ids_and_negative_grace(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    create_key(path, "a", **NONE)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no key with id 'b'"):
        rotate_key(path, "b")
    with pytest.raises(ConfigError, match="--grace"):
        rotate_key(path, "a", grace_s=-1)


def test_previous_hash_fields_are_validated() -> None:
    other = "b" * 64
    assert "go together" in error_of({"keys": [entry(previous_sha256=other)]})
    assert "keys[0].previous_sha256: must be" in error_of(
        {"keys": [entry(previous_sha256="x", previous_expires="2030-01-01")]})
    message = error_of({"keys": [entry("a"), entry("b", other, previous_sha256=HASH, previous_expires="2030-01-01")]})
    assert "keys[1].previous_sha256: same secret as keys[0]" in message


def test_state_of_a_key() -> None:
    now = datetime(2030, 1, 1, tzinfo=timezone.utc)
    key = parse_keys({"keys": [entry(previous_sha256="b" * 64, previous_expires="2030-01-01T00:10:00Z",
                                     expires="2030-01-01T00:05:00Z")]}).keys[0]
    assert key.state(now) == "active, previous secret until 2030-01-01T00:05:00Z"  # capped by the key's expiry
    assert key.previous_valid_until(now + timedelta(minutes=5)) is None
    assert key.state(now + timedelta(minutes=5)) == "expired"
    revoked = parse_keys({"keys": [entry(disabled=True, previous_sha256="b" * 64,
                                         previous_expires="2030-01-01T00:10:00Z")]}).keys[0]
    assert revoked.state(now) == "revoked" and revoked.previous_valid_until(now) is None


def test_has_expired_is_true_from_the_expiry_on_and_never_without_one() -> None:
    at = datetime(2030, 1, 1, tzinfo=timezone.utc)
    assert not has_expired(None, at)
    assert not has_expired(at, at - timedelta(microseconds=1))
    assert has_expired(at, at) and has_expired(at, at + timedelta(seconds=1))
    assert has_expired(datetime.now(timezone.utc) - timedelta(seconds=1))  # default: now
