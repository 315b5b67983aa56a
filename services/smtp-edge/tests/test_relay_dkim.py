"""R-OUT-5 DKIM signing by the relay (RFC 6376, RFC 8463): keys made by the store the admin API
writes, messages relayed through real Redis and NATS to an aiosmtpd sink on loopback, and each
signature checked by dkimpy against the TXT record the API tells an admin to publish, served by
the loopback DNS server (real DNS packets)."""

from __future__ import annotations

import asyncio
import base64
import re

import dkim as dkimpy
import dns.resolver
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from rempart.common.dkim import DkimKey, DkimKeyStore, headers_to_sign
from rempart.common.mailstore import MessageStore
from rempart.common.secretbox import SecretBox
from rempart.common.settings import DEV_SECRET_KEY
from rempart.common.testing.dnsserver import LoopbackDnsServer
from rempart.common.testing.polling import eventually

from .test_relay import MESSAGE, configure, local_sender, running_relay, sink, store, zone

__all__ = ["store"]  # the fixture, shared with test_relay
NOW = 1_796_500_000.0  # 2026-12-05


def key_store(redis: aioredis.Redis) -> DkimKeyStore:
    return DkimKeyStore(redis, SecretBox(DEV_SECRET_KEY))  # the relay's key in tests


def publish(dns_server: LoopbackDnsServer, *published: DkimKey) -> None:
    for key in published:
        dns_server.set(key.dns_name, "TXT", " ".join(f'"{s}"' for s in key.txt_strings()))


def dns_lookup(dns_server: LoopbackDnsServer) -> object:
    """dkimpy's ``dnsfunc``: a real TXT query to the loopback server."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns_server.host]
    resolver.port = dns_server.port

    def get_txt(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode(), "TXT", lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)  # type: ignore[attr-defined]
    return get_txt


def signature_tags(message: bytes) -> list[dict[str, str]]:
    out = []
    for match in re.finditer(rb"^DKIM-Signature:(.*?)\r\n(?![ \t])", message, re.M | re.S):
        value = re.sub(r"\s+", "", match.group(1).decode())
        out.append(dict(part.split("=", 1) for part in value.split(";") if part))
    return out


async def verify(message: bytes, dns_server: LoopbackDnsServer, index: int) -> bool:
    # In a thread: dkimpy's lookup is blocking, and the DNS server answers from this loop.
    checker = dkimpy.DKIM(message)
    return bool(await asyncio.to_thread(checker.verify, index, dns_lookup(dns_server)))


async def test_r_out_5_relayed_message_signed_rsa_and_ed25519_both_verify(
        redis_url: str, nats_url: str, redis: aioredis.Redis, store: MessageStore) -> None:
    await configure(redis)
    await local_sender(redis)
    keys = key_store(redis)
    rsa_key = await keys.generate("example.org", "rsa-sha256", None, NOW)
    ed_key = await keys.generate("example.org", "ed25519-sha256", None, NOW)
    assert (rsa_key.selector, ed_key.selector) == ("rp202612", "rp202612e")
    spki = load_der_public_key(base64.b64decode(rsa_key.public_key))
    assert isinstance(spki, rsa.RSAPublicKey) and spki.key_size == 2048
    async with LoopbackDnsServer(zone("remote.test")) as dns_server, sink() as remote:
        publish(dns_server, rsa_key, ed_key)
        async with running_relay(redis_url, nats_url, dns_server, remote.port):
            await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                               remote_recipients=["bob@remote.test"])
            await eventually(lambda: bool(remote.handler.received), what="delivery")
        signed = remote.handler.received[0].data
        tags = signature_tags(signed)
        assert sorted(t["a"] for t in tags) == ["ed25519-sha256", "rsa-sha256"]
        assert {t["s"] for t in tags} == {"rp202612", "rp202612e"}
        for t in tags:
            assert t["d"] == "example.org" and t["c"] == "relaxed/relaxed"
            assert t["h"].split(":") == ["from", "to", "subject", "message-id", "from"]  # From oversigned
        assert signed.endswith(MESSAGE)
        assert [await verify(signed, dns_server, i) for i in range(2)] == [True, True]
        # What the signatures protect: a changed Subject, or a second From added in transit.
        tampered = signed.replace(b"Subject: hello remote", b"Subject: hello there")
        assert [await verify(tampered, dns_server, i) for i in range(2)] == [False, False]
        added_from = signed.replace(b"\r\nFrom: Alice", b"\r\nFrom: Mallory <ceo@example.org>\r\nFrom: Alice")
        assert [await verify(added_from, dns_server, i) for i in range(2)] == [False, False]


async def test_r_out_5_rotated_key_signs_forwarded_mail_by_envelope_remote_senders_unsigned(
        redis_url: str, nats_url: str, redis: aioredis.Redis, store: MessageStore) -> None:
    """After a rotation the new selector signs and the old one stays published; a forwarded copy
    (remote author, local SRS sender) is signed for the envelope's domain; mail whose From and
    envelope are both remote leaves unsigned."""
    await configure(redis)
    await local_sender(redis)
    keys = key_store(redis)
    first = await keys.generate("example.org", "rsa-sha256", "jan", NOW)
    new, retired = await keys.rotate("example.org", "jan", None, NOW)
    assert new.selector == "rp202612" and new.active and not retired.active and retired.retired_at == NOW
    assert [k.selector for k in await keys.list_keys("example.org")] == ["jan", "rp202612"]
    assert first.public_key == retired.public_key
    forwarded = MESSAGE.replace(b"From: Alice <alice@example.org>", b"From: Someone <someone@sender.test>")
    srs = "SRS0=abcd=ZZ=sender.test=someone@example.org"
    async with LoopbackDnsServer(zone("remote.test")) as dns_server, sink() as remote:
        publish(dns_server, new, retired)
        async with running_relay(redis_url, nats_url, dns_server, remote.port):
            await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                               remote_recipients=["bob@remote.test"])
            await store.accept(forwarded, mail_from="someone@sender.test", local_mailboxes=[],
                               remote_recipients=["fwd@remote.test"], remote_senders={"fwd@remote.test": srs})
            await store.accept(forwarded, mail_from="someone@sender.test", local_mailboxes=[],
                               remote_recipients=["carl@remote.test"])
            await eventually(lambda: len(remote.handler.received) == 3, what="three deliveries")
        by_rcpt = {r.rcpt_tos[0]: r.data for r in remote.handler.received}
        for rcpt in ("bob@remote.test", "fwd@remote.test"):
            (tags,) = signature_tags(by_rcpt[rcpt])
            assert (tags["s"], tags["d"]) == ("rp202612", "example.org"), rcpt
            assert await verify(by_rcpt[rcpt], dns_server, 0), rcpt
        assert b"DKIM-Signature" not in by_rcpt["carl@remote.test"]


def test_r_out_5_signed_header_list() -> None:
    message = (b"Received: x\r\nFrom: a@example.org\r\nTo: b@x.test\r\nCc: c@x.test\r\nSubject: s\r\n"
               b"Date: d\r\nMessage-ID: <m>\r\nReply-To: r@x.test\r\nIn-Reply-To: <p>\r\nReferences: <p>\r\n"
               b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\nX-Other: y\r\n\r\nFrom: not a header\r\n")
    assert [h.decode() for h in headers_to_sign(message)] == [
        "from", "to", "cc", "subject", "date", "message-id", "reply-to", "in-reply-to", "references",
        "mime-version", "content-type", "from"]
    assert headers_to_sign(b"Subject: no sender\r\n\r\nbody\r\n") == []
