"""The relay acting on what the admin API changes in the queue (rempart.common.outqueue): a retry
asked for is taken at once by exactly one replica; a removal stops the delivery before the next
connection or final dot, and the record is acknowledged without a bounce. Real Redis, NATS
JetStream, the loopback DNS server and aiosmtpd sinks as the remote MX."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from aiosmtpd.smtp import SMTP, Envelope, Session
from nats.aio.client import Client as NATS

from rempart.common.events import MAIL_STREAM
from rempart.common.mailstore import MessageStore
from rempart.common.outqueue import RETRY_SUBJECT, OutboundQueue
from rempart.common.testing.dnsserver import LoopbackDnsServer
from rempart.common.testing.polling import eventually
from rempart.smtp_edge.relay import queue as relay_queue
from rempart.smtp_edge.relay.replies import REMOVED

from .test_relay import (
    MESSAGE,
    SinkHandler,
    configure,
    local_sender,
    mailbox_messages,
    running_relay,
    sink,
    store,
    zone,
)

__all__ = ["store"]  # the fixture, shared with test_relay
GREYLISTED = "451 4.7.1 greylisted, come back later"


@dataclass
class HeldAtRcpt(SinkHandler):
    """Answers RCPT only once ``rcpt_hold`` is set: the relay is mid-transaction meanwhile."""

    rcpt_hold: asyncio.Event = field(default_factory=asyncio.Event)
    in_rcpt: asyncio.Event = field(default_factory=asyncio.Event)
    resets: int = 0

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        self.in_rcpt.set()
        await self.rcpt_hold.wait()
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.resets += 1
        return "250 2.0.0 OK"


async def deferred(queue: OutboundQueue, txn: str, rcpt: str = "bob@remote.test") -> bool:
    state = (await queue.load(txn)).get(rcpt)
    return state is not None and state.state == "pending" and state.attempts >= 1


async def gone(queue: OutboundQueue, txn: str) -> bool:
    return await queue.get(txn) is None


async def settled(nats_conn: NATS) -> bool:
    """The relay's consumer holds no record any more: every one was acknowledged."""
    info = await nats_conn.jetstream().consumer_info(MAIL_STREAM, "relay")
    return info.num_ack_pending == 0 and info.num_pending == 0


async def test_r_out_2_retry_asked_for_is_taken_at_once_by_one_replica(
        redis_url: str, nats_url: str, redis: aioredis.Redis, nats_conn: NATS, store: MessageStore) -> None:
    """A message deferred for an hour (451), retried through the queue's state: one of two relay
    replicas delivers it within seconds, once; a retry whose announcement nobody heard is found
    by the replicas' own look within a few seconds."""
    await configure(redis, retry_backoff_seconds=[3600])
    handler = SinkHandler(rcpt_replies={"bob@remote.test": [GREYLISTED], "carol@remote.test": [GREYLISTED]})
    queue = OutboundQueue(redis)
    async with LoopbackDnsServer(zone("remote.test")) as dns, sink(handler=handler) as remote:
        async with running_relay(redis_url, nats_url, dns, remote.port), \
                running_relay(redis_url, nats_url, dns, remote.port, instance="relay-2"):
            first, _ = await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                                          remote_recipients=["bob@remote.test"])
            second, _ = await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                                           remote_recipients=["carol@remote.test"])
            await eventually(lambda: deferred(queue, first.transaction_id), what="the first deferral")
            await eventually(lambda: deferred(queue, second.transaction_id, "carol@remote.test"),
                             what="the second deferral")
            message = await queue.get(first.transaction_id)
            assert message is not None and message.seq > 0
            assert message.recipients["bob@remote.test"].reply == GREYLISTED

            asked = time.monotonic()
            assert await queue.retry(first.transaction_id) == ["bob@remote.test"]
            await nats_conn.publish(RETRY_SUBJECT, first.transaction_id.encode())
            await eventually(lambda: len(remote.handler.received) == 1, timeout=10, what="the retried delivery")
            assert time.monotonic() - asked < 5
            await eventually(lambda: gone(queue, first.transaction_id), what="out of the queue")

            assert await queue.retry(second.transaction_id) == ["carol@remote.test"]  # not announced
            await eventually(lambda: len(remote.handler.received) == 2, timeout=15, what="the polled retry")
            await asyncio.sleep(1)  # a second replica delivering it too would do it now
    assert sorted(r.rcpt_tos[0] for r in remote.handler.received) == ["bob@remote.test", "carol@remote.test"]
    states = await queue.load(first.transaction_id)
    assert states["bob@remote.test"].state == "delivered" and states["bob@remote.test"].attempts == 1


async def test_r_out_2_removed_during_the_transaction_the_final_dot_is_never_sent(
        redis_url: str, nats_url: str, redis: aioredis.Redis, nats_conn: NATS, store: MessageStore) -> None:
    await configure(redis)
    await local_sender(redis)
    handler = HeldAtRcpt()
    queue = OutboundQueue(redis)
    removed_before = relay_queue.DELIVERIES.labels("removed")._value.get()
    async with LoopbackDnsServer(zone("remote.test")) as dns, sink(handler=handler) as remote:
        async with running_relay(redis_url, nats_url, dns, remote.port):
            record, _ = await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                                           remote_recipients=["bob@remote.test"])
            await asyncio.wait_for(handler.in_rcpt.wait(), 10)
            assert await queue.remove(record.transaction_id, "admin@example.org")
            handler.rcpt_hold.set()  # the remote accepts the recipient: the relay must not go on
            await eventually(lambda: settled(nats_conn), what="the record acknowledged")
            await asyncio.sleep(0.5)
        assert remote.handler.received == [] and handler.resets >= 1
    state = (await queue.load(record.transaction_id))["bob@remote.test"]
    assert (state.state, state.reply) == ("dropped", str(REMOVED))
    assert relay_queue.DELIVERIES.labels("removed")._value.get() == removed_before + 1
    assert await mailbox_messages(redis, nats_conn, "alice@example.org") == []  # no bounce


async def test_r_out_2_removed_deferred_message_is_not_delivered_when_the_remote_accepts_later(
        redis_url: str, nats_url: str, redis: aioredis.Redis, nats_conn: NATS, store: MessageStore) -> None:
    await configure(redis, retry_backoff_seconds=[1.5])
    await local_sender(redis)
    handler = SinkHandler(rcpt_replies={"bob@remote.test": [GREYLISTED]})  # then 250
    queue = OutboundQueue(redis)
    async with LoopbackDnsServer(zone("remote.test")) as dns, sink(handler=handler) as remote:
        async with running_relay(redis_url, nats_url, dns, remote.port):
            record, _ = await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                                           remote_recipients=["bob@remote.test"])
            await eventually(lambda: deferred(queue, record.transaction_id), what="the deferral")
            assert await queue.remove(record.transaction_id, "admin@example.org")
            await eventually(lambda: settled(nats_conn), timeout=10, what="the record acknowledged")
            await asyncio.sleep(2)  # past the next attempt it would have had
        assert remote.handler.received == [] and remote.handler.rcpt_seen == ["bob@remote.test"]
    assert (await queue.load(record.transaction_id))["bob@remote.test"].state == "dropped"
    assert await mailbox_messages(redis, nats_conn, "alice@example.org") == []
