"""The change log compacted into a snapshot per account (DESIGN "The mailbox": old history is
compacted so that replay stays short; R-MBX-1: the index stays rebuildable with folders, flags
and UIDs intact), against real Redis and NATS JetStream."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import example, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from test_mailbox import BOB, CAROL, deliver, open_mailboxes

from rempart.common import reindex
from rempart.common.events import (
    MAILBOX_LOG_STREAM,
    MAILBOX_SNAPSHOT_STREAM,
    mailbox_log_subject,
    mailbox_log_token,
    mailbox_snapshot_body_subject,
    subject_counts,
)
from rempart.common.mailbox import Mailboxes, rebuild_index
from rempart.common.mailbox_snapshot import (
    SNAPSHOT_CHUNK,
    AccountState,
    FolderState,
    SnapshotStore,
    compact_account,
    replay_accounts,
    run_compactor,
)
from rempart.common.mailstore import INBOX
from rempart.common.pb.events.v1 import events_pb2
from rempart.common.settings import ServiceSettings


async def view(mailboxes: Mailboxes, account: str = BOB, exact: bool = False) -> dict[str, object]:
    """What an IMAP client sees of an account: folders with UIDVALIDITY and each message's UID,
    identity and flags; special uses; subscriptions. ``exact`` adds what only a rebuild from
    the same log repeats exactly: UIDNEXT, HIGHESTMODSEQ, the change counter and the usage."""
    index = mailboxes.index
    folders = {}
    for name in sorted(await index.folders(account)):
        status = await index.status(account, name)
        messages = [(m.uid, m.transaction_id, sorted(m.flags)) for m in await index.messages(account, name)]
        folders[name] = (status.uidvalidity, messages, (status.uidnext, status.highestmodseq) if exact else None)
    out: dict[str, object] = {"folders": folders, "uses": await index.special_uses(account),
                              "subscribed": sorted(await mailboxes.subscriptions(account))}
    if exact:
        out["counter"] = await index.counter(account)
        out["usage"] = await index.usage(account)
    return out


async def views(mailboxes: Mailboxes, exact: bool = False) -> dict[str, object]:
    return {account: await view(mailboxes, account, exact) for account in (BOB, CAROL)}


async def rebuilt(redis: aioredis.Redis, js: JetStreamContext, mailboxes: Mailboxes, exact: bool = True
                  ) -> dict[str, object]:
    """The index lost, then rebuilt from JetStream."""
    await redis.flushall()
    await rebuild_index(js, mailboxes)
    return await views(mailboxes, exact)


async def records(js: JetStreamContext, account: str = BOB) -> int:
    subject = mailbox_log_subject(account)
    return (await subject_counts(js, MAILBOX_LOG_STREAM, subject)).get(subject, 0)


async def bodies(js: JetStreamContext, account: str = BOB) -> list[str]:
    """The snapshot bodies stored for an account (one once compactions are done)."""
    token = mailbox_log_token(account)
    return sorted(await subject_counts(js, MAILBOX_SNAPSHOT_STREAM, mailbox_snapshot_body_subject(token, "*")))


async def uid_of(mailboxes: Mailboxes, folder: str, n: int, account: str = BOB) -> int:
    return (await mailboxes.index.messages(account, folder))[n].uid


async def rich_mailbox(mailboxes: Mailboxes) -> None:
    """Every kind of change: deliveries to two accounts, flags (set, add, remove), expunges,
    folders made, renamed (Trash too: special use follows) and deleted with mail in them, COPY
    with flags, subscriptions."""
    await mailboxes.provision(BOB)
    for n in range(6):
        await deliver(mailboxes, f"m{n}", BOB, CAROL)
    inbox = (await mailboxes.index.status(BOB, INBOX)).uidvalidity
    await mailboxes.change_flags(BOB, INBOX, inbox, [1, 2], "add", {"\\Seen", "$Label1"})
    await mailboxes.change_flags(BOB, INBOX, inbox, [2], "remove", {"$Label1"})
    await mailboxes.change_flags(BOB, INBOX, inbox, [3], "set", {"\\Flagged"})
    await mailboxes.expunge(BOB, INBOX, inbox, [(await mailboxes.index.messages(BOB, INBOX))[3]])
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
    await mailboxes.copy(BOB, INBOX, "Archive", [1, 3])  # with their flags
    archive = (await mailboxes.index.status(BOB, "Archive")).uidvalidity
    await mailboxes.change_flags(BOB, "Archive", archive, [2], "add", {"$Copied"})
    # The original of a copy goes: the copy stays, and the delivery must not come back as unfiled.
    await mailboxes.expunge(BOB, INBOX, inbox, [(await mailboxes.index.messages(BOB, INBOX))[0]])
    await mailboxes.subscribe(BOB, ["Archive/Projects"], True)
    await mailboxes.subscribe(BOB, ["Junk"], False)
    carol = (await mailboxes.index.status(CAROL, INBOX)).uidvalidity
    await mailboxes.change_flags(CAROL, INBOX, carol, [2, 5], "add", {"\\Answered"})


async def more_changes(mailboxes: Mailboxes) -> None:
    """After a compaction: changes to what the snapshot holds, and new things."""
    inbox = (await mailboxes.index.status(BOB, INBOX)).uidvalidity
    await mailboxes.change_flags(BOB, INBOX, inbox, [await uid_of(mailboxes, INBOX, 0)], "remove", {"\\Seen"})
    await mailboxes.change_flags(BOB, INBOX, inbox, [await uid_of(mailboxes, INBOX, 1)], "set", {"$Later"})
    await mailboxes.expunge(BOB, INBOX, inbox, [(await mailboxes.index.messages(BOB, INBOX))[2]])
    for n in range(3):
        await deliver(mailboxes, f"after{n}", BOB)
    assert await mailboxes.rename_folder(BOB, "Archive/Projects", "Done")
    await mailboxes.delete_folder(BOB, "Empty")
    assert await mailboxes.create_folder(BOB, "Empty")  # the same name, a new UIDVALIDITY
    await mailboxes.copy(BOB, INBOX, "Empty", [await uid_of(mailboxes, INBOX, 0)])
    await mailboxes.subscribe(BOB, ["Done", "Empty"], True)
    archive = (await mailboxes.index.status(BOB, "Archive")).uidvalidity
    await mailboxes.expunge(BOB, "Archive", archive, [(await mailboxes.index.messages(BOB, "Archive"))[0]])


async def test_r_mbx_1_a_compacted_log_rebuilds_exactly_what_the_whole_log_did(
    redis: aioredis.Redis, nats_conn: NATS
) -> None:
    js = nats_conn.jetstream()
    mailboxes = await open_mailboxes(redis, nats_conn)
    store = SnapshotStore(js)
    await rich_mailbox(mailboxes)
    live = await views(mailboxes)
    assert await rebuilt(redis, js, mailboxes, exact=False) == live
    # Indexed, Redis lost before it was filed: the rebuild files it (above the reserved UIDs).
    await deliver(mailboxes, "late", BOB, file=False)
    whole = await rebuilt(redis, js, mailboxes)  # from every record

    before = await records(js, BOB)
    done = await compact_account(js, mailboxes, store, BOB)
    assert done is not None and await compact_account(js, mailboxes, store, CAROL) is not None
    assert (done.records_before, done.folded, done.records_after) == (before, before, 0)
    assert await records(js, BOB) == 0 and await records(js, CAROL) == 0
    assert done.messages == sum(len(folder[1]) for folder in whole[BOB]["folders"].values())  # type: ignore[index]
    assert await compact_account(js, mailboxes, store, BOB) is None  # nothing new
    assert await rebuilt(redis, js, mailboxes) == whole

    # Changes after the compaction: replay is the snapshot, then them.
    await more_changes(mailboxes)
    live = await views(mailboxes)
    whole = await rebuilt(redis, js, mailboxes)
    assert await views(mailboxes) == live
    added = await records(js, BOB)
    again = await compact_account(js, mailboxes, store, BOB)
    assert again is not None and (again.folded, again.records_after) == (added, 0)
    assert again.mbxlog_seq > done.mbxlog_seq
    assert len(await bodies(js, BOB)) == 1  # the older snapshot went
    assert await rebuilt(redis, js, mailboxes) == whole
    # New folders still get a larger UIDVALIDITY than any before.
    assert await mailboxes.create_folder(BOB, "Later")
    later = (await mailboxes.index.status(BOB, "Later")).uidvalidity
    folders = whole[BOB]["folders"]  # type: ignore[index]
    assert later > max(v for v, _, _ in folders.values())


class Interposed:
    """A JetStream context that runs ``action`` once, before (or ``after``) the first call of
    ``method`` that ``when`` accepts: a record appended, a crash, another replica's work, at an
    exact point of a compaction."""

    def __init__(self, js: JetStreamContext, method: str, when: Callable[..., bool],
                 action: Callable[[], Awaitable[None]], after: bool = False) -> None:
        self._target, self._method, self._when, self._action, self._after = js, method, when, action, after
        self.fired = False

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._target, name)
        if name != self._method:
            return real

        async def interposed(*args: Any, **kwargs: Any) -> Any:
            due = not self.fired and self._when(*args, **kwargs)
            if due and not self._after:
                self.fired = True
                await self._action()
            result = await real(*args, **kwargs)
            if due and self._after:
                self.fired = True
                await self._action()
            return result

        return interposed


def on_log(stream: str, *_: Any, **__: Any) -> bool:
    return stream == MAILBOX_LOG_STREAM


@pytest.mark.parametrize(("method", "after"), [("get_last_msg", True), ("purge_stream", False)])
async def test_r_mbx_1_records_appended_during_a_compaction_are_neither_folded_nor_purged(
    redis: aioredis.Redis, nats_conn: NATS, method: str, after: bool
) -> None:
    js = nats_conn.jetstream()
    mailboxes = await open_mailboxes(redis, nats_conn)
    await rich_mailbox(mailboxes)
    before = await records(js, BOB)
    appended = []

    async def concurrent_changes() -> None:
        inbox = (await mailboxes.index.status(BOB, INBOX)).uidvalidity
        await mailboxes.change_flags(BOB, INBOX, inbox, [await uid_of(mailboxes, INBOX, 0)], "add", {"$During"})
        await deliver(mailboxes, "during", BOB)
        await mailboxes.expunge(BOB, INBOX, inbox, [(await mailboxes.index.messages(BOB, INBOX))[1]])
        appended.append(await records(js, BOB) - before)

    # After the compaction read the log's end; or just before it purges what it folded.
    interposed = Interposed(js, method, on_log, concurrent_changes, after=after)
    done = await compact_account(interposed, mailboxes, SnapshotStore(js), BOB)  # type: ignore[arg-type]
    assert interposed.fired and done is not None
    assert done.folded == before and done.records_after == appended[0] == await records(js, BOB) > 0
    live = await views(mailboxes)
    assert await rebuilt(redis, js, mailboxes, exact=False) == live
    # The next compaction folds them.
    again = await compact_account(js, mailboxes, SnapshotStore(js), BOB)
    assert again is not None and again.folded == appended[0] and await records(js, BOB) == 0
    assert await rebuilt(redis, js, mailboxes, exact=False) == live


async def test_r_mbx_1_no_record_is_lost_to_compactions_during_concurrent_changes(
    redis: aioredis.Redis, nats_conn: NATS
) -> None:
    js = nats_conn.jetstream()
    mailboxes = await open_mailboxes(redis, nats_conn)
    store = SnapshotStore(js)
    for n in range(20):
        await deliver(mailboxes, f"m{n}", BOB)
    assert await mailboxes.create_folder(BOB, "Keep")
    inbox = (await mailboxes.index.status(BOB, INBOX)).uidvalidity
    rng = random.Random(9)
    stop = asyncio.Event()

    async def session(n: int) -> None:
        # Several clients at once: STOREs (some in flight while a compaction reads the
        # journal), COPY, deliveries.
        while not stop.is_set():
            uids = [m.uid for m in await mailboxes.index.messages(BOB, INBOX)]
            mode = rng.choice(["add", "remove", "set"])
            await mailboxes.change_flags(BOB, INBOX, inbox, rng.sample(uids, 2), mode, {f"$k{rng.randrange(4)}"})
            if rng.random() < 0.2:
                await mailboxes.copy(BOB, INBOX, "Keep", [rng.choice(uids)])
            if rng.random() < 0.2:
                await deliver(mailboxes, f"s{n}", BOB)

    sessions = [asyncio.create_task(session(n)) for n in range(3)]
    compactions = []
    try:
        for _ in range(5):
            await asyncio.sleep(0.15)
            compactions.append(await compact_account(js, mailboxes, store, BOB))
    finally:
        stop.set()
        await asyncio.gather(*sessions)
    assert all(c is not None for c in compactions)
    assert any(c.records_after for c in compactions if c is not None)  # appends did overlap
    live = await view(mailboxes)
    await redis.flushall()
    await rebuild_index(js, mailboxes)
    assert await view(mailboxes) == live


async def test_r_mbx_1_a_compaction_cut_between_its_snapshot_and_its_purge_loses_nothing(
    redis: aioredis.Redis, nats_conn: NATS
) -> None:
    js = nats_conn.jetstream()
    mailboxes = await open_mailboxes(redis, nats_conn)
    await rich_mailbox(mailboxes)
    whole = await rebuilt(redis, js, mailboxes)
    before = await records(js, BOB)

    async def crash() -> None:
        raise ConnectionError("killed before the purge")

    with pytest.raises(ConnectionError):
        await compact_account(Interposed(js, "purge_stream", on_log, crash), mailboxes,  # type: ignore[arg-type]
                              SnapshotStore(js), BOB)
    head = await SnapshotStore(js).head(mailbox_log_token(BOB))
    assert head is not None and await records(js, BOB) == before  # a snapshot, and every record
    # Replay skips the records the snapshot holds: the snapshot folded every flag change, none
    # comes again.
    state = (await replay_accounts(js, SnapshotStore(js)))[BOB]
    assert state.folders and all(not folder.flag_changes for folder in state.folders.values())
    assert await rebuilt(redis, js, mailboxes) == whole
    # The next compaction purges them.
    assert await compact_account(js, mailboxes, SnapshotStore(js), BOB) is None
    assert await records(js, BOB) == 0
    assert await rebuilt(redis, js, mailboxes) == whole


async def test_r_mbx_1_two_compactions_of_one_account_at_once_lose_nothing(
    redis: aioredis.Redis, nats_conn: NATS
) -> None:
    js = nats_conn.jetstream()
    mailboxes = await open_mailboxes(redis, nats_conn)
    await rich_mailbox(mailboxes)
    whole = await rebuilt(redis, js, mailboxes)

    # Two replicas at once, left to the event loop.
    results = await asyncio.gather(*(compact_account(js, mailboxes, SnapshotStore(js), BOB) for _ in range(2)))
    assert [r is not None for r in results].count(True) >= 1
    assert len(await bodies(js, BOB)) == 1
    assert await rebuilt(redis, js, mailboxes) == whole

    # The worst case, forced: another replica compacts (more records) while this one has read
    # the log and stored its snapshot, and is about to make it current. Had this one's head won,
    # the other's records would be gone from the log and from the snapshot.
    await more_changes(mailboxes)
    other: list[object] = []

    async def other_replica() -> None:
        await deliver(mailboxes, "between", BOB)
        other.append(await compact_account(js, mailboxes, SnapshotStore(js), BOB))

    def head_publish(subject: str, *_: Any, **__: Any) -> bool:
        return subject.startswith("rempart.mbxsnap.head.")

    slow = Interposed(js, "publish", head_publish, other_replica)
    assert await compact_account(slow, mailboxes, SnapshotStore(slow), BOB) is None  # type: ignore[arg-type]
    assert slow.fired and other[0] is not None
    head = await SnapshotStore(js).head(mailbox_log_token(BOB))
    assert head is not None and await bodies(js, BOB) == [mailbox_snapshot_body_subject(head.token, head.head.body)]
    live = await views(mailboxes)
    assert await rebuilt(redis, js, mailboxes, exact=False) == live


async def test_r_mbx_1_a_rebuild_during_a_compaction_misses_no_record(
    redis: aioredis.Redis, nats_conn: NATS
) -> None:
    """A replica compacts while the rebuild has read the snapshots and not yet the log: the
    records the rebuild expected are purged, and in the new snapshot instead."""
    js = nats_conn.jetstream()
    mailboxes = await open_mailboxes(redis, nats_conn)
    await rich_mailbox(mailboxes)
    assert await compact_account(js, mailboxes, SnapshotStore(js), BOB) is not None
    await more_changes(mailboxes)
    live = await views(mailboxes)

    async def other_replica() -> None:
        assert await compact_account(js, mailboxes, SnapshotStore(js), BOB) is not None

    def log_read(stream: str, *_: Any, subject: str = "", **__: Any) -> bool:
        return stream == MAILBOX_LOG_STREAM and subject == "rempart.mbx.>"

    racing = Interposed(js, "get_msg", log_read, other_replica)
    await rebuild_index(racing, mailboxes)  # type: ignore[arg-type]
    assert racing.fired and await records(js, BOB) == 0
    assert await views(mailboxes) == live


async def test_r_mbx_1_a_store_recorded_twice_after_a_compaction_is_not_applied_again(
    redis: aioredis.Redis, nats_conn: NATS
) -> None:
    """A replica made a STORE in Redis and is slow to record it; a compaction records it from
    the journal (and folds it with a later STORE); then the slow replica records it again."""
    js = nats_conn.jetstream()
    mailboxes = await open_mailboxes(redis, nats_conn)
    await deliver(mailboxes, "m")
    inbox = (await mailboxes.index.status(BOB, INBOX)).uidvalidity
    _, slow_modseq, entry = await mailboxes.index.change_flags(BOB, INBOX, inbox, [1], "add", {"$x"})
    await mailboxes.change_flags(BOB, INBOX, inbox, [1], "remove", {"$x"})
    live = await view(mailboxes)
    assert await compact_account(js, mailboxes, SnapshotStore(js), BOB) is not None
    await mailboxes.log.write([events_pb2.MailboxChange(account=BOB, flags_changed=events_pb2.FlagsChanged(
        folder=INBOX, uidvalidity=inbox, mode=events_pb2.FLAG_CHANGE_ADD, flags=["$x"], uids=[1],
        modseq=slow_modseq))])
    await mailboxes.index.forget_journal(BOB, [entry])
    await redis.flushall()
    await rebuild_index(js, mailboxes)
    assert await view(mailboxes) == live  # $x stays removed, as with the whole log


async def test_r_mbx_1_a_copy_recorded_twice_after_its_expunge_stays_expunged(
    redis: aioredis.Redis, nats_conn: NATS
) -> None:
    """A replica made a COPY in Redis and is slow to record it; a compaction records it from
    the journal; the copy is expunged and compacted; then the slow replica records the COPY
    again. The expunged UID must not come back."""
    js = nats_conn.jetstream()
    mailboxes = await open_mailboxes(redis, nats_conn)
    store = SnapshotStore(js)
    await deliver(mailboxes, "m")
    assert await mailboxes.create_folder(BOB, "Archive")
    await mailboxes.copy(BOB, INBOX, "Archive", [1])  # reserves UIDs in Archive
    copied = await mailboxes.index.copy(BOB, INBOX, "Archive", [1])  # the slow one
    assert isinstance(copied, tuple)
    done, modseq, entry = copied
    assert await compact_account(js, mailboxes, store, BOB) is not None
    archive = (await mailboxes.index.status(BOB, "Archive")).uidvalidity
    await mailboxes.expunge(BOB, "Archive", archive, [(await mailboxes.index.messages(BOB, "Archive"))[1]])
    assert await compact_account(js, mailboxes, store, BOB) is not None
    live = await view(mailboxes)
    await mailboxes.log.write([events_pb2.MailboxChange(account=BOB, filed=events_pb2.MessagesFiled(
        folder="Archive", uidvalidity=archive, uidnext=done[0].place.uid + 1, modseq=modseq,
        messages=[events_pb2.FiledMessage(transaction_id=done[0].identity, uid=done[0].place.uid)]))])
    await mailboxes.index.forget_journal(BOB, [entry])
    await redis.flushall()
    await rebuild_index(js, mailboxes)
    assert await view(mailboxes) == live
    assert [m.uid for m in await mailboxes.index.messages(BOB, "Archive")] == [1]


class RecoveredEarlier(Mailboxes):
    """A compaction whose journal recovery ran just before another replica's STORE began."""

    async def recover(self, account: str) -> int:
        return 0


async def test_r_mbx_1_a_store_in_flight_keeps_later_ones_from_being_folded(
    redis: aioredis.Redis, nats_conn: NATS
) -> None:
    js = nats_conn.jetstream()
    mailboxes = await open_mailboxes(redis, nats_conn)
    await deliver(mailboxes, "m")
    inbox = (await mailboxes.index.status(BOB, INBOX)).uidvalidity
    # In flight: Redis applied it (and journaled it), its log write has not happened yet.
    _, slow_modseq, entry = await mailboxes.index.change_flags(BOB, INBOX, inbox, [1], "add", {"$x"})
    await mailboxes.change_flags(BOB, INBOX, inbox, [1], "add", {"$y"})  # later, recorded first
    live = await view(mailboxes)
    compacting = RecoveredEarlier(mailboxes.store, mailboxes.index, mailboxes.log)
    assert await compact_account(js, compacting, SnapshotStore(js), BOB) is not None
    head = await SnapshotStore(js).head(mailbox_log_token(BOB))
    assert head is not None
    state = await SnapshotStore(js).load(head)
    kept = [c for f in state.folders.values() for c in f.flag_changes]
    assert [list(c.flags) for c in kept] == [["$y"]]  # above the journaled change: not folded
    await mailboxes.log.write([events_pb2.MailboxChange(account=BOB, flags_changed=events_pb2.FlagsChanged(
        folder=INBOX, uidvalidity=inbox, mode=events_pb2.FLAG_CHANGE_ADD, flags=["$x"], uids=[1],
        modseq=slow_modseq))])
    await mailboxes.index.forget_journal(BOB, [entry])
    await redis.flushall()
    await rebuild_index(js, mailboxes)
    assert await view(mailboxes) == live
    assert sorted((await mailboxes.index.messages(BOB))[0].flags) == ["$x", "$y"]


async def test_r_mbx_1_a_snapshot_larger_than_a_nats_message_is_stored_in_chunks(
    redis: aioredis.Redis, nats_conn: NATS
) -> None:
    js = nats_conn.jetstream()
    store = SnapshotStore(js)
    state = AccountState()
    rng = random.Random(1)
    for v in (11, 12):
        folder = state.folders[v] = FolderState(f"F{v}", v, uidnext=50_001)
        state.names[folder.name] = v
        folder.filed = {uid: f"{rng.getrandbits(128):032x}" for uid in range(1, 50_001)}
        folder.expunged = set(range(1, 50_001, 7))
        folder.flag_changes = [events_pb2.FlagsChanged(mode=events_pb2.FLAG_CHANGE_ADD, flags=["\\Seen"],
                                                       uids=list(range(1, 50_001, 3)), modseq=5)]
        folder.settle(5)
    token = mailbox_log_token(BOB)
    snapshot = state.to_snapshot(BOB, 1234, 1234)
    assert snapshot.ByteSize() > 1 << 20  # over NATS's payload limit
    saved = await store.save(token, snapshot, None, 0)
    assert saved is not None and saved.head.chunks == -(-saved.head.size // SNAPSHOT_CHUNK) > 1
    loaded = await store.load(saved)
    assert loaded.to_snapshot(BOB, 1234, 1234).folders == snapshot.folders
    assert loaded.folders[11].folds[4].flags == {"\\Seen"} and 8 not in loaded.folders[11].filed


async def test_r_mbx_1_the_background_compactor_compacts_accounts_whose_log_grew(
    redis: aioredis.Redis, nats_conn: NATS, caplog: pytest.LogCaptureFixture
) -> None:
    js = nats_conn.jetstream()
    mailboxes = await open_mailboxes(redis, nats_conn)
    for n in range(3):
        await deliver(mailboxes, f"m{n}", BOB, CAROL)
    inbox = (await mailboxes.index.status(BOB, INBOX)).uidvalidity
    for n in range(30):
        await mailboxes.change_flags(BOB, INBOX, inbox, [n % 3 + 1], "add" if n % 2 else "remove", {"\\Seen"})
    live = await views(mailboxes)
    bob, carol = await records(js, BOB), await records(js, CAROL)
    caplog.set_level(logging.INFO, logger="rempart.common.mailbox_snapshot")
    compactor = asyncio.create_task(run_compactor(js, mailboxes, threshold=20, every=0.05))
    try:
        for _ in range(200):
            if await records(js, BOB) == 0:
                break
            await asyncio.sleep(0.05)
    finally:
        compactor.cancel()
    assert await records(js, BOB) == 0
    assert await records(js, CAROL) == carol  # below the threshold: left alone
    lines = [r.getMessage() for r in caplog.records if "compacted" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"mailbox log compacted: {bob} records before, 0 after")
    assert await rebuilt(redis, js, mailboxes, exact=False) == live


async def test_r_mbx_1_reindex_compact_compacts_every_account(
    redis_url: str, nats_url: str, redis: aioredis.Redis, nats_conn: NATS
) -> None:
    js = nats_conn.jetstream()
    mailboxes = await open_mailboxes(redis, nats_conn)
    await rich_mailbox(mailboxes)
    whole = await rebuilt(redis, js, mailboxes)
    settings = ServiceSettings(redis_url=redis_url, nats_url=nats_url)
    assert await reindex.run(settings, compact=True) == 2
    assert await records(js, BOB) == 0 and await records(js, CAROL) == 0
    assert await reindex.run(settings) > 0
    assert await views(mailboxes, exact=True) == whole


# --- the replay model: folding flags is exact ---------------------------------------------------
FLAGS = ["a", "b", "c"]
change_st = st.tuples(st.sampled_from([events_pb2.FLAG_CHANGE_SET, events_pb2.FLAG_CHANGE_ADD,
                                       events_pb2.FLAG_CHANGE_REMOVE]),
                      st.sets(st.sampled_from(FLAGS)), st.sets(st.integers(1, 4), min_size=1),
                      st.integers(0, 3),  # how late its record is
                      st.one_of(st.none(), st.integers(0, 6)))  # recorded again, this much later


def _record(change: events_pb2.FlagsChanged | None = None, **kind: Any) -> events_pb2.MailboxChange:
    if change is not None:
        return events_pb2.MailboxChange(account=BOB, flags_changed=change)
    return events_pb2.MailboxChange(account=BOB, **kind)


def _flags(state: AccountState) -> dict[int, list[str]]:
    folder = state.folders[7]
    changes = folder.changes_by_uid()
    return {uid: sorted(folder.flags_of(uid, ["own"], changes.get(uid, ())))
            for uid in sorted(set(folder.filed) - folder.expunged)}


@settings(max_examples=300, deadline=None)
# A STORE recorded twice, the second time after a compaction folded it and a later one: the
# next compaction must not fold it again on top.
@example([(events_pb2.FLAG_CHANGE_ADD, {"a"}, {1}, 0, 3), (events_pb2.FLAG_CHANGE_REMOVE, {"a"}, {1}, 0, None)],
         [3, 4], set())
@given(st.lists(change_st, max_size=14), st.lists(st.integers(0, 30), max_size=3), st.sets(st.integers(1, 4)))
def test_r_mbx_1_folded_flags_replay_like_the_whole_log(
    changes: list[tuple[int, set[str], set[int], int, int | None]], cuts: list[int], expunged: set[int]
) -> None:
    """Flag changes with MODSEQs in the order Redis made them, recorded late or twice; cut
    into compactions at any point, each folding what no late record can still precede (the
    horizon): the replay of the snapshots and the rest gives every message's flags exactly as
    the replay of the whole log."""
    log: list[tuple[int, int, events_pb2.MailboxChange]] = [
        (0, 0, _record(filed=events_pb2.MessagesFiled(folder="F", uidvalidity=7, uidnext=5, messages=[
            events_pb2.FiledMessage(transaction_id=f"t{uid}", uid=uid) for uid in range(1, 5)])))]
    for n, (mode, flags, uids, late, again) in enumerate(changes, 1):
        change = events_pb2.FlagsChanged(folder="F", uidvalidity=7, mode=mode, flags=sorted(flags),
                                         uids=sorted(uids), modseq=n)
        log.append((n + late, n, _record(change)))
        if again is not None:
            log.append((n + late + again, n, _record(change)))
    if expunged:
        log.append((len(changes) // 2, 0, _record(expunged=events_pb2.MessagesExpunged(
            folder="F", uidvalidity=7, uids=sorted(expunged)))))
    log.sort(key=lambda r: r[0])
    records = [r for _, _, r in log]

    whole = AccountState()
    for record in records:
        whole.apply(record)

    state, done = AccountState(), 0
    for cut in sorted(min(c, len(records)) for c in cuts):
        for record in records[done:cut]:
            state.apply(record)
        done = cut
        # The horizon: below the first change (by MODSEQ) not recorded yet.
        recorded = {modseq for _, modseq, _ in log[:cut]}
        horizon = next((n for n in range(1, len(changes) + 1) if n not in recorded), len(changes) + 1) - 1
        for folder in state.folders.values():
            folder.settle(horizon)
        state = AccountState.from_snapshot(state.to_snapshot(BOB, cut, cut))
    for record in records[done:]:
        state.apply(record)
    assert _flags(state) == _flags(whole)
