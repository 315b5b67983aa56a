"""The outbound relay against real receiving servers: aiosmtpd sinks on loopback as the remote
MX hosts (with and without STARTTLS, answering 250/4xx/5xx per recipient), the loopback DNS
server serving MX records, and real Redis and NATS JetStream. Messages enter the queue the way
the edge puts them there: ``MessageStore.accept`` with remote recipients.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import logging
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from nats.aio.client import Client as NATS

from rempart.common import keys
from rempart.common.config import SettingsStore
from rempart.common.directory import Directory
from rempart.common.mailbox import Mailboxes, MailboxLog, run_indexer
from rempart.common.mailstore import MailboxIndex, MessageStore
from rempart.common.runtime import ServiceRuntime
from rempart.common.testing.dnsserver import LoopbackDnsServer
from rempart.common.testing.localstack import free_port
from rempart.common.testing.polling import eventually
from rempart.smtp_edge.relay import queue as relay_queue
from rempart.smtp_edge.relay.app import Relay
from rempart.smtp_edge.relay.dsn import RecipientReport, build_dsn
from rempart.smtp_edge.relay.replies import Reply
from rempart.smtp_edge.relay.settings import RelaySettings

MESSAGE = (
    b"From: Alice <alice@example.org>\r\nTo: Bob <bob@remote.test>\r\nSubject: hello remote\r\n"
    b"Message-ID: <m1@example.org>\r\n\r\nThe body that must arrive.\r\n.leading dot line\r\n"
)


# A receiving MTA --------------------------------------------------------------------------
@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    session: int
    at: float = field(default_factory=time.time)


@dataclass
class SinkHandler:
    """Answers RCPT per recipient from ``rcpt_replies`` (a list is consumed one reply per
    attempt, then 250); ``data_reply`` likewise for the final dot."""

    rcpt_replies: dict[str, list[str]] = field(default_factory=dict)
    data_replies: list[str] = field(default_factory=list)
    data_hold: asyncio.Event | None = None  # the dot's reply waits for this (a stuck remote)
    received: list[Received] = field(default_factory=list)
    rcpt_seen: list[str] = field(default_factory=list)
    sessions: int = 0
    open_transactions: int = 0  # between MAIL and the reply to the dot
    max_open_transactions: int = 0
    in_data: asyncio.Event = field(default_factory=asyncio.Event)
    data_delay: float = 0.0
    quits: int = 0

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.quits += 1
        return "221 2.0.0 Bye"

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        self.open_transactions += 1
        self.max_open_transactions = max(self.max_open_transactions, self.open_transactions)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        self.rcpt_seen.append(address)
        queued = self.rcpt_replies.get(address)
        if queued:
            reply = queued.pop(0)
            if not reply.startswith("2"):
                return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        try:
            return await self._data(server, session, envelope)
        finally:
            self.open_transactions -= 1

    async def _data(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.in_data.set()
        if self.data_hold is not None:
            await self.data_hold.wait()
            return "451 4.3.0 held"
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        if self.data_replies:
            reply = self.data_replies.pop(0)
            if not reply.startswith("2"):
                return reply
        self.received.append(Received(str(envelope.mail_from), list(envelope.rcpt_tos),
                                      bytes(envelope.original_content or b""), session.ssl is not None,
                                      id(server)))
        return "250 2.0.0 Ok: queued"


@dataclass
class Sink:
    handler: SinkHandler
    server: asyncio.Server
    host: str
    port: int

    def connections(self) -> list[list[str]]:
        return [r.rcpt_tos for r in self.handler.received]


def server_tls(tls_files: tuple[str, str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*tls_files)
    return ctx


@contextlib.asynccontextmanager
async def sink(host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None,
               handler: SinkHandler | None = None, **smtp_options: Any) -> AsyncIterator[Sink]:
    handler = handler or SinkHandler()

    def factory() -> SMTP:
        handler.sessions += 1
        return SMTP(handler, hostname=f"sink-{host}", tls_context=tls, **smtp_options)

    server = await asyncio.get_running_loop().create_server(factory, host=host, port=port)
    try:
        yield Sink(handler, server, host, int(server.sockets[0].getsockname()[1]))
    finally:
        server.close()


# The relay, in this process --------------------------------------------------------------
@contextlib.asynccontextmanager
async def running_relay(redis_url: str, nats_url: str, dns: LoopbackDnsServer, mx_port: int,
                        **overrides: Any) -> AsyncIterator[Relay]:
    options: dict[str, Any] = dict(
        redis_url=redis_url, nats_url=nats_url, ops_port=0, ops_host="127.0.0.1",
        dns_nameservers=dns.address, dns_timeout_seconds=2.0, mx_port=mx_port, hostname="relay.example.org",
        environment="test", log_format="text", ack_wait_seconds=5.0, connect_timeout_seconds=3.0,
        command_timeout_seconds=10.0,
    )
    options.update(overrides)
    settings = RelaySettings(**options)
    async with ServiceRuntime("relay", settings) as runtime:
        relay = Relay(runtime, settings)
        await relay.start()
        # What imap-pop runs beside the relay: the indexer files DSNs in the local mailboxes.
        js = runtime.js
        mailboxes = Mailboxes(await MessageStore.open(js), MailboxIndex(runtime.redis), MailboxLog(js))
        indexer = asyncio.create_task(run_indexer(js, mailboxes, nc=runtime.nc))
        try:
            yield relay
        finally:
            indexer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await indexer
            await relay.drain(2)


async def configure(redis: aioredis.Redis, **outbound: Any) -> None:
    doc: dict[str, Any] = {"outbound": {"retry_backoff_seconds": [0.5], **outbound}}
    await SettingsStore(redis).put_doc("server", doc)


async def local_sender(redis: aioredis.Redis, address: str = "alice@example.org") -> None:
    directory = Directory(redis)
    if not await directory.is_local_domain(address.split("@")[1]):
        await directory.add_domain(address.split("@")[1])
    await directory.add_account(address)


async def mailbox_messages(redis: aioredis.Redis, nats_conn: NATS, mailbox: str) -> list[email.message.Message]:
    store = await MessageStore.open(nats_conn.jetstream())
    out = []
    for message in await MailboxIndex(redis).messages(mailbox):
        raw = await store.read_message(message)
        out.append(email.message_from_bytes(raw, policy=email.policy.default))
    return out


def delivery_status(dsn: email.message.Message) -> list[dict[str, str]]:
    """The per-recipient blocks of a DSN's message/delivery-status part."""
    for part in dsn.walk():
        if part.get_content_type() == "message/delivery-status":
            blocks = part.get_payload()
            assert isinstance(blocks, list)
            return [{k: str(v) for k, v in block.items()} for block in blocks[1:]]
    raise AssertionError("no message/delivery-status part")


def zone(*domains: str, mx_ip: str = "127.0.0.1") -> dict[str, dict[str, list[str]]]:
    out: dict[str, dict[str, list[str]]] = {}
    for domain in domains:
        out[domain] = {"MX": [f"10 mx.{domain}."]}
        out[f"mx.{domain}"] = {"A": [mx_ip]}
    return out


@pytest.fixture
async def store(nats_conn: NATS) -> MessageStore:
    return await MessageStore.open(nats_conn.jetstream())


@pytest.fixture
def relay_log() -> Iterator[list[str]]:
    """The relay's log lines (the runtime replaces the root logger's handlers)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Keep(level=logging.INFO)
    logger = logging.getLogger("rempart.smtp_edge.relay")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


# Tests -------------------------------------------------------------------------------------
async def test_r_out_1_r_tls_4_message_reaches_remote_mx_over_starttls(
        redis_url: str, nats_url: str, redis: aioredis.Redis, store: MessageStore, tls_files: tuple[str, str],
        relay_log: list[str]) -> None:
    """MX lookup through the configured resolver, STARTTLS taken although the certificate is
    self-signed (logged with the guide's line), the body intact (dot-stuffing undone)."""
    await configure(redis)
    async with LoopbackDnsServer(zone("remote.test")) as dns, sink(tls=server_tls(tls_files)) as remote:
        async with running_relay(redis_url, nats_url, dns, remote.port):
            await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                               remote_recipients=["bob@remote.test"])
            await eventually(lambda: bool(remote.handler.received), what="delivery")
        got = remote.handler.received[0]
        assert got.mail_from == "alice@example.org" and got.rcpt_tos == ["bob@remote.test"]
        assert got.data.replace(b"\r\n", b"\n") == MESSAGE.replace(b"\r\n", b"\n")
        assert got.tls, "STARTTLS was offered: the session must be encrypted"
        assert dns.asked("remote.test", "MX") >= 1
    assert "Client session SSL: Not verified (18) - proceed anyway" in relay_log


async def test_r_tls_4_verified_certificate_and_plain_only_without_starttls(
        redis_url: str, nats_url: str, redis: aioredis.Redis, store: MessageStore, tls_files: tuple[str, str],
        relay_log: list[str]) -> None:
    """A certificate that verifies (the MX name is in it) gives no warning; a remote without
    STARTTLS still gets its mail, in plain text."""
    await configure(redis)
    records = {"tls.test": {"MX": ["10 localhost."]}, "localhost": {"A": ["127.0.0.1"]},
               **zone("plain.test", mx_ip="127.0.0.2")}
    async with LoopbackDnsServer(records) as dns, sink(tls=server_tls(tls_files)) as secure, \
            sink(host="127.0.0.2", port=secure.port) as plain:
        async with running_relay(redis_url, nats_url, dns, secure.port, tls_ca_file=tls_files[0]):
            await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                               remote_recipients=["carol@tls.test", "dan@plain.test"])
            await eventually(lambda: bool(secure.handler.received and plain.handler.received), what="both")
        assert secure.handler.received[0].tls and secure.handler.received[0].rcpt_tos == ["carol@tls.test"]
        assert not plain.handler.received[0].tls and plain.handler.received[0].rcpt_tos == ["dan@plain.test"]
    assert not [line for line in relay_log if "Not verified" in line]


async def test_r_out_1_mx_preference_order_and_fallback_to_next_host(
        redis_url: str, nats_url: str, redis: aioredis.Redis, store: MessageStore) -> None:
    """The preferred MX (10) is tried first; when it is down the next one (20) gets the mail;
    a domain without MX gets it at its own address (A fallback)."""
    await configure(redis)
    port = free_port()
    records = {
        "remote.test": {"MX": ["20 mx2.remote.test.", "10 mx1.remote.test."]},
        "mx1.remote.test": {"A": ["127.0.0.3"]},  # nothing listens there
        "mx2.remote.test": {"A": ["127.0.0.1"]},
        "nomx.test": {"A": ["127.0.0.1"]},
    }
    async with LoopbackDnsServer(records) as dns, sink(port=port) as remote:
        async with running_relay(redis_url, nats_url, dns, port):
            await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                               remote_recipients=["bob@remote.test", "eve@nomx.test"])
            await eventually(lambda: len(remote.handler.received) == 2, what="two deliveries")
        assert dns.asked("mx1.remote.test", "A") >= 1
        assert sorted(r for got in remote.handler.received for r in got.rcpt_tos) == ["bob@remote.test",
                                                                                        "eve@nomx.test"]


async def test_r_out_2_temporary_failure_is_retried_until_delivered(
        redis_url: str, nats_url: str, redis: aioredis.Redis, store: MessageStore) -> None:
    await configure(redis)
    handler = SinkHandler(rcpt_replies={"bob@remote.test": ["451 4.7.1 greylisted, come back later"]},
                          data_replies=["452 4.3.1 insufficient storage"])
    async with LoopbackDnsServer(zone("remote.test")) as dns, sink(handler=handler) as remote:
        async with running_relay(redis_url, nats_url, dns, remote.port):
            started = time.monotonic()
            record, _ = await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                                           remote_recipients=["bob@remote.test"])
            await eventually(lambda: bool(remote.handler.received), what="delivery after retries")
            elapsed = time.monotonic() - started
            states = await relay_queue.RecipientStore(redis).load(record.transaction_id)
    assert remote.handler.received[0].rcpt_tos == ["bob@remote.test"]
    assert remote.handler.rcpt_seen == ["bob@remote.test"] * 3  # 451 at RCPT, 452 at the dot, 250
    assert states["bob@remote.test"].state == "delivered" and states["bob@remote.test"].attempts == 2
    assert elapsed >= 1.0  # two backoffs of 0.5 s


async def test_r_out_2_permanent_failure_bounces_dsn_to_local_sender(
        redis_url: str, nats_url: str, redis: aioredis.Redis, nats_conn: NATS, store: MessageStore) -> None:
    """A 5xx for one recipient bounces at once with an RFC 3464 DSN in the sender's mailbox;
    the other recipient of the same message is delivered."""
    await configure(redis)
    await local_sender(redis)
    handler = SinkHandler(rcpt_replies={"nobody@remote.test": ["550 5.1.1 <nobody@remote.test>: no such user"]})
    async with LoopbackDnsServer(zone("remote.test")) as dns, sink(handler=handler) as remote:
        async with running_relay(redis_url, nats_url, dns, remote.port):
            record, _ = await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                                           remote_recipients=["bob@remote.test", "nobody@remote.test"],
                                           dsn={"ENVID": "env-42", "ORCPT:nobody@remote.test": "rfc822;nobody@remote.test"})
            await eventually(lambda: mailbox_messages(redis, nats_conn, "alice@example.org"), what="the DSN")
    assert remote.handler.received[0].rcpt_tos == ["bob@remote.test"]
    assert remote.handler.rcpt_seen.count("nobody@remote.test") == 1  # no retry of a 5xx
    (dsn,) = await mailbox_messages(redis, nats_conn, "alice@example.org")
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    assert dsn["To"].addresses[0].addr_spec == "alice@example.org" and dsn["Auto-Submitted"] == "auto-replied"
    assert dsn["Return-Path"] == "<>"
    (block,) = delivery_status(dsn)
    assert block["Final-Recipient"] == "rfc822; nobody@remote.test"
    assert block["Original-Recipient"] == "rfc822;nobody@remote.test"
    assert block["Action"] == "failed" and block["Status"] == "5.1.1"
    assert block["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
    assert block["Remote-MTA"] == "dns; mx.remote.test"
    headers = [p for p in dsn.walk() if p.get_content_type() == "text/rfc822-headers"]
    assert headers and b"Subject: hello remote" in headers[0].get_payload(decode=True)
    assert b"The body that must arrive" not in headers[0].get_payload(decode=True)  # RET=HDRS by default
    assert "Original-Envelope-Id: env-42" in dsn.as_string()
    states = await relay_queue.RecipientStore(redis).load(record.transaction_id)
    assert {r: s.state for r, s in states.items()} == {"bob@remote.test": "delivered",
                                                        "nobody@remote.test": "bounced"}


async def test_r_out_1_null_mx_bounces_at_once(
        redis_url: str, nats_url: str, redis: aioredis.Redis, nats_conn: NATS, store: MessageStore) -> None:
    await configure(redis)
    await local_sender(redis)
    async with LoopbackDnsServer({"nomail.test": {"MX": ["0 ."]}}) as dns, sink() as remote:
        async with running_relay(redis_url, nats_url, dns, remote.port):
            await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                               remote_recipients=["x@nomail.test"])
            await eventually(lambda: mailbox_messages(redis, nats_conn, "alice@example.org"), what="the DSN")
        assert remote.handler.sessions == 0
    (dsn,) = await mailbox_messages(redis, nats_conn, "alice@example.org")
    (block,) = delivery_status(dsn)
    assert block["Status"] == "5.1.10" and block["Action"] == "failed"
    assert "null MX" in block["Diagnostic-Code"]


async def test_r_out_2_no_bounce_to_null_sender_and_dsn_to_remote_sender_is_queued(
        redis_url: str, nats_url: str, redis: aioredis.Redis, store: MessageStore,
        relay_log: list[str]) -> None:
    """A message from ``<>`` that bounces is dropped and logged (a bounce of a bounce); a
    message from a remote sender bounces with a DSN that the relay itself delivers, from <>."""
    await configure(redis)
    handler = SinkHandler(rcpt_replies={"gone@remote.test": ["550 5.1.1 gone", "550 5.1.1 gone"]})
    async with LoopbackDnsServer(zone("remote.test", "sender.test")) as dns, sink(handler=handler) as remote:
        async with running_relay(redis_url, nats_url, dns, remote.port):
            await store.accept(MESSAGE, mail_from="", local_mailboxes=[], remote_recipients=["gone@remote.test"])
            await eventually(lambda: "bounce of a bounce dropped" in relay_log, what="the drop")
            await store.accept(MESSAGE, mail_from="someone@sender.test", local_mailboxes=[],
                               remote_recipients=["gone@remote.test"])
            await eventually(lambda: bool(remote.handler.received), what="the DSN at the sender's MX")
        dsn = remote.handler.received[0]
        assert dsn.mail_from == "<>" and dsn.rcpt_tos == ["someone@sender.test"]
        parsed = email.message_from_bytes(dsn.data, policy=email.policy.default)
        assert parsed.get_content_type() == "multipart/report"
        assert len(remote.handler.received) == 1


async def test_r_out_2_message_expires_after_max_lifetime_with_dsn(
        redis_url: str, nats_url: str, redis: aioredis.Redis, nats_conn: NATS, store: MessageStore) -> None:
    await configure(redis, max_lifetime_hours=2 / 3600)  # two seconds
    await local_sender(redis)
    handler = SinkHandler(rcpt_replies={"bob@remote.test": ["450 4.2.1 mailbox busy"] * 100})
    async with LoopbackDnsServer(zone("remote.test")) as dns, sink(handler=handler) as remote:
        async with running_relay(redis_url, nats_url, dns, remote.port):
            await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                               remote_recipients=["bob@remote.test"])
            await eventually(lambda: mailbox_messages(redis, nats_conn, "alice@example.org"), what="expiry DSN")
        assert len(remote.handler.rcpt_seen) >= 2  # retried before giving up
    (dsn,) = await mailbox_messages(redis, nats_conn, "alice@example.org")
    (block,) = delivery_status(dsn)
    assert block["Action"] == "failed" and block["Status"] == "4.4.7"
    assert "450 4.2.1 mailbox busy" in block["Diagnostic-Code"]


async def test_r_out_2_dns_failure_defers_never_bounces(
        redis_url: str, nats_url: str, redis: aioredis.Redis, store: MessageStore) -> None:
    await configure(redis)
    async with LoopbackDnsServer(zone("remote.test")) as dns, sink() as remote:
        dns.servfail_names.add("remote.test")
        async with running_relay(redis_url, nats_url, dns, remote.port):
            record, _ = await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                                           remote_recipients=["bob@remote.test"])
            results = relay_queue.RecipientStore(redis)

            async def deferred() -> bool:
                state = (await results.load(record.transaction_id)).get("bob@remote.test")
                return state is not None and state.attempts >= 1
            await eventually(deferred, what="a deferral")
            state = (await results.load(record.transaction_id))["bob@remote.test"]
            assert state.state == "pending" and state.reply.startswith("451 4.4.3")
            dns.servfail_names.clear()
            await eventually(lambda: bool(remote.handler.received), what="delivery once DNS answers")


async def test_r_lim_6_at_most_100_recipients_per_connection(
        redis_url: str, nats_url: str, redis: aioredis.Redis, store: MessageStore) -> None:
    await configure(redis)
    recipients = [f"user{i:03d}@remote.test" for i in range(250)]
    async with LoopbackDnsServer(zone("remote.test")) as dns, sink() as remote:
        async with running_relay(redis_url, nats_url, dns, remote.port):
            await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                               remote_recipients=recipients)
            await eventually(lambda: sum(len(r.rcpt_tos) for r in remote.handler.received) == 250,
                             what="250 recipients")
        assert sorted(len(r) for r in remote.connections()) == [50, 100, 100]
        assert remote.handler.sessions == 3
        assert sorted(r for got in remote.connections() for r in got) == recipients


def sessions_of(remote: Sink) -> list[int]:
    """Recipients carried by each session the remote saw, in order of first use."""
    per_session: dict[int, int] = {}
    for got in remote.handler.received:
        per_session[got.session] = per_session.get(got.session, 0) + len(got.rcpt_tos)
    return list(per_session.values())


async def send_one_by_one(store: MessageStore, remote: Sink, count: int) -> None:
    for i in range(count):
        await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                           remote_recipients=[f"u{i}@remote.test"])
        await eventually(lambda i=i: len(remote.handler.received) == i + 1, what=f"delivery {i + 1}")


async def test_r_out_4_session_kept_for_the_next_message_then_closed_when_idle(
        redis_url: str, nats_url: str, redis: aioredis.Redis, store: MessageStore, tls_files: tuple[str, str]) -> None:
    """Like Postfix's connection cache: four messages in a row to one MX travel over one
    STARTTLS session (one connection, one handshake); once idle for its time (6 s here, 2 s by
    default) it is closed with QUIT."""
    await configure(redis)
    async with LoopbackDnsServer(zone("remote.test")) as dns, sink(tls=server_tls(tls_files)) as remote:
        async with running_relay(redis_url, nats_url, dns, remote.port, connection_cache_seconds=6.0):
            await send_one_by_one(store, remote, 4)
            # (the sink's certificate is self-signed: the first, verifying handshake failed, and
            # the session that carried the mail was opened without the check, as R-TLS-4 says)
            assert sessions_of(remote) == [4]
            # Each finished record gave its lock back (with the end of the record, one round trip).
            await eventually(lambda: _no_locks(redis), what="relay locks released")
            assert all(got.tls for got in remote.handler.received)
            assert remote.handler.quits == 0, "kept open between messages"
            await eventually(lambda: remote.handler.quits == 1, timeout=30, what="QUIT after 6 s idle")
            await send_one_by_one_more(store, remote)
            assert sessions_of(remote) == [4, 1], "an expired session is not reused"


async def _no_locks(redis: aioredis.Redis) -> bool:
    return not await redis.keys(keys.relay_lock("*"))


async def send_one_by_one_more(store: MessageStore, remote: Sink) -> None:
    before = len(remote.handler.received)
    await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                       remote_recipients=["late@remote.test"])
    await eventually(lambda: len(remote.handler.received) == before + 1, what="a later delivery")


async def test_r_lim_6_recipients_per_connection_count_over_a_kept_session(
        redis_url: str, nats_url: str, redis: aioredis.Redis, store: MessageStore) -> None:
    """R-LIM-6 bounds the recipients of a connection, not of a message: with a limit of 3, five
    one-recipient messages in a row make two sessions of 3 and 2."""
    await SettingsStore(redis).put_doc("server", {"outbound": {"retry_backoff_seconds": [0.5]},
                                                  "limits": {"outbound_max_recipients_per_connection": 3}})
    async with LoopbackDnsServer(zone("remote.test")) as dns, sink() as remote:
        # 30 s: the next message surely comes while the session is kept, even on a loaded machine.
        async with running_relay(redis_url, nats_url, dns, remote.port, connection_cache_seconds=30.0):
            await send_one_by_one(store, remote, 5)
    assert sessions_of(remote) == [3, 2]
    assert remote.handler.sessions == 2


async def test_r_out_4_a_kept_session_the_remote_closed_is_replaced_without_a_deferral(
        redis_url: str, nats_url: str, redis: aioredis.Redis, store: MessageStore) -> None:
    """The remote drops the idle session while the relay still keeps it (aiosmtpd's 0.5 s idle
    timeout): the RSET fails, the next message goes over a new session at once, nobody deferred."""
    await configure(redis)
    deferred = relay_queue.DELIVERIES.labels("deferred")._value.get()
    async with LoopbackDnsServer(zone("remote.test")) as dns, sink(timeout=0.5) as remote:
        async with running_relay(redis_url, nats_url, dns, remote.port, connection_cache_seconds=30.0):
            await send_one_by_one(store, remote, 1)
            await asyncio.sleep(1.2)
            await send_one_by_one_more(store, remote)
    assert remote.handler.sessions == 2
    assert relay_queue.DELIVERIES.labels("deferred")._value.get() == deferred


async def test_r_out_4_connections_per_destination_domain_limited(
        redis_url: str, nats_url: str, redis: aioredis.Redis, store: MessageStore) -> None:
    await configure(redis, max_connections_per_domain=2)
    handler = SinkHandler(data_delay=0.2)
    async with LoopbackDnsServer(zone("remote.test")) as dns, sink(handler=handler) as remote:
        async with running_relay(redis_url, nats_url, dns, remote.port):
            for i in range(8):
                await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                                   remote_recipients=[f"u{i}@remote.test"])
            await eventually(lambda: len(remote.handler.received) == 8, what="eight deliveries")
    assert remote.handler.max_open_transactions == 2


async def test_r_out_1_smarthost_with_auth_over_starttls(
        redis_url: str, nats_url: str, redis: aioredis.Redis, store: MessageStore,
        tls_files: tuple[str, str]) -> None:
    """A per-domain transport ``[host]:port`` with AUTH: no MX lookup, credentials from the
    process secret, sent only under TLS."""
    logins: list[tuple[bytes, bytes]] = []

    def authenticator(server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                      auth_data: Any) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=auth_data.password == b"s3cret-pw")

    async with LoopbackDnsServer({}) as dns, sink(tls=server_tls(tls_files), authenticator=authenticator,
                                                  auth_require_tls=True) as smarthost:
        await configure(redis, transports={"partner.test": {"host": f"[127.0.0.1]:{smarthost.port}",
                                                            "username": "relay-user"}})
        async with running_relay(redis_url, nats_url, dns, 1, smarthost_passwords={"partner.test": "s3cret-pw"}):
            await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                               remote_recipients=["pat@partner.test"])
            await eventually(lambda: bool(smarthost.handler.received), what="delivery to the smarthost")
        assert logins == [(b"relay-user", b"s3cret-pw")]
        assert smarthost.handler.received[0].tls
        assert dns.queries == []  # a bracketed smarthost needs no DNS


async def test_r_dns_6_forwarded_copy_leaves_with_its_srs_sender(
        redis_url: str, nats_url: str, redis: aioredis.Redis, store: MessageStore) -> None:
    await configure(redis)
    srs = "SRS0=abcd=ZZ=sender.test=someone@example.org"
    async with LoopbackDnsServer(zone("remote.test")) as dns, sink() as remote:
        async with running_relay(redis_url, nats_url, dns, remote.port):
            await store.accept(MESSAGE, mail_from="someone@sender.test", local_mailboxes=[],
                               remote_recipients=["fwd@remote.test"], remote_senders={"fwd@remote.test": srs})
            await eventually(lambda: bool(remote.handler.received), what="delivery")
    assert remote.handler.received[0].mail_from == srs


async def test_r_out_3_restart_mid_delivery_resends_only_unaccepted_recipients(
        redis_url: str, nats_url: str, redis: aioredis.Redis, store: MessageStore) -> None:
    """A relay stopped while one destination holds the final dot: the next relay delivers that
    destination and never resends to the one that had already accepted."""
    await configure(redis)
    port = free_port()
    hold = asyncio.Event()
    stuck = SinkHandler(data_hold=hold)
    async with LoopbackDnsServer({**zone("fast.test"), **zone("slow.test", mx_ip="127.0.0.2")}) as dns, \
            sink(port=port) as fast, sink(host="127.0.0.2", port=port, handler=stuck) as slow:
        async with running_relay(redis_url, nats_url, dns, port, ack_wait_seconds=5.0) as first:
            record, _ = await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                                           remote_recipients=["a@fast.test", "b@fast.test", "c@slow.test"])
            await eventually(lambda: bool(fast.handler.received) and slow.handler.in_data.is_set(),
                             what="fast delivered, slow in DATA")
            # Killed, as far as JetStream can tell: its connection drops, no ack, no nak.
            await first.runtime.nc.close()
            for task in [*first._tasks, first._loop_task]:
                if task is not None:
                    task.cancel()
            await asyncio.sleep(0.2)
        states = await relay_queue.RecipientStore(redis).load(record.transaction_id)
        assert states["c@slow.test"].state == "sending" and states["a@fast.test"].state == "delivered"
        stuck.data_hold = None
        before = relay_queue.POSSIBLE_DUPLICATES._value.get()
        async with running_relay(redis_url, nats_url, dns, port):
            await eventually(lambda: bool(slow.handler.received), timeout=30, what="redelivery after ack_wait")
        hold.set()
        assert [r.rcpt_tos for r in fast.handler.received] == [["a@fast.test", "b@fast.test"]]
        assert [r.rcpt_tos for r in slow.handler.received] == [["c@slow.test"]]
        assert relay_queue.POSSIBLE_DUPLICATES._value.get() == before + 1


async def test_r_lim_6_messages_per_minute_to_a_domain_wait_nothing_dropped(
        redis_url: str, nats_url: str, redis: aioredis.Redis, store: MessageStore, relay_log: list[str]) -> None:
    """Two messages per window to remote.test (the window is shortened to 2 s here): the third
    and later wait for the next window, and all arrive."""
    await configure(redis, domain_messages_per_minute=2)
    async with LoopbackDnsServer(zone("remote.test")) as dns, sink() as remote:
        async with running_relay(redis_url, nats_url, dns, remote.port, rate_window_seconds=2.0):
            started = time.time()
            for i in range(5):
                await store.accept(MESSAGE.replace(b"<m1@", f"<m{i}@".encode()), mail_from="alice@example.org",
                                   local_mailboxes=[], remote_recipients=[f"u{i}@remote.test"])
            await eventually(lambda: len(remote.handler.received) == 5, timeout=30, what="five deliveries")
    times = sorted(r.at for r in remote.handler.received)
    # Fixed windows: five messages at two per window take three windows, so the last one
    # leaves at least one full window after the start (a burst may straddle a boundary).
    assert times[-1] - started >= 2.0, "five messages at two per window need three windows"
    assert "rate limited, waiting" in relay_log
    assert len({int(t // 2.0) for t in times}) >= 2


async def test_r_out_2_delay_notice_once_then_delivery(
        redis_url: str, nats_url: str, redis: aioredis.Redis, nats_conn: NATS, store: MessageStore) -> None:
    await configure(redis, delay_notice_hours=1 / 3600)
    await local_sender(redis)
    handler = SinkHandler(rcpt_replies={"bob@remote.test": ["450 4.2.1 try later"] * 4})
    async with LoopbackDnsServer(zone("remote.test")) as dns, sink(handler=handler) as remote:
        async with running_relay(redis_url, nats_url, dns, remote.port):
            await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                               remote_recipients=["bob@remote.test"])
            await eventually(lambda: bool(remote.handler.received), timeout=30, what="the final delivery")
            await asyncio.sleep(0.5)
    (notice,) = await mailbox_messages(redis, nats_conn, "alice@example.org")
    assert "Delayed Mail" in str(notice["Subject"])
    (block,) = delivery_status(notice)
    assert block["Action"] == "delayed" and block["Status"] == "4.2.1" and "Will-Retry-Until" in block


def test_r_out_2_dsn_parses_as_multipart_report() -> None:
    original = b"Subject: hi\r\nFrom: a@example.org\r\n\r\nbody\r\n"
    raw = build_dsn(reporting_mta="mx.example.org", sender="a@example.org", original=original,
                    original_id="q1", arrival_unix=1_700_000_000.0,
                    reports=[RecipientReport("b@remote.test", "failed", Reply(550, "5.1.1", "no such user", True),
                                             remote_mta="mx.remote.test")],
                    return_full=True)
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    kinds = [p.get_content_type() for p in parsed.iter_parts()]
    assert kinds == ["text/plain", "message/delivery-status", "message/rfc822"]
    (block,) = delivery_status(parsed)
    assert block["Status"] == "5.1.1" and block["Remote-MTA"] == "dns; mx.remote.test"


def test_r_out_2_return_path_is_not_relayed() -> None:
    data = b"Return-Path: <a@example.org>\r\nReceived: from x\r\n\r\nbody\r\n"
    assert relay_queue.strip_return_path(data) == b"Received: from x\r\n\r\nbody\r\n"
