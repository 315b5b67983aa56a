"""Migration (issue 4): imported Dovecot-style hashes verify, then upgrade to Argon2id + SCRAM."""

from __future__ import annotations

import base64
import hashlib
import os
import warnings

import pytest
from argon2 import PasswordHasher, Type

from rempart.common import keys
from rempart.common.pb.auth.v1 import auth_pb2

from .conftest import BOB, AuthHarness, EventTap

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt

OLD_PASSWORD = "Migrated-Owl-58-Hoots"


def dovecot_hashes(password: str) -> dict[str, str]:
    salt = os.urandom(8)
    bcrypt = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)).replace("$2b$", "$2y$", 1)
    return {
        "ARGON2ID": "{ARGON2ID}" + PasswordHasher(time_cost=1, memory_cost=256, type=Type.ID).hash(password),
        "BLF-CRYPT": "{BLF-CRYPT}" + bcrypt,
        "SHA512-CRYPT": "{SHA512-CRYPT}" + crypt.crypt(password, "$6$rounds=5000$" + salt.hex()[:16] + "$"),
        "SSHA512": "{SSHA512}" + base64.b64encode(hashlib.sha512(password.encode() + salt).digest() + salt).decode(),
    }


async def import_hash(auth: AuthHarness, scheme_hash: str) -> auth_pb2.ImportHashResponse:
    reply: auth_pb2.ImportHashResponse = await auth.stub.ImportHash(
        auth_pb2.ImportHashRequest(account=BOB, scheme_hash=scheme_hash), timeout=10)
    return reply


@pytest.mark.parametrize("scheme", ["ARGON2ID", "BLF-CRYPT", "SHA512-CRYPT", "SSHA512"])
async def test_r_pwd_2_imported_hash_verifies_then_upgrades(
    auth: AuthHarness, auth_events: EventTap, scheme: str
) -> None:
    scheme_hash = dovecot_hashes(OLD_PASSWORD)[scheme]
    assert (await import_hash(auth, scheme_hash)).ok
    await auth_events.wait_for("password_imported")
    stored = await auth.redis.hgetall(keys.credentials(BOB))
    assert stored["hash"] == scheme_hash and "scram" not in stored
    assert (await auth.login(BOB, "Not-The-Old-One-1")).status == auth_pb2.AUTH_STATUS_INVALID
    assert (await auth.login(BOB, OLD_PASSWORD)).status == auth_pb2.AUTH_STATUS_OK
    upgraded = await auth.redis.hgetall(keys.credentials(BOB))
    assert upgraded["hash"].startswith("$argon2id$v=19$m=1024,t=1,p=1$")
    assert upgraded["scram"].startswith("SCRAM-SHA-256$4096:")
    await auth_events.wait_for("hash_upgraded")
    assert (await auth.login(BOB, OLD_PASSWORD)).status == auth_pb2.AUTH_STATUS_OK


@pytest.mark.parametrize("bad", [
    "$6$abc$def",  # no scheme
    "{MD5-CRYPT}$1$abc$def",
    "{SHA512-CRYPT}$6$rounds=99999999$salt$" + "a" * 86,
    "{BLF-CRYPT}$2y$31$" + "a" * 53,
    "{SSHA512}" + base64.b64encode(b"short").decode(),
    "{ARGON2ID}$argon2i$v=19$m=65536,t=3,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
    "{ARGON2ID}$argon2id$v=19$m=99999999,t=3,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
])
async def test_r_pwd_2_unusable_import_refused_with_reason(auth: AuthHarness, bad: str) -> None:
    reply = await import_hash(auth, bad)
    assert not reply.ok and reply.error
    assert bad not in reply.error
    assert (await auth.redis.hget(keys.credentials(BOB), "hash") or "").startswith("$argon2id$")
