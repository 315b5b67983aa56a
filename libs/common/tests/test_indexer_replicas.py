"""The catch-up indexer acks a record only once Redis replicas have its index writes (R-OPS-6):
with asynchronous replication, a primary lost right after the ack would take the entries with it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError

from rempart.common.events import MAIL_STREAM
from rempart.common.mailbox import Mailboxes, MailboxLog, run_indexer
from rempart.common.mailstore import MailboxIndex, MessageStore
from rempart.common.redisconn import connect_redis
from rempart.common.testing.localstack import start_redis_sentinel_group
from rempart.common.testing.polling import eventually

pytestmark = pytest.mark.timeout(90)


async def _accept_three(nats_conn: NATS) -> None:
    store = await MessageStore.open(nats_conn.jetstream())
    for n in range(3):
        await store.accept(f"Subject: {n}\r\n\r\nbody\r\n".encode(), mail_from="", local_mailboxes=["bob@example.org"],
                           remote_recipients=[])


async def _indexer(nats_conn: NATS, index: MailboxIndex) -> asyncio.Task[None]:
    js = nats_conn.jetstream()
    mailboxes = Mailboxes(await MessageStore.open(js), index, MailboxLog(js))
    return asyncio.create_task(run_indexer(js, mailboxes, wait_replicas=1))


async def _pending(nats_conn: NATS) -> tuple[int, int]:
    try:
        info = await nats_conn.jetstream().consumer_info(MAIL_STREAM, "mailbox-indexer", timeout=2)
    except NotFoundError:
        return 0, 0  # the indexer has not created its consumer yet
    return int(info.num_ack_pending), int(info.delivered.stream_seq)


async def test_r_ops_6_records_are_acked_once_a_replica_has_the_index(nats_conn: NATS, tmp_path: Path) -> None:
    group = start_redis_sentinel_group(tmp_path, replicas=1, sentinels=3)
    client = connect_redis(group.url, max_connections=1)
    await _accept_three(nats_conn)
    task = await _indexer(nats_conn, MailboxIndex(client))
    try:
        async def all_acked() -> bool:
            pending, delivered = await _pending(nats_conn)
            return delivered >= 3 and pending == 0
        await eventually(all_acked, timeout=20, what="the indexer acked every record")
        assert len(await MailboxIndex(client).messages("bob@example.org")) == 3
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()
        group.stop()


async def test_r_ops_6_without_the_replica_nothing_is_acked(nats_conn: NATS, redis_url: str) -> None:
    client = connect_redis(redis_url, max_connections=1)  # a lone Redis: WAIT 1 never succeeds
    await _accept_three(nats_conn)
    task = await _indexer(nats_conn, MailboxIndex(client))
    try:
        async def delivered() -> bool:
            return (await _pending(nats_conn))[1] >= 3
        await eventually(delivered, timeout=20, what="the indexer received the records")
        await asyncio.sleep(2.5)  # a few WAIT timeouts (1 s each)
        pending, _ = await _pending(nats_conn)
        assert pending >= 1  # written to the index, but held unacked until a replica has them
        assert len(await MailboxIndex(client).messages("bob@example.org")) == 3
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()
