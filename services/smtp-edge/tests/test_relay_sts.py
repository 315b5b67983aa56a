"""R-OUT-5 MTA-STS (RFC 8461) in the relay, against real parts on loopback: the DNS server
serving the MX, ``_mta-sts`` TXT and ``mta-sts.<domain>`` records, an HTTPS server serving the
policy with a certificate from the test CA, aiosmtpd sinks with and without STARTTLS as the MX,
real Redis (where policies are cached) and NATS JetStream (the queue)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from rempart.common import keys
from rempart.common.mailstore import MessageStore
from rempart.common.testing.dnsserver import LoopbackDnsServer
from rempart.common.testing.polling import eventually
from rempart.common.tls import write_self_signed
from rempart.smtp_edge.relay import queue as relay_queue
from rempart.smtp_edge.relay.mtasts import MtaSts, PolicyError, StsPolicy, parse_policy, txt_policy_id
from rempart.smtp_edge.relay.routing import Router

from .test_relay import MESSAGE, configure, relay_log, running_relay, server_tls, sink, store

__all__ = ["relay_log", "store"]  # fixtures shared with test_relay
DOMAIN = "remote.test"
POLICY_HOST = f"mta-sts.{DOMAIN}"


def policy_text(mode: str, *mx: str, max_age: int = 86400) -> str:
    return "\r\n".join(["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}", ""])


@dataclass
class PolicyServer:
    body: str
    status: int = 200
    port: int = 0
    requests: list[str] = field(default_factory=list)
    server_names: list[str | None] = field(default_factory=list)


@contextlib.asynccontextmanager
async def policy_server(cert: tuple[str, str], body: str) -> AsyncIterator[PolicyServer]:
    """https://mta-sts.<domain>/.well-known/mta-sts.txt on loopback, with the test CA's certificate."""
    served = PolicyServer(body)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*cert)
    ctx.sni_callback = lambda _sock, name, _ctx: served.server_names.append(name)  # type: ignore[assignment,func-returns-value]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            served.requests.append(request.decode())
            payload = served.body.encode()
            head = (f"HTTP/1.1 {served.status} X\r\nContent-Type: text/plain; charset=utf-8\r\n"
                    f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode() + payload)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    served.port = int(server.sockets[0].getsockname()[1])
    try:
        yield served
    finally:
        server.close()


@pytest.fixture
def test_ca(tmp_path: Path) -> tuple[str, str]:
    """The certificate of the MX and of the policy host, trusted by the relay (REMPART_TLS_CA_FILE)."""
    pair = write_self_signed(tmp_path / "ca", [f"mx.{DOMAIN}", POLICY_HOST])
    return pair.cert_file, pair.key_file


def sts_zone(policy_id: str = "20261201") -> dict[str, dict[str, list[str]]]:
    return {
        DOMAIN: {"MX": [f"10 mx.{DOMAIN}."]},
        f"mx.{DOMAIN}": {"A": ["127.0.0.1"]},
        POLICY_HOST: {"A": ["127.0.0.1"]},
        f"_mta-sts.{DOMAIN}": {"TXT": [f'"v=STSv1; id={policy_id};"']},
    }


async def recipient_state(redis: aioredis.Redis, txn: str, rcpt: str) -> relay_queue.RecipientState | None:
    return (await relay_queue.RecipientStore(redis).load(txn)).get(rcpt)


async def test_r_out_5_mta_sts_enforce_delivers_over_verified_tls_and_caches_the_policy(
        redis_url: str, nats_url: str, redis: aioredis.Redis, store: MessageStore, test_ca: tuple[str, str],
        relay_log: list[str]) -> None:
    await configure(redis)
    async with LoopbackDnsServer(sts_zone()) as dns, sink(tls=server_tls(test_ca)) as remote, \
            policy_server(test_ca, policy_text("enforce", f"mx.{DOMAIN}", max_age=600)) as policy:
        async with running_relay(redis_url, nats_url, dns, remote.port, tls_ca_file=test_ca[0],
                                 outbound_mta_sts_port=policy.port):
            for i in range(2):
                await store.accept(MESSAGE.replace(b"<m1@", f"<s{i}@".encode()), mail_from="alice@example.org",
                                   local_mailboxes=[], remote_recipients=[f"u{i}@{DOMAIN}"])
                await eventually(lambda n=i: len(remote.handler.received) == n + 1, what=f"delivery {i}")
        assert all(r.tls for r in remote.handler.received)
        assert dns.asked(f"_mta-sts.{DOMAIN}", "TXT") >= 1
    # Fetched once, over TLS naming the policy host, and shared through Redis for its max_age.
    assert len(policy.requests) == 1 and policy.server_names == [POLICY_HOST]
    assert policy.requests[0].startswith("GET /.well-known/mta-sts.txt HTTP/1.1")
    cached = StsPolicy.from_json(await redis.get(keys.mta_sts_policy(DOMAIN)))
    assert (cached.id, cached.mode, cached.mx, cached.max_age) == ("20261201", "enforce", (f"mx.{DOMAIN}",), 600)
    assert 0 < await redis.ttl(keys.mta_sts_policy(DOMAIN)) <= 600
    assert not [line for line in relay_log if "Not verified" in line or ("MTA-STS" in line and "not" in line)]


async def test_r_out_5_mta_sts_enforce_mx_not_in_policy_is_deferred_not_delivered(
        redis_url: str, nats_url: str, redis: aioredis.Redis, store: MessageStore, test_ca: tuple[str, str]) -> None:
    await configure(redis)
    async with LoopbackDnsServer(sts_zone()) as dns, sink(tls=server_tls(test_ca)) as remote, \
            policy_server(test_ca, policy_text("enforce", "*.elsewhere.test")) as policy:
        async with running_relay(redis_url, nats_url, dns, remote.port, tls_ca_file=test_ca[0],
                                 outbound_mta_sts_port=policy.port):
            record, _ = await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                                           remote_recipients=[f"bob@{DOMAIN}"])

            async def retried() -> bool:
                state = await recipient_state(redis, record.transaction_id, f"bob@{DOMAIN}")
                return state is not None and state.attempts >= 2
            await eventually(retried, what="two deferred attempts")
            state = await recipient_state(redis, record.transaction_id, f"bob@{DOMAIN}")
        assert state is not None and state.state == "pending"
        assert state.reply == f"451 4.7.5 MTA-STS policy of {DOMAIN}: no MX host matches the policy"
        assert remote.handler.sessions == 0 and not remote.handler.received


@pytest.mark.parametrize("remote_tls", ["none", "untrusted"])
async def test_r_out_5_mta_sts_enforce_without_verified_starttls_is_deferred_not_delivered(
        redis_url: str, nats_url: str, redis: aioredis.Redis, store: MessageStore, test_ca: tuple[str, str],
        tls_files: tuple[str, str], relay_log: list[str], remote_tls: str) -> None:
    """No STARTTLS, or a certificate the relay cannot verify (self-signed, another name): under
    ``enforce`` neither plain text nor the unverified 'proceed anyway' of R-TLS-4."""
    await configure(redis)
    tls = server_tls(tls_files) if remote_tls == "untrusted" else None
    async with LoopbackDnsServer(sts_zone()) as dns, sink(tls=tls) as remote, \
            policy_server(test_ca, policy_text("enforce", f"mx.{DOMAIN}")) as policy:
        async with running_relay(redis_url, nats_url, dns, remote.port, tls_ca_file=test_ca[0],
                                 outbound_mta_sts_port=policy.port):
            record, _ = await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                                           remote_recipients=[f"bob@{DOMAIN}"])

            async def retried() -> bool:
                state = await recipient_state(redis, record.transaction_id, f"bob@{DOMAIN}")
                return state is not None and state.attempts >= 2
            await eventually(retried, what="two deferred attempts")
            state = await recipient_state(redis, record.transaction_id, f"bob@{DOMAIN}")
        assert state is not None and state.state == "pending" and state.reply.startswith("451 4.7.5 ")
        expected = "offers no STARTTLS" if remote_tls == "none" else "certificate not verified"
        assert expected in state.reply and "MTA-STS requires" in state.reply
        assert remote.handler.sessions >= 2 and not remote.handler.received and not remote.handler.rcpt_seen
    assert not [line for line in relay_log if "proceed anyway" in line]


async def test_r_out_5_mta_sts_testing_mode_delivers_and_logs_the_failure(
        redis_url: str, nats_url: str, redis: aioredis.Redis, store: MessageStore, test_ca: tuple[str, str],
        relay_log: list[str]) -> None:
    await configure(redis)
    async with LoopbackDnsServer(sts_zone()) as dns, sink() as remote, \
            policy_server(test_ca, policy_text("testing", f"mx.{DOMAIN}")) as policy:
        async with running_relay(redis_url, nats_url, dns, remote.port, tls_ca_file=test_ca[0],
                                 outbound_mta_sts_port=policy.port):
            await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                               remote_recipients=[f"bob@{DOMAIN}"])
            await eventually(lambda: bool(remote.handler.received), what="delivery")
    assert not remote.handler.received[0].tls
    assert f"MTA-STS policy (testing) of {DOMAIN} not met: no TLS, delivered anyway" in relay_log


async def test_r_out_5_mta_sts_policy_cache_follows_the_txt_id_and_survives_its_removal(
        redis: aioredis.Redis, test_ca: tuple[str, str]) -> None:
    """RFC 8461 5.1: the same id is not fetched again; a new id is; a TXT record that disappears
    (or a policy host that fails) leaves the cached policy in force: no downgrade by DNS."""
    async with LoopbackDnsServer(sts_zone("one"), ttl=0, soa_minimum=0) as dns, \
            policy_server(test_ca, policy_text("enforce", f"mx.{DOMAIN}")) as policy:
        # memo_seconds=0: the test removes the policy from Redis (its max_age ran out) and looks
        # again at once; a relay sees such a change within 5 s.
        sts = MtaSts(redis, Router([dns.address], 2.0), test_ca[0], policy.port, 5.0, memo_seconds=0.0)
        try:
            first = await sts.policy(DOMAIN)
            assert first is not None and first.id == "one" and first.mode == "enforce"
            assert await sts.policy(DOMAIN) == first and len(policy.requests) == 1
            # A second replica (its own process memory) finds the policy in Redis.
            other = MtaSts(redis, Router([dns.address], 2.0), test_ca[0], policy.port, 5.0)
            assert await other.policy(DOMAIN) == first and len(policy.requests) == 1
            await other.close()
            dns.set(f"_mta-sts.{DOMAIN}", "TXT", '"v=STSv1; id=two"', ttl=0)
            policy.body = policy_text("testing", f"mx.{DOMAIN}", "mx2.remote.test")
            second = await sts.policy(DOMAIN)
            assert second is not None and (second.id, second.mode) == ("two", "testing")
            assert len(policy.requests) == 2
            dns.remove(f"_mta-sts.{DOMAIN}")
            assert await sts.policy(DOMAIN) == second  # the TXT record is gone: the cache holds
            dns.set(f"_mta-sts.{DOMAIN}", "TXT", '"v=STSv1; id=three"', ttl=0)
            policy.status = 404
            assert await sts.policy(DOMAIN) == second  # the fetch failed: the cache holds
            await redis.delete(keys.mta_sts_policy(DOMAIN))
            assert await sts.policy(DOMAIN) is None  # nothing cached, fetch failed (remembered): no policy
            assert len(policy.requests) == 3
        finally:
            await sts.close()


def test_r_out_5_mta_sts_txt_and_policy_parsing() -> None:
    assert txt_policy_id(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert txt_policy_id(["some other record", "v=STSv1;id=abc"]) == "abc"
    assert txt_policy_id(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # two: none (RFC 8461 3.1)
    assert txt_policy_id(["v=STSv1; id=not-alnum"]) is None
    assert txt_policy_id([]) is None
    policy = parse_policy("version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\n"
                          "max_age: 604800\nextension: ignored\n", "x", 0.0)
    assert policy.matches("MAIL.example.com.") and policy.matches("mx1.example.net")
    assert not policy.matches("a.b.example.net") and not policy.matches("example.net")
    assert not policy.matches("mail.example.com.evil.test")
    for bad in ("version: STSv1\nmode: enforce\nmax_age: 10\n",  # enforce without mx
                "version: STSv2\nmode: none\nmax_age: 10\n",
                "version: STSv1\nmode: strict\nmx: a\nmax_age: 10\n",
                "version: STSv1\nmode: none\nmax_age: 31557601\n",
                "<html>not a policy</html>"):
        with pytest.raises(PolicyError):
            parse_policy(bad, "x", 0.0)
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 0\n", "x", 0.0).mode == "none"
