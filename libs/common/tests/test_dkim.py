"""R-OUT-5: the DKIM key store (real Redis) and signing (dkimpy)."""

from __future__ import annotations

import asyncio
import base64

import dkim as dkimpy
import pytest
import redis.asyncio as aioredis

from rempart.common import dkim, keys
from rempart.common.secretbox import SecretBox

NOW = 1_796_500_000.0  # 2026-12-05
MESSAGE = b"From: Alice <alice@example.org>\r\nTo: bob@remote.test\r\nSubject: hi\r\n\r\nbody\r\n"


def store(redis: aioredis.Redis, sealed_with: str = "k1") -> dkim.DkimKeyStore:
    return dkim.DkimKeyStore(redis, SecretBox(sealed_with))


async def test_r_out_5_private_keys_are_sealed_at_rest_and_opened_only_with_the_key(redis: aioredis.Redis) -> None:
    made = await store(redis).generate("example.org", "ed25519-sha256", None, NOW)
    (signing,) = await store(redis).signing_keys("example.org")
    assert (signing.selector, signing.algorithm) == (made.selector, "ed25519-sha256")
    assert made.selector == "rp202612e" and made.bits == 256
    raw = str(await redis.hget(keys.dkim_keys("example.org"), made.selector))
    assert signing.private_key.decode() not in raw and base64.b64decode(signing.private_key).hex() not in raw
    assert signing.private_key.decode() not in repr(signing)
    with pytest.raises(ValueError):
        await store(redis, "another-secret").signing_keys("example.org")


async def test_r_out_5_one_active_key_per_algorithm_and_rotation(redis: aioredis.Redis) -> None:
    keystore = store(redis)
    version = await keystore.version()
    # Two admins generating at once: one key, one refusal (WATCH makes the check and write atomic).
    results = await asyncio.gather(*(keystore.generate("example.org", "rsa-sha256", None, NOW) for _ in range(2)),
                                   return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["ActiveKeyExists", "DkimKey"]
    with pytest.raises(dkim.SelectorTaken):
        await keystore.generate("example.org", "ed25519-sha256", "rp202612", NOW)
    new, old = await keystore.rotate("example.org", "rp202612", None, NOW + 5)
    assert (new.selector, new.active, old.active, old.retired_at) == ("rp202612-2", True, False, NOW + 5)
    with pytest.raises(dkim.KeyNotActive):
        await keystore.rotate("example.org", "rp202612", None, NOW)
    with pytest.raises(KeyError):
        await keystore.rotate("example.org", "nothing", None, NOW)
    assert [k.selector for k in await keystore.signing_keys("example.org")] == ["rp202612-2"]
    assert await keystore.delete("example.org", "rp202612") and not await keystore.delete("example.org", "rp202612")
    assert [k.selector for k in await keystore.list_keys("example.org")] == ["rp202612-2"]
    assert await keystore.version() > version


async def test_r_out_5_sign_adds_one_verifying_signature_per_key(redis: aioredis.Redis) -> None:
    keystore = store(redis)
    published = [await keystore.generate("example.org", algorithm, None, NOW) for algorithm in dkim.ALGORITHMS]
    records = {f"{k.dns_name}.".encode(): "".join(k.txt_strings()).encode() for k in published}
    signed = dkim.sign(MESSAGE, await keystore.signing_keys("example.org"))
    assert signed.endswith(MESSAGE) and signed.count(b"DKIM-Signature:") == 2

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return records.get(name)
    assert [dkimpy.DKIM(signed).verify(idx=i, dnsfunc=dnsfunc) for i in range(2)] == [True, True]
    assert dkim.sign(b"Subject: no From\r\n\r\nx\r\n", await keystore.signing_keys("example.org")).count(
        b"DKIM-Signature") == 0
    assert all(dkim.valid_selector(s) for s in ("rp202612", "a", "sel-1.sub"))
    assert not any(dkim.valid_selector(s) for s in ("", "-a", "a_b", "A B", "a..b", "x" * 64))


async def test_r_out_5_deleting_a_domain_deletes_its_keys(redis: aioredis.Redis) -> None:
    from rempart.common.directory import Directory

    directory = Directory(redis)
    await directory.add_domain("gone.example")
    keystore = store(redis)
    await keystore.generate("gone.example", "ed25519-sha256", None, NOW)
    version = await keystore.version()
    await directory.delete_domain("gone.example")
    assert await keystore.list_keys("gone.example") == []
    assert await keystore.signing_keys("gone.example") == []
    assert await keystore.version() > version  # every relay replica re-reads its keys


def test_r_out_5_rsa_signatures_by_openssl_are_dkimpys_bit_for_bit() -> None:
    """The RSA signature is computed by OpenSSL (about 25 times cheaper than dkimpy's Python):
    PKCS#1 v1.5 is deterministic, so it must equal what dkimpy computes itself."""
    import hashlib

    import dkim.crypto as dkimcrypto

    pem, _, _ = dkim.generate_key_pair("rsa-sha256")
    parsed = dkimcrypto.parse_pem_private_key(pem)
    for name in ("sha256", "sha1"):
        digest = dkimpy.HashThrough(hashlib.new(name))
        digest.update(b"the canonical headers")
        assert dkim._openssl_rsa_sign(digest, parsed) == dkimcrypto.RSASSA_PKCS1_v1_5_sign(digest, parsed)
    assert dkimpy.RSASSA_PKCS1_v1_5_sign is dkim._openssl_rsa_sign  # what dkimpy's signer calls
