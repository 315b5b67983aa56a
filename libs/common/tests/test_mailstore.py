"""The message store and mailbox index (DESIGN.md "Durability", R-OPS-3)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from rempart.common.mailbox import Mailboxes, MailboxLog
from rempart.common.mailstore import MailboxIndex, MessageStore


async def test_r_ops_3_one_copy_for_many_recipients_and_idempotent_index(
    redis: aioredis.Redis, nats_conn: NATS
) -> None:
    js = nats_conn.jetstream()
    store = await MessageStore.open(js, inline_max_bytes=1024)
    index = MailboxIndex(redis)
    writer = Mailboxes(store, index, MailboxLog(js))
    mailboxes = [f"user{i}@example.org" for i in range(100)]
    small = b"Subject: hi\r\n\r\nbody\r\n"
    large = b"Subject: big\r\n\r\n" + b"x" * 300_000 + b"\r\n"
    for data in (small, large):
        record, seq = await store.accept(data, mail_from="a@b.example", local_mailboxes=mailboxes,
                                         remote_recipients=[])
        assert seq > 0
        first = await writer.place(record, None, seq)
        again = await writer.place(record, None, seq)
        assert first == again
        assert await store.record_body(record) == data
    # The small message lives inside its record (one acknowledged write); the large one is
    # one blob for all hundred mailboxes.
    objects = await (await js.object_store("MAILBLOBS")).list()
    assert len(objects) == 1
    inbox = await index.messages(mailboxes[42])
    assert [m.blob == "" for m in inbox] == [True, False]
    assert [await store.read_message(m) for m in inbox] == [small, large]


async def test_r_ops_3_an_inline_record_cannot_be_indexed_without_its_sequence(
    redis: aioredis.Redis, nats_conn: NATS
) -> None:
    store = await MessageStore.open(nats_conn.jetstream())
    record, _ = await store.accept(b"Subject: x\r\n\r\n", mail_from="", local_mailboxes=["a@b.c"],
                                   remote_recipients=[])
    with pytest.raises(ValueError, match="stream sequence"):
        await MailboxIndex(redis).file(record, ["a@b.c"])


async def test_r_ops_3_reindex_command_rebuilds_a_lost_index(
    redis: aioredis.Redis, nats_conn: NATS, redis_url: str, nats_url: str
) -> None:
    import os
    import sys

    js = nats_conn.jetstream()
    store = await MessageStore.open(js)
    index = MailboxIndex(redis)
    writer = Mailboxes(store, index, MailboxLog(js))
    ids = []
    for n in range(3):
        record, seq = await store.accept(f"Subject: {n}\r\n\r\n".encode(), mail_from="",
                                         local_mailboxes=["carol@example.org", "dave@example.org"],
                                         remote_recipients=[])
        await writer.place(record, None, seq)  # as the edge does; the indexer never filed them
        ids.append(record.transaction_id)
    before = await index.status("carol@example.org")
    await redis.flushall()  # the index is lost; the mail is not

    env = dict(os.environ, REMPART_REDIS_URL=redis_url, REMPART_NATS_URL=nats_url, REMPART_LOG_FORMAT="text")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rempart.common.reindex", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == "rebuilt the mailbox index: 6 messages"
    for mailbox in ("carol@example.org", "dave@example.org"):
        messages = await index.messages(mailbox)
        assert [m.transaction_id for m in messages] == ids
        assert await store.read_message(messages[2]) == b"Subject: 2\r\n\r\n"
    after = await index.status("carol@example.org")
    assert (after.exists, after.uidnext) == (3, 104)
    # Indexed by the edge only, never filed: the folder comes back with its UIDVALIDITY (the
    # reservation of its UIDs is in the log) and the messages above what was reserved, so no
    # UID a client saw names another message (RFC 3501 2.3.1.1).
    assert after.uidvalidity == before.uidvalidity
    assert [m.uid for m in await index.messages("carol@example.org")] == [101, 102, 103]


async def test_r_mbx_2_unseen_count_follows_every_change_without_reading_the_folder(
    redis: aioredis.Redis, nats_conn: NATS
) -> None:
    """STATUS UNSEEN reads one counter (R-MBX-2); it stays what a count of the messages gives
    through deliveries, APPEND with \\Seen, COPY, STORE (set, add, remove), EXPUNGE, RENAME and
    a rebuild; a folder from before the counter is counted once."""
    from rempart.common import keys
    from rempart.common.mailbox import rebuild_index
    from rempart.common.mailstore import INBOX

    js = nats_conn.jetstream()
    index = MailboxIndex(redis)
    writer = Mailboxes(await MessageStore.open(js), index, MailboxLog(js))
    bob = "bob@example.org"

    async def counted(folder: str) -> int:
        return sum(1 for m in await index.messages(bob, folder) if "\\Seen" not in m.flags)

    async def check(*folders: str) -> None:
        for folder in folders:
            assert await index.unseen_count(bob, folder) == await counted(folder), folder

    for n in range(6):
        record, seq = await writer.store.accept(f"Subject: {n}\r\n\r\nx\r\n".encode(), mail_from="a@b.example",
                                                local_mailboxes=[bob], remote_recipients=[])
        await writer.place(record, None, seq)
    await writer.append(bob, INBOX, [(b"Subject: read\r\n\r\nx\r\n", ["\\Seen"], 0)])
    assert await index.unseen_count(bob) == 6
    assert await writer.create_folder(bob, "Archive")
    inbox = (await index.status(bob)).uidvalidity
    await writer.change_flags(bob, INBOX, inbox, [1, 2], "add", {"\\Seen"})
    await writer.change_flags(bob, INBOX, inbox, [2, 7], "remove", {"\\Seen"})
    await writer.change_flags(bob, INBOX, inbox, [3], "set", {"\\Seen", "$Work"})
    await writer.change_flags(bob, INBOX, inbox, [3], "add", {"\\Seen"})  # no change
    await check(INBOX, "Archive")
    await writer.copy(bob, INBOX, "Archive", [1, 2, 3, 4])
    await check(INBOX, "Archive")
    messages = await index.messages(bob)
    await writer.expunge(bob, INBOX, inbox, [m for m in messages if m.uid in (1, 4, 5)])
    await check(INBOX, "Archive")
    assert await writer.rename_folder(bob, "Archive", "Old")
    await check(INBOX, "Old")
    assert await index.unseen_count(bob, "Archive") == 0  # gone
    # A folder from before the counter: counted once, then kept.
    await redis.hdel(keys.mailbox_meta(bob, INBOX), "unseen")
    await check(INBOX)
    await writer.change_flags(bob, INBOX, inbox, [6], "add", {"\\Seen"})
    await check(INBOX)
    await redis.flushall()
    await rebuild_index(js, writer)
    assert await redis.hexists(keys.mailbox_meta(bob, INBOX), "unseen")
    await check(INBOX, "Old")


async def test_r_mbx_6_inline_records_are_read_in_batches(redis: aioredis.Redis, nats_conn: NATS) -> None:
    """FETCH 1:* of a folder filled in one go reads its records by batched direct gets (one
    request per run of nearby stream sequences); what a batch does not cover is left to the
    one-by-one read, and a record is only returned for its own transaction."""
    js = nats_conn.jetstream()
    store = await MessageStore.open(js)
    wanted: dict[int, str] = {}
    bodies: dict[int, bytes] = {}
    for n in range(12):
        data = f"Subject: batch {n}\r\n\r\nbody {n}\r\n".encode()
        record, seq = await store.accept(data, mail_from="a@b.example", local_mailboxes=["bob@example.org"],
                                         remote_recipients=[])
        if n % 4 != 3:  # a few records in the run are not wanted: still one request
            wanted[seq], bodies[seq] = record.transaction_id, data
    lone, _ = await store.accept(b"Subject: far\r\n\r\nx\r\n", mail_from="a@b.example",
                                 local_mailboxes=["bob@example.org"], remote_recipients=[])
    for _ in range(300):  # far from the others
        await store.accept(b"Subject: filler\r\n\r\nx\r\n", mail_from="a@b.example", local_mailboxes=["c@example.org"],
                           remote_recipients=[])
    far, far_seq = await store.accept(b"Subject: far away\r\n\r\nx\r\n", mail_from="a@b.example",
                                      local_mailboxes=["bob@example.org"], remote_recipients=[])
    first = min(wanted)
    mislabelled = first + 1  # asked for under another transaction id: not returned
    asked = dict(wanted) | {far_seq: far.transaction_id, mislabelled: "not-this-transaction"}
    got = await store.read_record_bodies(asked)
    assert got == {seq: body for seq, body in bodies.items() if seq != mislabelled}
    assert far_seq not in got  # alone: read one by one by the caller
    assert await store.read_record_bodies({first: wanted[first]}) == {}  # one record: not worth a batch
    assert lone.transaction_id
