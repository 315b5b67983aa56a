"""R-PWD-2: Argon2id hashes are verified by libsodium where it reads them as argon2-cffi does,
by argon2-cffi otherwise, with the same answer either way; logins go through libsodium."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from argon2 import PasswordHasher, Type
from argon2.low_level import hash_secret
from nacl.bindings import crypto_pwhash_str_verify

from rempart.auth import argon2id
from rempart.auth.argon2id import sodium_verifies, verify_argon2id
from rempart.common.pb.auth.v1 import auth_pb2

if TYPE_CHECKING:
    from conftest import AuthHarness

GOOD = "Blue-Heron-42-Quiet"
PASSWORDS = [GOOD, "blue-heron-42-quiet", GOOD + " ", "é-ü-ß-€-日本-🔑", "x" * 1024, "a"]


def cffi_hash(password: str, **params: int) -> str:
    settings: dict[str, Any] = {"time_cost": 1, "memory_cost": 1024, "parallelism": 1, "hash_len": 32, "salt_len": 16} | params
    return PasswordHasher(type=Type.ID, **settings).hash(password)


def cffi_answer(encoded: str, password: str) -> bool:
    try:
        return PasswordHasher().verify(encoded, password)
    except Exception:  # any refusal is a "no"
        return False


@pytest.fixture
def sodium_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The encoded hashes given to libsodium (the real call still answers)."""
    calls: list[bytes] = []
    real: Callable[[bytes, bytes], bool] = crypto_pwhash_str_verify

    def recording(encoded: bytes, password: bytes) -> bool:
        calls.append(encoded)
        return real(encoded, password)

    monkeypatch.setattr(argon2id, "crypto_pwhash_str_verify", recording)
    return calls


def test_r_pwd_2_the_service_hash_is_verified_by_libsodium(sodium_calls: list[bytes]) -> None:
    encoded = cffi_hash(GOOD)  # the shape CredentialHasher writes: 16-byte salt, 32-byte hash
    assert sodium_verifies(encoded)
    assert verify_argon2id(encoded, GOOD) is True
    assert verify_argon2id(encoded, "Blue-Heron-42-Quiet!") is False
    assert sodium_calls == [encoded.encode()] * 2


@pytest.mark.parametrize("params", [
    {},
    {"parallelism": 2},
    {"time_cost": 2, "memory_cost": 2048},
    {"salt_len": 8, "hash_len": 16},
    {"salt_len": 32, "hash_len": 32},
])
def test_r_pwd_2_libsodium_answers_as_argon2_cffi(params: dict[str, int], sodium_calls: list[bytes]) -> None:
    encoded = cffi_hash(GOOD, **params)
    assert sodium_verifies(encoded)
    for password in PASSWORDS:
        assert verify_argon2id(encoded, password) is cffi_answer(encoded, password) is (password == GOOD), password
    unicode_hash = cffi_hash(PASSWORDS[3], **params)
    assert verify_argon2id(unicode_hash, PASSWORDS[3]) is True
    assert verify_argon2id(unicode_hash, PASSWORDS[3][:-1]) is False
    assert len(sodium_calls) == len(PASSWORDS) + 2


def other_forms() -> list[tuple[str, str]]:
    salt = b"0123456789abcdef"

    def raw(kind: Type, version: int = 19, hash_len: int = 32) -> str:
        return hash_secret(GOOD.encode(), salt, 1, 1024, 1, hash_len, kind, version).decode()

    return [
        ("argon2i", raw(Type.I)),
        ("argon2d", raw(Type.D)),
        ("version 16", raw(Type.ID, version=16)),
        ("longer than libsodium takes", raw(Type.ID, hash_len=128)),
    ]


@pytest.mark.parametrize(("form", "encoded"), other_forms())
def test_r_pwd_2_other_argon2_forms_still_verify(form: str, encoded: str, sodium_calls: list[bytes]) -> None:
    assert not sodium_verifies(encoded), form
    assert verify_argon2id(encoded, GOOD) is True
    assert verify_argon2id(encoded, GOOD.lower()) is False
    assert sodium_calls == []


@pytest.mark.parametrize("encoded", [
    "",
    "not a hash",
    "$argon2id$v=19$m=1024,t=1,p=1$$",
    "$argon2id$v=19$m=1024,t=1,p=1$MDEyMzQ1Njc4OWFiY2RlZg$",
    "$argon2id$v=19$m=4,t=1,p=1$MDEyMzQ1Njc4OWFiY2RlZg$" + "A" * 43,  # m below 8 KiB per lane
    "$argon2id$v=19$m=01024,t=1,p=1$MDEyMzQ1Njc4OWFiY2RlZg$" + "A" * 43,
    "$argon2id$v=19$m=99999999999,t=1,p=1$MDEyMzQ1Njc4OWFiY2RlZg$" + "A" * 43,
    "$argon2id$v=19$m=1024,t=1,p=1$MDEyMzQ1Njc4OWFiY2RlZg$" + "A" * 43,  # well formed, another hash
])
def test_r_pwd_2_an_unusable_or_foreign_string_is_a_no(encoded: str) -> None:
    assert verify_argon2id(encoded, GOOD) is False
    truncated = cffi_hash(GOOD)[:-5]
    assert verify_argon2id(truncated, GOOD) is False


async def test_r_log_4_logins_right_wrong_and_unknown_each_take_one_libsodium_verification(
    auth: AuthHarness, sodium_calls: list[bytes]
) -> None:
    bob = "bob@example.org"
    assert (await auth.login(bob, GOOD)).status == auth_pb2.AUTH_STATUS_OK
    assert len(sodium_calls) == 1
    assert (await auth.login(bob, "Wrong-Guess-77-Unique")).status == auth_pb2.AUTH_STATUS_INVALID
    assert len(sodium_calls) == 2
    # An unknown user pays the same verification, against the dummy hash (no enumeration by time).
    assert (await auth.login("nobody@example.org", GOOD)).status == auth_pb2.AUTH_STATUS_INVALID
    assert len(sodium_calls) == 3
    assert len(set(sodium_calls)) == 2
