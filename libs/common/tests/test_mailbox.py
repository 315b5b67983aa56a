"""The mailbox change log and the rebuild from it (DESIGN "The mailbox: one change log", R-MBX-1,
R-MBX-3), against real Redis and NATS JetStream."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from rempart.common.events import MAILBOX_LOG_STREAM, mailbox_log_subject
from rempart.common.mailbox import Mailboxes, MailboxLog, rebuild_index, run_indexer
from rempart.common.mailstore import INBOX, IndexedMessage, MailboxIndex, MessageStore
from rempart.common.pb.events.v1 import events_pb2

BOB = "bob@example.org"
CAROL = "carol@example.org"


async def open_mailboxes(redis: aioredis.Redis, nats_conn: NATS) -> Mailboxes:
    js = nats_conn.jetstream()
    return Mailboxes(await MessageStore.open(js), MailboxIndex(redis), MailboxLog(js))


async def deliver(mailboxes: Mailboxes, subject: str, *accounts: str, file: bool = True) -> str:
    """As the SMTP edge does (accept, index inline), then, with ``file``, as the catch-up
    indexer does (file it in the change log)."""
    record, seq = await mailboxes.store.accept(f"Subject: {subject}\r\n\r\nbody\r\n".encode(), mail_from="a@b.example",
                                               local_mailboxes=list(accounts or [BOB]), remote_recipients=[])
    await mailboxes.place(record, None, seq)
    if file:
        await mailboxes.file([(record, seq)])
    return record.transaction_id


async def snapshot(mailboxes: Mailboxes, account: str = BOB) -> dict[str, object]:
    """What an IMAP client can see of an account: folders with UIDVALIDITY and each message's
    UID, transaction and flags; special uses; subscriptions. (UIDNEXT may grow in a rebuild:
    it restarts at the mark the log reserved, see :func:`uidnexts`.)"""
    index = mailboxes.index
    folders = {}
    for name in await index.folders(account):
        status = await index.status(account, name)
        messages = [(m.uid, m.transaction_id, sorted(m.flags)) for m in await index.messages(account, name)]
        folders[name] = (status.uidvalidity, messages)
    return {"folders": folders, "uses": await index.special_uses(account),
            "subscribed": sorted(await mailboxes.subscriptions(account))}


async def uidnexts(mailboxes: Mailboxes, account: str = BOB) -> dict[str, int]:
    return {name: (await mailboxes.index.status(account, name)).uidnext
            for name in await mailboxes.index.folders(account)}


async def test_r_mbx_1_rebuild_gives_back_folders_uids_flags_and_subscriptions(
    redis: aioredis.Redis, nats_conn: NATS
) -> None:
    mailboxes = await open_mailboxes(redis, nats_conn)
    await mailboxes.provision(BOB)
    for n in range(5):
        await deliver(mailboxes, f"m{n}", BOB, CAROL)
    inbox = (await mailboxes.index.status(BOB, INBOX)).uidvalidity
    await mailboxes.change_flags(BOB, INBOX, inbox, [1, 2], "add", {"\\Seen", "$Label1"})
    await mailboxes.change_flags(BOB, INBOX, inbox, [2], "remove", {"$Label1"})
    await mailboxes.change_flags(BOB, INBOX, inbox, [3], "set", {"\\Flagged"})
    messages = await mailboxes.index.messages(BOB, INBOX)
    await mailboxes.expunge(BOB, INBOX, inbox, [messages[3]])  # UID 4 is gone for good
    # Folders: an empty one, one with mail, a renamed one (its mail, UIDs and special use move),
    # a deleted one; COPY into one; subscriptions changed.
    assert await mailboxes.create_folder(BOB, "Empty")
    assert await mailboxes.create_folder(BOB, "Projects")
    await mailboxes.append(BOB, "Projects", [(b"Subject: p1\r\n\r\nx\r\n", ["\\Draft"], 1_700_000_000_000),
                                             (b"Subject: p2\r\n\r\ny\r\n", [], 0)])
    assert await mailboxes.rename_folder(BOB, "Projects", "Archive/Projects")
    assert await mailboxes.create_folder(BOB, "Archive")
    assert await mailboxes.rename_folder(BOB, "Trash", "Bin")
    assert await mailboxes.create_folder(BOB, "Doomed")
    await mailboxes.append(BOB, "Doomed", [(b"Subject: d\r\n\r\nz\r\n", [], 0)])
    await mailboxes.delete_folder(BOB, "Doomed")
    await mailboxes.subscribe(BOB, ["Archive/Projects"], True)
    await mailboxes.subscribe(BOB, ["Junk"], False)
    before = {BOB: await snapshot(mailboxes, BOB), CAROL: await snapshot(mailboxes, CAROL)}
    next_before = await uidnexts(mailboxes)
    assert before[BOB]["uses"] == {"Sent": "\\Sent", "Drafts": "\\Drafts", "Bin": "\\Trash", "Junk": "\\Junk"}

    highest_before = (await mailboxes.index.status(BOB, INBOX)).highestmodseq
    await redis.flushall()  # the index is lost; the mail and its log are not
    indexed = await rebuild_index(nats_conn.jetstream(), mailboxes)
    # RFC 7162: MODSEQ never goes back; a client resynchronising from before the loss is told
    # every flag, and (the expunge history being gone) every UID it cannot find.
    assert (await mailboxes.index.status(BOB, INBOX)).highestmodseq > highest_before
    assert (await mailboxes.index.vanished(BOB, INBOX, highest_before))[1] is False

    assert indexed == 4 + 5 + 2
    after = {BOB: await snapshot(mailboxes, BOB), CAROL: await snapshot(mailboxes, CAROL)}
    assert after == before
    next_after = await uidnexts(mailboxes)
    assert next_after.keys() == next_before.keys()
    assert all(next_after[name] >= next_before[name] for name in next_before)
    folders = after[BOB]["folders"]
    assert isinstance(folders, dict)
    assert [(uid, flags) for uid, _, flags in folders[INBOX][1]] == [
        (1, ["$Label1", "\\Seen"]), (2, ["\\Seen"]), (3, ["\\Flagged"]), (5, [])]
    assert "Doomed" not in folders and "Empty" in folders and folders["Empty"][1] == []
    # New folders after a rebuild still get a larger UIDVALIDITY than any before.
    assert await mailboxes.create_folder(BOB, "Later")
    later = (await mailboxes.index.status(BOB, "Later")).uidvalidity
    assert later > max(v for v, _ in folders.values())


async def test_r_mbx_3_concurrent_flag_changes_replay_in_the_order_redis_applied_them(
    redis: aioredis.Redis, nats_conn: NATS
) -> None:
    mailboxes = await open_mailboxes(redis, nats_conn)
    await deliver(mailboxes, "m")
    uidvalidity = (await mailboxes.index.status(BOB, INBOX)).uidvalidity
    # Many sessions at once: additions of different flags, a set, removals.
    changes = [("add", {f"$k{n}"}) for n in range(20)] + [("set", {"\\Seen"})] + \
              [("remove", {f"$k{n}"}) for n in range(0, 20, 3)] + [("add", {"\\Answered"})]
    await asyncio.gather(*(mailboxes.change_flags(BOB, INBOX, uidvalidity, [1], mode, flags)
                           for mode, flags in changes))
    live = (await mailboxes.index.messages(BOB))[0].flags

    await redis.flushall()
    await rebuild_index(nats_conn.jetstream(), mailboxes)

    assert (await mailboxes.index.messages(BOB))[0].flags == live


async def test_r_mbx_1_a_copy_and_a_store_cut_before_their_log_write_are_recorded_later(
    redis: aioredis.Redis, nats_conn: NATS
) -> None:
    """A replica killed between Redis's decision and the log write (the MOVE cut by kill -9 in
    the e2e durability test): the index has the copy and the flag, the log does not. The
    journal that Redis keeps with the change lets the next login (or the rebuild) record them,
    so a rebuild shows what the live index showed."""
    mailboxes = await open_mailboxes(redis, nats_conn)
    await mailboxes.provision(BOB)
    await deliver(mailboxes, "to archive")
    await deliver(mailboxes, "to flag")
    await deliver(mailboxes, "archived whole")
    assert await mailboxes.create_folder(BOB, "Archive")
    await mailboxes.copy(BOB, INBOX, "Archive", [3])  # logged, and UIDs reserved in the log
    inbox = (await mailboxes.index.status(BOB, INBOX)).uidvalidity
    # What Mailboxes.copy and change_flags do first, with the log write that follows cut off.
    copied = await mailboxes.index.copy(BOB, INBOX, "Archive", [1])
    assert isinstance(copied, tuple) and copied[0][0].place.uid == 2
    _, _, entry = await mailboxes.index.change_flags(BOB, INBOX, inbox, [2], "add", {"$Important"})
    assert entry
    assert len(await mailboxes.index.journal(BOB)) == 2
    live = await snapshot(mailboxes)

    assert await mailboxes.recover(BOB) == 2  # the next login
    assert await mailboxes.index.journal(BOB) == {}
    assert await mailboxes.recover(BOB) == 0
    await redis.flushall()
    await rebuild_index(nats_conn.jetstream(), mailboxes)
    assert await snapshot(mailboxes) == live
    folders = live["folders"]
    assert isinstance(folders, dict) and [m[0] for m in folders["Archive"][1]] == [1, 2]

    # Without a login in between, the rebuild itself records the journal before it flushes.
    await mailboxes.copy(BOB, INBOX, "Archive", [3])  # a rebuild leaves no UID headroom: reserve
    copied = await mailboxes.index.copy(BOB, INBOX, "Archive", [2])
    assert isinstance(copied, tuple)
    live = await snapshot(mailboxes)
    await rebuild_index(nats_conn.jetstream(), mailboxes)
    assert await snapshot(mailboxes) == live


async def test_r_mbx_1_completed_copies_and_stores_leave_no_journal(redis: aioredis.Redis, nats_conn: NATS) -> None:
    mailboxes = await open_mailboxes(redis, nats_conn)
    await deliver(mailboxes, "m")
    assert await mailboxes.create_folder(BOB, "Archive")
    inbox = (await mailboxes.index.status(BOB, INBOX)).uidvalidity
    await mailboxes.copy(BOB, INBOX, "Archive", [1])
    await mailboxes.change_flags(BOB, INBOX, inbox, [1], "add", {"\\Seen"})
    await mailboxes.change_flags(BOB, INBOX, inbox, [1], "add", {"\\Seen"})  # changes nothing
    assert await mailboxes.index.journal(BOB) == {}
    assert await redis.exists(f"rp:mbx:{{{BOB}}}:journal") == 0


async def test_r_mbx_1_mail_not_filed_yet_comes_back_above_every_reserved_uid(
    redis: aioredis.Redis, nats_conn: NATS
) -> None:
    mailboxes = await open_mailboxes(redis, nats_conn)
    for n in range(3):
        await deliver(mailboxes, f"filed{n}")
    assert await mailboxes.create_folder(BOB, "Other")
    other = await mailboxes.index.status(BOB, "Other")
    before = await mailboxes.index.status(BOB, INBOX)
    late = await deliver(mailboxes, "late", file=False)  # indexed by the edge (UID 4), Redis lost before filing

    await redis.flushall()
    await rebuild_index(nats_conn.jetstream(), mailboxes)

    after = await mailboxes.index.status(BOB, INBOX)
    messages = await mailboxes.index.messages(BOB, INBOX)
    # A client may have seen the late message as UID 4, a UID nobody recorded: it comes back
    # above every UID the log reserved (so UID 4 never names another message), and nothing
    # else moves: same UIDVALIDITY, same UIDs for the filed ones.
    assert after.uidvalidity == before.uidvalidity
    assert [m.uid for m in messages] == [1, 2, 3, 101] and messages[3].transaction_id == late
    assert (await mailboxes.index.status(BOB, "Other")).uidvalidity == other.uidvalidity
    # Its new UID is in the log: a second rebuild gives the same answer.
    await redis.flushall()
    await rebuild_index(nats_conn.jetstream(), mailboxes)
    assert (await mailboxes.index.status(BOB, INBOX)).uidvalidity == after.uidvalidity
    assert [m.uid for m in await mailboxes.index.messages(BOB, INBOX)] == [1, 2, 3, 101]
    # New mail after the rebuild takes the next UIDs, a reservation recorded first.
    await deliver(mailboxes, "next", file=False)
    assert [m.uid for m in await mailboxes.index.messages(BOB, INBOX)][-1] == 102
    await redis.flushall()
    await rebuild_index(nats_conn.jetstream(), mailboxes)
    assert [m.uid for m in await mailboxes.index.messages(BOB, INBOX)] == [1, 2, 3, 101, 202]


async def test_r_mbx_1_catch_up_indexer_files_what_the_edge_indexed(
    redis: aioredis.Redis, nats_conn: NATS
) -> None:
    js = nats_conn.jetstream()
    mailboxes = await open_mailboxes(redis, nats_conn)
    txns = [await deliver(mailboxes, f"m{n}", file=False) for n in range(4)]
    indexer = asyncio.create_task(run_indexer(js, mailboxes, durable="test-indexer"))
    try:
        subject = mailbox_log_subject(BOB)
        change = events_pb2.MailboxChange()
        for _ in range(100):  # the first record is the edge's reservation of UIDs; then the filing
            msg = await js.get_last_msg(MAILBOX_LOG_STREAM, subject)
            change = events_pb2.MailboxChange.FromString(msg.data or b"")
            if change.filed.messages:
                break
            await asyncio.sleep(0.05)
        assert change.WhichOneof("change") == "filed"
        assert [(m.transaction_id, m.uid) for m in change.filed.messages] == list(zip(txns, [1, 2, 3, 4], strict=True))
    finally:
        indexer.cancel()
    before = await mailboxes.index.status(BOB, INBOX)
    await redis.flushall()
    await rebuild_index(js, mailboxes)
    after = await mailboxes.index.status(BOB, INBOX)
    assert (after.uidvalidity, after.exists) == (before.uidvalidity, before.exists)  # filed: nothing moved
    assert [m.uid for m in await mailboxes.index.messages(BOB, INBOX)] == [1, 2, 3, 4]


async def test_r_mbx_1_expunge_of_more_than_a_record_holds(redis: aioredis.Redis, nats_conn: NATS) -> None:
    # One EXPUNGE of 25,000 messages is split into records under NATS's payload limit.
    mailboxes = await open_mailboxes(redis, nats_conn)
    uidvalidity = 7
    messages = [IndexedMessage(uid, "", 0, 0, frozenset(), f"t{uid}") for uid in range(1, 25_001)]
    await mailboxes.expunge(BOB, INBOX, uidvalidity, messages)
    info = await nats_conn.jetstream().stream_info(MAILBOX_LOG_STREAM, subjects_filter=mailbox_log_subject(BOB))
    assert info.state.messages == 3


async def test_r_mbx_5_copy_files_the_same_message_again_without_copying_it(
    redis: aioredis.Redis, nats_conn: NATS
) -> None:
    js = nats_conn.jetstream()
    mailboxes = await open_mailboxes(redis, nats_conn)
    big = b"Subject: big\r\n\r\n" + b"x" * 200_000 + b"\r\n"  # a blob, not inline
    record, seq = await mailboxes.store.accept(big, mail_from="", local_mailboxes=[BOB], remote_recipients=[])
    await mailboxes.file([(record, seq)])
    await deliver(mailboxes, "small")
    inbox = (await mailboxes.index.status(BOB, INBOX)).uidvalidity
    await mailboxes.change_flags(BOB, INBOX, inbox, [1], "add", {"\\Flagged"})
    assert await mailboxes.create_folder(BOB, "Keep")
    mail_before = (await js.stream_info("MAIL")).state.messages
    blobs_before = len(await (await js.object_store("MAILBLOBS")).list())

    copies = await mailboxes.copy(BOB, INBOX, "Keep", [1, 2, 99])
    again = await mailboxes.copy(BOB, INBOX, "Keep", [1])  # the same message twice: two copies

    assert [(c.source_uid, c.place.uid) for c in copies + again] == [(1, 1), (2, 2), (99, 0), (1, 3)]
    assert copies[0].flags == frozenset({"\\Flagged"})
    assert (await js.stream_info("MAIL")).state.messages == mail_before  # no record written
    assert len(await (await js.object_store("MAILBLOBS")).list()) == blobs_before  # no blob either
    kept = await mailboxes.index.messages(BOB, "Keep")
    assert [await mailboxes.store.read_message(m) for m in kept] == [big, b"Subject: small\r\n\r\nbody\r\n", big]
    # The original is expunged; the copies stay, and survive a rebuild with their flags.
    await mailboxes.expunge(BOB, INBOX, inbox, (await mailboxes.index.messages(BOB, INBOX))[:1])
    before = await snapshot(mailboxes)
    await redis.flushall()
    await rebuild_index(js, mailboxes)
    assert await snapshot(mailboxes) == before
    kept = await mailboxes.index.messages(BOB, "Keep")
    assert [sorted(m.flags) for m in kept] == [["\\Flagged"], [], ["\\Flagged"]]
    assert await mailboxes.store.read_message(kept[2]) == big


async def test_r_mbx_5_usage_follows_deliveries_copies_expunges_and_rebuilds(
    redis: aioredis.Redis, nats_conn: NATS
) -> None:
    mailboxes = await open_mailboxes(redis, nats_conn)
    for n in range(4):
        await deliver(mailboxes, f"m{n}")  # "Subject: mN\r\n\r\nbody\r\n": 21 bytes each
    assert await mailboxes.index.usage(BOB) == (84, 4)
    assert await mailboxes.create_folder(BOB, "Keep")
    await mailboxes.copy(BOB, INBOX, "Keep", [1, 2])
    assert await mailboxes.index.usage(BOB) == (126, 6)  # a copy counts (RFC 9208)
    uidvalidity = (await mailboxes.index.status(BOB, INBOX)).uidvalidity
    await mailboxes.expunge(BOB, INBOX, uidvalidity, (await mailboxes.index.messages(BOB, INBOX))[:3])
    assert await mailboxes.index.usage(BOB) == (63, 3)
    await redis.flushall()
    await rebuild_index(nats_conn.jetstream(), mailboxes)
    assert await mailboxes.index.usage(BOB) == (63, 3)
    await mailboxes.delete_folder(BOB, "Keep")
    assert await mailboxes.index.usage(BOB) == (21, 1)


async def test_r_mbx_5_the_last_reference_frees_the_blob_and_the_record(
    redis: aioredis.Redis, nats_conn: NATS
) -> None:
    js = nats_conn.jetstream()
    mailboxes = await open_mailboxes(redis, nats_conn)
    blobs = await js.object_store("MAILBLOBS")
    big = b"Subject: big\r\n\r\n" + b"x" * 200_000 + b"\r\n"  # a blob, not inline

    async def stored(record_seq: int) -> bool:
        try:
            await js.get_msg("MAIL", seq=record_seq, direct=True)
            return True
        except NotFoundError:
            return False

    async def accept(data: bytes, accounts: list[str], remote: list[str] | None = None) -> tuple[str, int]:
        record, seq = await mailboxes.store.accept(data, mail_from="a@b.example", local_mailboxes=accounts,
                                                   remote_recipients=remote or [])
        await mailboxes.place(record, None, seq)
        return record.blob, seq

    blob, big_seq = await accept(big, [BOB])
    _, shared_seq = await accept(b"Subject: both\r\n\r\nx\r\n", [BOB, CAROL])
    _, outbound_seq = await accept(b"Subject: out\r\n\r\nx\r\n", [BOB], ["far@remote.example"])
    assert await mailboxes.create_folder(BOB, "Trash2")
    await mailboxes.copy(BOB, INBOX, "Trash2", [1])
    inbox = (await mailboxes.index.status(BOB, INBOX)).uidvalidity
    # Bob expunges everything from INBOX: the big one lives on in Trash2, the shared one in
    # Carol's INBOX, the outbound one in its record for the relay.
    await mailboxes.expunge(BOB, INBOX, inbox, await mailboxes.index.messages(BOB, INBOX))
    await mailboxes.settle()
    assert blob in [o.name for o in await blobs.list()]
    assert await stored(big_seq) and await stored(shared_seq) and await stored(outbound_seq)
    size_before = (await js.stream_info("OBJ_MAILBLOBS")).state.bytes
    # "Empty Trash": the last reference to the big one goes, and its bytes with it.
    await mailboxes.delete_folder(BOB, "Trash2")
    await mailboxes.settle()  # the bytes go in the background
    assert (await js.stream_info("OBJ_MAILBLOBS")).state.bytes < size_before - 200_000
    assert not await stored(big_seq)
    # Carol's copy of the shared one was the last: freed when she expunges it.
    carol = (await mailboxes.index.status(CAROL, INBOX)).uidvalidity
    await mailboxes.expunge(CAROL, INBOX, carol, await mailboxes.index.messages(CAROL, INBOX))
    await mailboxes.settle()
    assert not await stored(shared_seq)
    assert await stored(outbound_seq)  # still the relay's


async def test_one_record_is_filed_in_all_its_mailboxes_by_one_call_each_as_far_as_it_can(
    redis: aioredis.Redis, nats_conn: NATS
) -> None:
    """Issue 11: one script call files a record in every mailbox it names. A mailbox whose UIDs
    reserved in the log are used up answers a reservation, the others are filed all the same;
    once reserved it is filed too, and filing again answers the same places."""
    from rempart.common.mailstore import Filed, Reservation

    mailboxes = await open_mailboxes(redis, nats_conn)
    for account in (BOB, CAROL):
        await mailboxes.provision(account)
    for n in range(100):  # the first delivery reserved UIDs 1 to 100 in BOB's INBOX
        await deliver(mailboxes, f"m{n}", BOB, file=False)
    await deliver(mailboxes, "carol's first", CAROL, file=False)  # UIDs 1 to 100 reserved, 1 taken
    record, seq = await mailboxes.store.accept(b"Subject: both\r\n\r\nx\r\n", mail_from="a@b.example",
                                               local_mailboxes=[BOB, CAROL], remote_recipients=[])
    first = await mailboxes.index.file(record, [BOB, CAROL], None, seq=seq)
    assert isinstance(first[BOB], Reservation) and first[BOB].uidnext == 101
    assert isinstance(first[CAROL], Filed) and first[CAROL].uid == 2
    placed = await mailboxes.place(record, None, seq)
    assert placed[BOB].uid == 101 and placed[CAROL] == first[CAROL]
    assert await mailboxes.index.file(record, [BOB, CAROL], None, seq=seq) == placed
    assert [m.uid for m in await mailboxes.index.messages(CAROL)] == [1, 2]
    assert len(await mailboxes.index.messages(BOB)) == 101


async def test_issue_11_the_indexer_files_a_delivery_with_its_summary_and_wakes_idle(
    redis: aioredis.Redis, nats_conn: NATS
) -> None:
    """Issue 11: the SMTP edge only stores (the 250 waits for the durable record); the indexer is
    where a delivery enters its mailboxes, once: filed in each, with the summary of a body the
    record holds (header syncs read no blob), announced to IMAP IDLE on every replica."""
    from rempart.common.events import mailbox_changed_subject

    js = nats_conn.jetstream()
    mailboxes = await open_mailboxes(redis, nats_conn)
    woken: list[tuple[str, bytes]] = []

    def waker(account: str) -> Callable[[Msg], Awaitable[None]]:
        async def woke(msg: Msg) -> None:
            woken.append((account, msg.data))
        return woke

    for account in (BOB, CAROL):
        await nats_conn.subscribe(mailbox_changed_subject(account), cb=waker(account))
    record, _ = await mailboxes.store.accept(b"Subject: both\r\nFrom: a@b.example\r\n\r\nhello\r\n",
                                             mail_from="a@b.example", local_mailboxes=[BOB, CAROL], remote_recipients=[])
    assert await mailboxes.index.messages(BOB) == []  # stored, not yet indexed: nobody else files it
    indexer = asyncio.create_task(run_indexer(js, mailboxes, durable="test-indexer", nc=nats_conn))
    try:
        for _ in range(200):
            if len(woken) == 2:
                break
            await asyncio.sleep(0.02)
    finally:
        indexer.cancel()
    assert sorted(woken) == [(BOB, b"INBOX"), (CAROL, b"INBOX")]
    for account in (BOB, CAROL):
        [message] = await mailboxes.index.messages(account)
        assert message.transaction_id == record.transaction_id and message.uid == 1
        summary = (await mailboxes.index.summaries(account, INBOX, [1]))[1]
        assert summary is not None and summary.header.startswith(b"Subject: both\r\n")
