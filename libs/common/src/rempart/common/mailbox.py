"""The mailbox write path and its change log (DESIGN "The mailbox: one change log", R-MBX-1).

A message's bytes arrive once, in a delivery record on the MAIL stream (``mailstore``). Every
other change to a mailbox is a :class:`MailboxChange` on the MBXLOG stream, under the account's
subject: where messages were filed (folder, UIDVALIDITY, UID), flag changes, expunges, folders
created, deleted and renamed, subscriptions. The Redis index is a projection of the two; a
rebuild (:func:`rebuild_index`) replays them and gives back the same folders with the same
UIDVALIDITY, the same UIDs, flags and subscriptions (RFC 3501 2.3.1.1). Old history is compacted
into a snapshot per account (:mod:`rempart.common.mailbox_snapshot`), which a replay starts from.

:class:`Mailboxes` is the one way to change a mailbox. Its order, for every change:
- who wins is decided atomically in Redis (which UID a message gets, which of two CREATEs made
  the folder, a message's flags after two concurrent STOREs, in the order of the account's
  change counter), then that outcome is recorded in the log, then the client hears OK; a crash
  in between leaves a change that nobody was told about;
- a UID is handed out only below a mark the log has recorded for its folder (blocks of
  RESERVE_BLOCK), so a rebuild never gives a UID that a client may have seen to another message;
- a removal (EXPUNGE, DELETE) is recorded first, then forgotten by the index: what a client was
  told is gone never comes back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from rempart.common import tracing
from rempart.common.events import (
    MAIL_EXPUNGED_SUBJECT,
    MAIL_STREAM,
    MAILBOX_LOG_STREAM,
    fetch_batch,
    mailbox_changed_subject,
    mailbox_log_subject,
    read_stream,
)
from rempart.common.mailbox_snapshot import AccountState, FolderState, SnapshotStore, replay_accounts
from rempart.common.mailstore import (
    FLAG_LIMIT,
    FLAG_MODIFIED,
    INBOX,
    PUBLISH_TIMEOUT,
    Copied,
    Filed,
    FlagState,
    IndexedMessage,
    MailboxIndex,
    MessageStore,
    Reclaimable,
    Reservation,
    RestoredMessage,
)
from rempart.common.mime import MessageSummary, summarize
from rempart.common.pb.events.v1 import events_pb2

log = logging.getLogger(__name__)

# RFC 6154: the folders every account has from its first login, with their special use.
SPECIAL_USE_FOLDERS = {"Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash", "Junk": "\\Junk"}
# UIDs (or filed messages) per log record: far below NATS's 1 MiB payload even for 50,000 at once.
RECORD_CHUNK = 10_000
# How far above the log's and the clock's largest UIDVALIDITY a rebuild starts when Redis lost
# its counter (see rebuild_index).
UIDVALIDITY_MARGIN = 100_000
MODSEQ_MARGIN = 1_000_000
RECLAIMS_IN_FLIGHT = 16
# UIDs reserved in the change log at a time per folder: one log record per this many deliveries.
RESERVE_BLOCK = 100
# The indexer (run_indexer): records per fetch, and its pause once caught up.
INDEXER_BATCH = 200
INDEXER_LINGER_SECONDS = 0.02
_MODES = {"set": events_pb2.FLAG_CHANGE_SET, "add": events_pb2.FLAG_CHANGE_ADD,
          "remove": events_pb2.FLAG_CHANGE_REMOVE}


class MailboxLog:
    """Appends :class:`MailboxChange` records; each is acknowledged (fsynced) by JetStream."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def write(self, changes: Sequence[events_pb2.MailboxChange]) -> None:
        now = int(time.time() * 1000)
        for change in changes:
            change.time_unix_ms = change.time_unix_ms or now
        with tracing.store_write(MAILBOX_LOG_STREAM, count=len(changes)):
            await asyncio.gather(*(
                self._js.publish(mailbox_log_subject(c.account), c.SerializeToString(), stream=MAILBOX_LOG_STREAM,
                                 timeout=PUBLISH_TIMEOUT)
                for c in changes))


def _chunks(items: Sequence[int], size: int = RECORD_CHUNK) -> list[list[int]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)] or [[]]


class Mailboxes:
    """The only writer of mailboxes: IMAP, POP3, the SMTP edge, the relay (DSNs), the catch-up
    indexer and the rebuild use it."""

    def __init__(self, store: MessageStore, index: MailboxIndex, log: MailboxLog) -> None:
        self.store = store
        self.index = index
        self.log = log
        self._reclaiming: set[asyncio.Task[None]] = set()

    # --- folders -------------------------------------------------------------------------------
    async def create_folder(self, account: str, name: str, special_use: str = "") -> bool:
        """A new folder, recorded; False when it exists (recorded again then: a CREATE cut by a
        crash after Redis made it is retried, answered "exists", and must not vanish at the
        next rebuild)."""
        uidvalidity = await self.index.create_folder(account, name)
        if not uidvalidity:
            status = await self.index.status(account, name)
            await self.log.write([events_pb2.MailboxChange(account=account, folder_created=events_pb2.FolderCreated(
                name=name, uidvalidity=status.uidvalidity))])
            return False
        await self.log.write([events_pb2.MailboxChange(account=account, folder_created=events_pb2.FolderCreated(
            name=name, uidvalidity=uidvalidity, special_use=special_use))])
        if special_use:
            await self.index.set_special_uses(account, {name: special_use})
        return True

    async def provision(self, account: str) -> None:
        """First login: Sent, Drafts, Trash and Junk with their RFC 6154 attributes, subscribed
        with INBOX (as Dovecot's ``auto = subscribe``). Once only: folders the user deletes stay
        deleted."""
        if await self.index.provisioned(account):
            return
        for name, use in SPECIAL_USE_FOLDERS.items():
            await self.create_folder(account, name, use)
        await self.index.set_special_uses(account, {})
        if await self.index.subscriptions(account) is None:
            await self.subscribe(account, [INBOX, *SPECIAL_USE_FOLDERS], True)

    async def delete_folder(self, account: str, name: str) -> None:
        """RFC 3501 6.3.4: the folder goes with its messages; its subscription stays (6.3.6)."""
        status = await self.index.status(account, name)
        await self.log.write([events_pb2.MailboxChange(account=account, folder_deleted=events_pb2.FolderDeleted(
            name=name, uidvalidity=status.uidvalidity))])
        _, gone = await self.index.delete_folder(account, name)
        self._reclaim(gone)
        await self.index.set_special_uses(account, {name: None})

    async def rename_folder(self, account: str, old: str, new: str) -> bool:
        """One folder to a new name with its messages, UIDs and UIDVALIDITY; its special use and
        subscription follow. Renaming INBOX leaves a new, empty INBOX (RFC 3501 6.3.5)."""
        uidvalidity = await self.index.rename_folder(account, old, new)
        if not uidvalidity:
            return False
        await self.log.write([events_pb2.MailboxChange(account=account, folder_renamed=events_pb2.FolderRenamed(
            old_name=old, new_name=new, uidvalidity=uidvalidity))])
        use = (await self.index.special_uses(account)).get(old)
        if use:
            await self.index.set_special_uses(account, {old: None, new: use})
        subscribed = await self.index.subscriptions(account)
        if subscribed is not None and old in subscribed and old != INBOX:
            await self.subscribe(account, [old], False)
            await self.subscribe(account, [new], True)
        if old == INBOX:
            await self.create_folder(account, INBOX)
        return True

    async def subscriptions(self, account: str) -> set[str]:
        subscribed = await self.index.subscriptions(account)
        return set(await self.index.folders(account)) if subscribed is None else subscribed

    async def subscribe(self, account: str, names: Iterable[str], subscribed: bool) -> None:
        wanted = list(names)
        changes = []
        if await self.index.subscriptions(account) is None:
            # The first change: until now every folder counted as subscribed; say so first.
            everything = await self.index.folders(account)
            changes.append(events_pb2.MailboxChange(account=account, subscription=events_pb2.Subscription(
                names=everything, subscribed=True)))
            await self.index.set_subscribed(account, everything, True)
        changes.append(events_pb2.MailboxChange(account=account, subscription=events_pb2.Subscription(
            names=wanted, subscribed=subscribed)))
        for change in changes:  # in order: the second must follow the first in the log
            await self.log.write([change])
        await self.index.set_subscribed(account, wanted, subscribed)

    # --- messages ------------------------------------------------------------------------------
    async def append(self, account: str, folder: str, messages: Sequence[tuple[bytes, Sequence[str], int]]
                     ) -> list[Filed]:
        """APPEND, COPY, MOVE: each message (bytes, flags, internal date in ms or 0) stored
        durably, filed in the folder, and its UID recorded before the client hears it
        (APPENDUID, COPYUID)."""
        stored = []
        for data, flags, internal_date_ms in messages:
            record, seq = await self.store.append(account, folder, data, sorted(flags), internal_date_ms)
            stored.append((record, seq, data))
        filed = await self.file([(record, seq) for record, seq, _ in stored], [data for _, _, data in stored])
        return [places[account] for places in filed]

    async def file(self, records: Sequence[tuple[events_pb2.DeliveryRecord, int]],
                   bodies: Sequence[bytes] | None = None) -> list[dict[str, Filed]]:
        """Index delivery records (with their bytes when at hand, for the FETCH summary) and
        record where each landed, one log record per account and folder. Idempotent: filing a
        record again answers, and records, the same UIDs."""
        out: list[dict[str, Filed]] = []
        groups: dict[tuple[str, str, int], list[events_pb2.FiledMessage]] = {}
        modseqs: dict[str, int] = {}
        # The summary is computed once, here, so IMAP header syncs read no blob (R-MBX-2): from
        # the bytes at hand (APPEND), else from the body inside the record (the indexer); a
        # message stored as a blob gets its summary at its first FETCH.
        summaries = [summarize(bodies[n]) if bodies is not None else summarize(record.body) if record.body else None
                     for n, (record, _) in enumerate(records)]
        # Every mailbox of every record in one round trip; a record that meets a folder's reserved
        # mark (a block of UIDs to record first) goes through place(), which reserves and files.
        first = await self.index.file_many([(record, list(record.local_mailboxes), summaries[n], seq)
                                            for n, (record, seq) in enumerate(records)])
        for n, (record, seq) in enumerate(records):
            answered = first[n]
            if all(isinstance(place, Filed) for place in answered.values()):
                places = {mailbox: place for mailbox, place in answered.items() if isinstance(place, Filed)}
            else:
                places = await self.place(record, summaries[n], seq)
            for account, place in places.items():
                groups.setdefault((account, place.folder, place.uidvalidity), []).append(
                    events_pb2.FiledMessage(transaction_id=record.transaction_id, uid=place.uid))
                modseqs[account] = max(modseqs.get(account, 0), place.modseq)
            out.append(places)
        changes = []
        for (account, folder, uidvalidity), filed in groups.items():
            for i in range(0, len(filed), RECORD_CHUNK):
                part = filed[i : i + RECORD_CHUNK]
                changes.append(events_pb2.MailboxChange(account=account, filed=events_pb2.MessagesFiled(
                    folder=folder, uidvalidity=uidvalidity, messages=part, uidnext=max(m.uid for m in part) + 1,
                    modseq=modseqs[account])))
        await self.log.write(changes)
        return out

    async def place(self, record: events_pb2.DeliveryRecord, summary: MessageSummary | None, seq: int
                    ) -> dict[str, Filed]:
        """Index a record in each of its mailboxes. A UID is handed out only below what the log
        has reserved for its folder, so that a rebuild never gives a UID a client may have seen
        to another message: past it, the next block is reserved in the log first."""
        placed: dict[str, Filed] = {}
        pending = list(record.local_mailboxes)
        for _ in range(10):
            reservations = []
            for mailbox, place in (await self.index.file(record, pending, summary, seq=seq)).items():
                if isinstance(place, Filed):
                    placed[mailbox] = place
                else:
                    reservations.append((mailbox, place))
            if not reservations:
                return placed
            for mailbox, reservation in reservations:
                await self._reserve(mailbox, reservation, RESERVE_BLOCK)
            pending = [mailbox for mailbox, _ in reservations]
        raise RuntimeError(f"record {record.transaction_id}: no UID could be reserved")

    async def copy(self, account: str, source: str, target: str, uids: list[int]) -> list[Copied]:
        """COPY and MOVE (RFC 3501 6.4.7, RFC 6851): the same messages filed again in ``target``
        by reference (R-MBX-5: no byte copied, whatever the size), with the flags they have now;
        recorded before the client hears COPYUID. Raises KeyError when ``target`` is gone."""
        copies: list[Copied] = []
        for start in range(0, len(uids), RECORD_CHUNK):
            chunk = uids[start : start + RECORD_CHUNK]
            for _ in range(10):
                result = await self.index.copy(account, source, target, chunk)
                if result is None:
                    raise KeyError(target)
                if isinstance(result, Reservation):
                    await self._reserve(account, result, RESERVE_BLOCK)
                    continue
                done, modseq, entry = result
                await self._log_copies(account, target, [c for c in done if c.place.uid], modseq)
                await self.index.forget_journal(account, [entry])
                copies += done
                break
            else:
                raise RuntimeError(f"COPY to {target}: no UID could be reserved")
        return copies

    async def _log_copies(self, account: str, folder: str, copies: list[Copied], modseq: int) -> None:
        await self.log.write(_copy_changes(account, folder, copies, modseq))

    async def _reserve(self, account: str, reservation: Reservation, extra: int) -> None:
        up_to = reservation.uidnext + extra
        await self.log.write([events_pb2.MailboxChange(account=account, filed=events_pb2.MessagesFiled(
            folder=reservation.folder, uidvalidity=reservation.uidvalidity, uidnext=up_to))])
        await self.index.reserve(account, reservation.folder, reservation.uidvalidity, up_to)

    async def change_flags(self, account: str, folder: str, uidvalidity: int, uids: list[int], mode: str,
                           flags: set[str], limit: int = 0, unchanged_since: int | None = None
                           ) -> dict[int, FlagState | None]:
        """STORE (and FETCH's implicit \\Seen): atomic per message in Redis (R-MBX-3), then
        recorded with the MODSEQ it took, so a replay applies concurrent changes in the order
        Redis did. ``unchanged_since``: RFC 7162's conditional STORE."""
        after, modseq, entry = await self.index.change_flags(account, folder, uidvalidity, uids, mode, flags, limit,
                                                             unchanged_since)
        # Every message the change applies to, even those it left as they were: a STORE retried
        # after a crash finds its flags already set in Redis, and its OK must still mean "in the log".
        changed = [uid for uid, now in after.items()
                   if now is not None and FLAG_LIMIT not in now.flags and FLAG_MODIFIED not in now.flags]
        if changed:
            await self.log.write(_flag_changes(account, folder, uidvalidity, mode, flags, changed, modseq))
        if entry:
            await self.index.forget_journal(account, [entry])
        return after

    async def recover(self, account: str) -> int:
        """Record in the change log what Redis did for a replica that was killed before it
        could (a COPY's new UIDs, a STORE's flags: the journal, see ``MailboxIndex.journal``), so
        that the index and the log tell the same story and a rebuild keeps them. Run at each
        login and before a rebuild. Recording a change twice is harmless (a replay applies the
        same UIDs, and flags by MODSEQ). Returns how many entries were recorded."""
        entries = await self.index.journal(account)
        changes: list[events_pb2.MailboxChange] = []
        for entry in entries.values():
            folder, uidvalidity, modseq = str(entry["f"]), int(entry["v"]), int(entry["m"])
            if entry["k"] == "copy":
                copies = [Copied(0, Filed(folder, uidvalidity, int(uid), modseq), str(identity),
                                 frozenset(f for f in str(flags).split(" ") if f))
                          for uid, identity, flags in entry["c"]]
                changes += _copy_changes(account, folder, copies, modseq)
            elif entry["k"] == "flags":
                changes += _flag_changes(account, folder, uidvalidity, str(entry["mode"]),
                                         set(entry["fl"] or []), [int(u) for u in entry["u"] or []], modseq)
        if changes:
            await self.log.write(changes)
            log.info("recorded %d change(s) a stopped replica had made but not logged", len(entries),
                     extra={"account": account})
        await self.index.forget_journal(account, entries)
        return len(entries)

    async def expunge(self, account: str, folder: str, uidvalidity: int, messages: list[IndexedMessage]) -> None:
        """Remove messages for good: recorded before the index forgets them."""
        if not messages:
            return
        modseq = await self.index.counter(account) + 1
        await self.log.write([
            events_pb2.MailboxChange(account=account, expunged=events_pb2.MessagesExpunged(
                folder=folder, uidvalidity=uidvalidity, uids=chunk, modseq=modseq))
            for chunk in _chunks(sorted(m.uid for m in messages))])
        _, gone = await self.index.remove(account, folder, messages)
        self._reclaim(gone)

    def _reclaim(self, gone: list[Reclaimable]) -> None:
        """Free the bytes of deliveries nothing refers to any more (R-MBX-5), in the background:
        emptying a Trash of 50,000 messages answers at once. Best effort: a failure leaves the
        bytes stored (space, never mail, is what it costs) and is logged."""
        if not gone:
            return
        task = asyncio.create_task(self._free(gone), name="reclaim")
        self._reclaiming.add(task)
        task.add_done_callback(self._reclaiming.discard)

    async def _free(self, gone: list[Reclaimable]) -> None:
        gate = asyncio.Semaphore(RECLAIMS_IN_FLIGHT)

        async def one(delivery: Reclaimable) -> None:
            async with gate:
                try:
                    await self.store.reclaim(delivery)
                except Exception as exc:  # noqa: BLE001 - NATS away: the bytes stay
                    log.warning("space of %s not reclaimed: %s", delivery.transaction_id, exc)

        await asyncio.gather(*(one(d) for d in gone))

    async def settle(self) -> None:
        """Wait for the space being reclaimed (tests; a clean shutdown)."""
        while self._reclaiming:
            await asyncio.gather(*self._reclaiming, return_exceptions=True)


async def announce(nc: NATS | None, changed: Iterable[tuple[str, str]]) -> None:
    """Wake IMAP IDLE on every imap-pop replica for each (mailbox, folder) that changed. A lost
    announcement is seen at IDLE's next poll (idle_poll_seconds): logged, never raised."""
    if nc is None:
        return
    try:
        for mailbox, folder in dict.fromkeys(changed):
            await nc.publish(mailbox_changed_subject(mailbox), folder.encode())
    except Exception as exc:  # noqa: BLE001 - IDLE sessions also poll
        log.warning("mailbox change announcement failed, IDLE sees it at its next poll: %s", exc)


async def run_indexer(
    js: JetStreamContext, mailboxes: Mailboxes, durable: str = "mailbox-indexer", wait_replicas: int = 0,
    nc: NATS | None = None,
) -> None:
    """The indexer: a durable pull consumer shared by every replica that runs it, the one place
    where delivered mail enters its mailboxes (issue 11: each record is indexed once, here; the
    SMTP edge's 250 waits for the durable record only). Each batch is filed in the index and in
    the change log (its UIDs recorded, so a rebuild gives them back), with the summary of each
    message whose body the record holds; then IMAP IDLE is woken (``nc``). A batch is acked only
    once its filing records are; a replica that dies before leaves it to the next fetch.

    With ``wait_replicas`` (Redis with replicas, R-OPS-6), a batch is acked only once that many
    Redis replicas have its index writes (WAIT): replication is asynchronous, and a primary lost
    right after an ack would otherwise take index entries that nothing would write again. The
    index's client must then hold one connection (``connect_redis(url, max_connections=1)``):
    WAIT counts the writes made on its own connection.
    """
    sub = await js.pull_subscribe("rempart.mail.>", durable=durable, stream=MAIL_STREAM)
    while True:
        batch = await fetch_batch(sub, INDEXER_BATCH, 5, "indexer")
        records = [(events_pb2.DeliveryRecord.FromString(m.data), int(m.metadata.sequence.stream))
                   for m in batch if m.subject != MAIL_EXPUNGED_SUBJECT]
        try:
            if records:
                with tracing.consuming(batch, "index", durable):
                    await mailboxes.file(records)
                await announce(nc, ((mailbox, record.folder or INBOX)
                                    for record, _ in records for mailbox in record.local_mailboxes))
        except Exception as exc:  # noqa: BLE001 - Redis or NATS away: the whole batch is retried
            log.warning("indexer could not file a batch, will retry: %s", exc)
            for msg in batch:
                await msg.nak(delay=1)
            continue
        if records and not await mailboxes.index.replicated(wait_replicas):
            log.warning("index writes not yet on %d Redis replica(s): the batch is retried", wait_replicas)
            for msg in batch:
                await msg.nak(delay=1)
            continue
        for msg in batch:
            await msg.ack()
        if 0 < len(batch) < INDEXER_BATCH:
            # Caught up: let the next records gather a moment, so that under load a batch's
            # costs (a fetch, a Redis round trip, a log write) are paid for many records instead
            # of one or two (issue 11). Idle, a record is filed as soon as it arrives.
            await asyncio.sleep(INDEXER_LINGER_SECONDS)


# --- rebuild ---------------------------------------------------------------------------------
async def rebuild_index(js: JetStreamContext, mailboxes: Mailboxes) -> int:
    """Flush the index and rebuild it from the MAIL stream and the change log; returns the
    number of messages indexed. Run it with the edges stopped or draining (after a Redis loss).

    Folders keep their UIDVALIDITY and messages their UIDs and flags; subscriptions and special
    uses come back. A delivery the log has no UID for (it arrived just before the index was
    lost, or it predates the log) still gets into its folder, with a UID above every one the
    log reserved for that folder: a UID a client may have seen is never given to another
    message, so no UIDVALIDITY has to change (RFC 3501 2.3.1.1). Those UIDs are recorded, so
    the next rebuild gives the same answer.
    """
    index = mailboxes.index
    # What Redis did that the log may not have yet goes to the log before the index is flushed.
    for account in await index.journaled_accounts():
        await mailboxes.recover(account)
    deliveries: dict[str, tuple[events_pb2.DeliveryRecord, int]] = {}
    order: list[str] = []
    legacy_expunged: set[tuple[str, str, str]] = set()
    async for subject, data, seq in read_stream(js, MAIL_STREAM, "rempart.mail.>"):
        if subject == MAIL_EXPUNGED_SUBJECT:
            tomb = events_pb2.ExpungeRecord.FromString(data)
            legacy_expunged.update((tomb.mailbox, tomb.folder or INBOX, t) for t in tomb.transaction_ids)
            continue
        record = events_pb2.DeliveryRecord.FromString(data)
        if not record.local_mailboxes:
            continue  # outbound only
        record.ClearField("body")  # stays where it is: the index needs only the sequence
        deliveries[record.transaction_id] = (record, seq)
        order.append(record.transaction_id)
    # Each account's snapshot, then its records after it (the compacted log, mailbox_snapshot).
    accounts = await replay_accounts(js, SnapshotStore(js))

    # Deliveries that no filing record names: after the filed ones, in stream order.
    unfiled: dict[tuple[str, str], list[str]] = {}
    for txn in order:
        record, _ = deliveries[txn]
        folder_name = record.folder or INBOX
        for account in record.local_mailboxes:
            state = accounts.setdefault(account, AccountState())
            if txn not in state.filed and (account, folder_name, txn) not in legacy_expunged:
                unfiled.setdefault((account, folder_name), []).append(txn)

    await index.flush()
    # Above every UIDVALIDITY ever given, so that a renumbered or new folder gets a larger one:
    # those in the log, and the counter's last value. When Redis lost the counter too, the
    # folders made just before the loss (an INBOX made by a first delivery, not filed yet) may
    # have had values above the log's and the clock's (the counter runs ahead of the clock when
    # many folders are made at once): a wide margin keeps the new ones above them.
    logged = max((v for state in accounts.values()
                  for v in (*state.folders, *state.gone)), default=0)
    counter = await index.uidvalidity_counter()
    if counter is None:
        counter = max(logged, int(time.time())) + UIDVALIDITY_MARGIN
    await index.raise_uidvalidity(max(logged, counter))
    indexed = 0
    for account, state in accounts.items():
        changes = []
        for (owner, folder_name), txns in unfiled.items():
            if owner != account:
                continue
            folder = state.folders.get(state.names.get(folder_name, 0))
            if folder is None:
                uidvalidity = await index.new_uidvalidity()
                folder = state.folders[uidvalidity] = FolderState(folder_name, uidvalidity)
                state.names[folder_name] = uidvalidity
            # Above every UID the log reserved: none a client may have seen for another message.
            filed = []
            for txn in txns:
                filed.append(events_pb2.FiledMessage(transaction_id=txn, uid=folder.uidnext))
                folder.filed[folder.uidnext] = txn
                folder.uidnext += 1
            for i in range(0, len(filed), RECORD_CHUNK):
                changes.append(events_pb2.MailboxChange(account=account, filed=events_pb2.MessagesFiled(
                    folder=folder_name, uidvalidity=folder.uidvalidity, messages=filed[i : i + RECORD_CHUNK],
                    uidnext=folder.uidnext)))
        # Recorded before the index shows them: the next rebuild gives the same answer.
        await mailboxes.log.write(changes)
        # Above every MODSEQ a client may have seen: the log's, plus a margin for the changes
        # made just before the loss and not recorded with their counter (RFC 7162: a MODSEQ
        # never goes back).
        modseq = state.modseq + MODSEQ_MARGIN
        for folder in state.folders.values():
            restored = []
            flag_changes = folder.changes_by_uid()
            for uid in sorted(set(folder.filed) - folder.expunged):
                identity = folder.filed[uid]
                found = deliveries.get(identity.split("/", 1)[0])  # a copy names its delivery first
                if found is None:
                    log.warning("rebuild: %s %s UID %d names a delivery that is not in the MAIL stream",
                                account, folder.name, uid)
                    continue
                record, seq = found
                restored.append(RestoredMessage(uid, record, seq,
                                                folder.flags_of(uid, record.flags, flag_changes.get(uid, ())),
                                                identity))
            await index.restore_folder(account, folder.name, folder.uidvalidity, folder.uidnext, folder.uidnext,
                                       restored, modseq)
            indexed += len(restored)
        if state.provisioned or state.special_uses:
            await index.set_special_uses(account, {n: u for n, u in state.special_uses.items() if n in state.names})
        if state.subscriptions is not None:
            await index.set_subscribed(account, state.subscriptions, True)
        await index.restore_counter(account, modseq)
    return indexed


def _copy_changes(account: str, folder: str, copies: list[Copied], modseq: int) -> list[events_pb2.MailboxChange]:
    """The log records of a COPY: where the copies were filed, and the flags they have (those
    of the originals at the moment of the copy)."""
    if not copies:
        return []
    uidvalidity = copies[0].place.uidvalidity
    changes = [events_pb2.MailboxChange(account=account, filed=events_pb2.MessagesFiled(
        folder=folder, uidvalidity=uidvalidity, uidnext=max(c.place.uid for c in copies) + 1, modseq=modseq,
        messages=[events_pb2.FiledMessage(transaction_id=c.identity, uid=c.place.uid) for c in copies]))]
    by_flags: dict[frozenset[str], list[int]] = {}
    for c in copies:
        by_flags.setdefault(c.flags, []).append(c.place.uid)
    changes += [events_pb2.MailboxChange(account=account, flags_changed=events_pb2.FlagsChanged(
        folder=folder, uidvalidity=uidvalidity, mode=events_pb2.FLAG_CHANGE_SET, flags=sorted(flags),
        uids=uids, modseq=modseq)) for flags, uids in by_flags.items()]
    return changes


def _flag_changes(account: str, folder: str, uidvalidity: int, mode: str, flags: set[str], uids: list[int],
                  modseq: int) -> list[events_pb2.MailboxChange]:
    return [events_pb2.MailboxChange(account=account, flags_changed=events_pb2.FlagsChanged(
        folder=folder, uidvalidity=uidvalidity, mode=_MODES[mode], flags=sorted(flags), uids=chunk, modseq=modseq))
        for chunk in _chunks(uids)]
