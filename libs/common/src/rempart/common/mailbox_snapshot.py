"""The change log's replay model, and its compaction into one snapshot per account (DESIGN "The
mailbox": old history is compacted into a snapshot per account so that replay stays short;
SPEC R-MBX-1).

Replay. An account's state is what its MBXLOG records say (:class:`AccountState`), applied in
log order, except flag changes: those apply in MODSEQ order, the order Redis made them in (two
STOREs may reach the log the other way round).

Compaction (:func:`compact_account`). The account's snapshot, if any, and its records after the
snapshot's sequence, up to the subject's last sequence L at that moment, are replayed; the state
is stored as a new snapshot covering L (MBXSNAP stream: the body in chunks, then a head naming
it); then the account's records up to L are purged from MBXLOG. A replay starts from the
snapshot and skips records at or below L, so a compaction cut between the two steps loses
nothing, and a record appended meanwhile (above L) is neither folded nor purged.

Flags. A message's flag changes are folded (its flags relative to its delivery's own, and the
MODSEQ of the last change folded) only up to a horizon H below which no change can still be on
its way to the log: the account's change counter, read first, lowered below the oldest change
in the account's journal (changes Redis made whose log write is not acknowledged yet; a killed
replica's are recovered first). A change with MODSEQ m at or below the counter is then either
journaled (m > H) or in the log at or below L. A record that comes after L with a MODSEQ below
a message's folded one is thus a change recorded twice (a journal recovered while its writer was
still alive), which changed nothing at its place in MODSEQ order: replay skips it. Changes
above H stay as recorded, and apply after the fold in MODSEQ order, as before.

Two compactions of one account at once (two replicas): a head is published only over the head
its compaction started from (``Nats-Expected-Last-Subject-Sequence``); the loser drops its
chunks. The winner's read missed nothing: a purge comes only after a head is published, and had
one been published during the read, the winner's would have been refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import secrets
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from rempart.common.events import (
    MAILBOX_LOG_PREFIX,
    MAILBOX_LOG_STREAM,
    MAILBOX_SNAPSHOT_HEADS,
    MAILBOX_SNAPSHOT_STREAM,
    mailbox_log_subject,
    mailbox_log_token,
    mailbox_snapshot_body_subject,
    mailbox_snapshot_head_subject,
    read_stream,
    subject_counts,
)
from rempart.common.mailstore import PUBLISH_TIMEOUT
from rempart.common.pb.events.v1 import events_pb2

if TYPE_CHECKING:
    from rempart.common.mailbox import Mailboxes

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 1
# Chunks of a snapshot body: well under NATS's 1 MiB payload.
SNAPSHOT_CHUNK = 256 * 1024
# How often the background compactor looks for accounts whose log grew (with jitter, so that
# replicas do not all look at once).
COMPACT_EVERY_SECONDS = 60.0
# JetStream's answer to a publish whose Nats-Expected-Last-Subject-Sequence is not the subject's.
_WRONG_LAST_SEQUENCE = 10071
# Passes of a rebuild's replay that may find snapshots replaced under it before it gives up.
_REPLAY_ATTEMPTS = 5


class SnapshotUnreadable(Exception):
    """A snapshot body is gone or incomplete (replaced meanwhile), or of an unknown format."""


# --- the replay model --------------------------------------------------------------------------
@dataclass
class FlagFold:
    """A message's flag changes up to ``modseq``, folded: its flags are ``flags`` (``absolute``),
    or its delivery's own flags plus ``flags`` minus ``removed``."""

    absolute: bool = False
    flags: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    modseq: int = 0

    def fold(self, change: events_pb2.FlagsChanged) -> None:
        if change.mode == events_pb2.FLAG_CHANGE_SET:
            self.absolute, self.flags, self.removed = True, set(change.flags), set()
        elif change.mode == events_pb2.FLAG_CHANGE_ADD:
            self.flags.update(change.flags)
            self.removed.difference_update(change.flags)
        elif change.mode == events_pb2.FLAG_CHANGE_REMOVE:
            self.flags.difference_update(change.flags)
            if not self.absolute:
                self.removed.update(change.flags)
        self.modseq = max(self.modseq, change.modseq)

    def of(self, own: Iterable[str]) -> set[str]:
        return set(self.flags) if self.absolute else (set(own) - self.removed) | self.flags


def _apply(flags: set[str], change: events_pb2.FlagsChanged) -> None:
    if change.mode == events_pb2.FLAG_CHANGE_SET:
        flags.clear()
        flags.update(change.flags)
    elif change.mode == events_pb2.FLAG_CHANGE_ADD:
        flags.update(change.flags)
    elif change.mode == events_pb2.FLAG_CHANGE_REMOVE:
        flags.difference_update(change.flags)


@dataclass
class FolderState:
    name: str
    uidvalidity: int
    uidnext: int = 1
    filed: dict[int, str] = field(default_factory=dict)  # UID -> identity
    expunged: set[int] = field(default_factory=set)
    flag_changes: list[events_pb2.FlagsChanged] = field(default_factory=list)  # not folded, log order
    folds: dict[int, FlagFold] = field(default_factory=dict)  # by UID

    def changes_by_uid(self) -> dict[int, list[events_pb2.FlagsChanged]]:
        """The flag changes not folded, per UID, in MODSEQ order (log order among equals): one
        pass, where looking through every change for every message cost messages x changes."""
        out: dict[int, list[events_pb2.FlagsChanged]] = {}
        for change in sorted(self.flag_changes, key=lambda c: c.modseq):
            if change.mode == events_pb2.FLAG_CHANGE_UNSPECIFIED:
                continue
            for uid in change.uids:
                out.setdefault(uid, []).append(change)
        return out

    def flags_of(self, uid: int, own: Iterable[str], changes: Iterable[events_pb2.FlagsChanged]) -> frozenset[str]:
        """A message's flags: its delivery's own, then its folded changes, then the later ones
        (``changes``: its entry of :meth:`changes_by_uid`). One below the fold's MODSEQ is a
        change recorded twice, already in the fold (see the module's docstring)."""
        fold = self.folds.get(uid)
        flags = fold.of(own) if fold is not None else set(own)
        floor = fold.modseq if fold is not None else 0
        for change in changes:
            if change.modseq >= floor:
                _apply(flags, change)
        return frozenset(flags)

    def settle(self, horizon: int) -> None:
        """Fold the flag changes at or below ``horizon`` into each message; keep the others."""
        later = [c for c in self.flag_changes if c.modseq > horizon]
        for change in sorted((c for c in self.flag_changes if c.modseq <= horizon), key=lambda c: c.modseq):
            if change.mode == events_pb2.FLAG_CHANGE_UNSPECIFIED:
                continue
            for uid in change.uids:
                if uid in self.expunged:
                    continue
                fold = self.folds.setdefault(uid, FlagFold())
                if change.modseq >= fold.modseq:
                    fold.fold(change)
        self.flag_changes = later
        for uid in self.expunged.intersection(self.folds):
            del self.folds[uid]


@dataclass
class AccountState:
    """One account as its change log describes it."""

    folders: dict[int, FolderState] = field(default_factory=dict)  # by UIDVALIDITY
    names: dict[str, int] = field(default_factory=dict)  # folder name -> UIDVALIDITY
    gone: set[int] = field(default_factory=set)  # UIDVALIDITY of deleted folders
    special_uses: dict[str, str] = field(default_factory=dict)
    provisioned: bool = False
    subscriptions: set[str] | None = None
    filed: set[str] = field(default_factory=set)  # identities filed somewhere, once
    modseq: int = 0

    def folder(self, name: str, uidvalidity: int) -> FolderState | None:
        """The folder a record names (by UIDVALIDITY); one named only by a filing record (made
        implicitly, by a delivery) is created; None when it was deleted since."""
        if uidvalidity in self.gone:
            return None
        if uidvalidity not in self.folders:
            if name in self.names:
                return None  # a folder of that name with another UIDVALIDITY: this one is gone
            self.folders[uidvalidity] = FolderState(name, uidvalidity)
            self.names[name] = uidvalidity
        return self.folders[uidvalidity]

    def apply(self, change: events_pb2.MailboxChange) -> None:
        kind = change.WhichOneof("change")
        if kind == "folder_created":
            c = change.folder_created
            if c.name not in self.names and c.uidvalidity not in self.gone:
                self.folders[c.uidvalidity] = FolderState(c.name, c.uidvalidity)
                self.names[c.name] = c.uidvalidity
            if c.special_use:
                self.special_uses[c.name] = c.special_use
                self.provisioned = True
        elif kind == "folder_deleted":
            d = change.folder_deleted
            gone = self.folders.pop(d.uidvalidity, None)
            if gone is not None and self.names.get(gone.name) == d.uidvalidity:
                del self.names[gone.name]
            self.gone.add(d.uidvalidity)
            self.special_uses.pop(d.name, None)
        elif kind == "folder_renamed":
            r = change.folder_renamed
            folder = self.folder(r.old_name, r.uidvalidity)
            if folder is None:
                return
            if self.names.get(folder.name) == folder.uidvalidity:
                del self.names[folder.name]
            if folder.name in self.special_uses:
                self.special_uses[r.new_name] = self.special_uses.pop(folder.name)
            folder.name = r.new_name
            self.names[r.new_name] = folder.uidvalidity
        elif kind == "subscription":
            s = change.subscription
            if self.subscriptions is None:
                self.subscriptions = set()
            if s.subscribed:
                self.subscriptions.update(s.names)
            else:
                self.subscriptions.difference_update(s.names)
        elif kind == "filed":
            f = change.filed
            folder = self.folder(f.folder, f.uidvalidity)
            if folder is None:
                return
            for message in f.messages:
                folder.filed[message.uid] = message.transaction_id
                folder.uidnext = max(folder.uidnext, message.uid + 1)
                self.filed.add(message.transaction_id)
            folder.uidnext = max(folder.uidnext, f.uidnext)
            self.modseq = max(self.modseq, f.modseq)
        elif kind == "flags_changed":
            fc = change.flags_changed
            folder = self.folder(fc.folder, fc.uidvalidity)
            if folder is not None:
                folder.flag_changes.append(fc)
            self.modseq = max(self.modseq, fc.modseq)
        elif kind == "expunged":
            e = change.expunged
            self.modseq = max(self.modseq, e.modseq)
            folder = self.folder(e.folder, e.uidvalidity)
            if folder is not None:
                folder.expunged.update(e.uids)

    # --- as a snapshot ---------------------------------------------------------------------
    def to_snapshot(self, account: str, mbxlog_seq: int, records: int) -> events_pb2.MailboxSnapshot:
        snapshot = events_pb2.MailboxSnapshot(
            format=SNAPSHOT_FORMAT, account=account, mbxlog_seq=mbxlog_seq, modseq=self.modseq, names=self.names,
            deleted_uidvalidities=sorted(self.gone), special_uses=self.special_uses, provisioned=self.provisioned,
            subscriptions_recorded=self.subscriptions is not None, subscriptions=sorted(self.subscriptions or ()),
            time_unix_ms=int(time.time() * 1000), records=records)
        live: set[str] = set()
        for folder in self.folders.values():
            out = snapshot.folders.add(name=folder.name, uidvalidity=folder.uidvalidity, uidnext=folder.uidnext,
                                       expunged_ranges=_ranges(folder.expunged), flag_changes=folder.flag_changes)
            for uid in sorted(set(folder.filed) - folder.expunged):
                identity = folder.filed[uid]
                live.add(identity)
                _fold_into(out.messages.add(uid=uid, identity=identity), folder.folds.get(uid))
            for uid in sorted(set(folder.folds) - set(folder.filed) - folder.expunged):
                _fold_into(out.unfiled.add(uid=uid), folder.folds[uid])
        snapshot.filed_before.extend(sorted(self.filed - live))
        return snapshot

    @classmethod
    def from_snapshot(cls, snapshot: events_pb2.MailboxSnapshot) -> AccountState:
        if snapshot.format != SNAPSHOT_FORMAT:
            raise SnapshotUnreadable(f"snapshot format {snapshot.format} (this version reads {SNAPSHOT_FORMAT})")
        state = cls(names=dict(snapshot.names), gone=set(snapshot.deleted_uidvalidities),
                    special_uses=dict(snapshot.special_uses), provisioned=snapshot.provisioned,
                    subscriptions=set(snapshot.subscriptions) if snapshot.subscriptions_recorded else None,
                    filed=set(snapshot.filed_before), modseq=snapshot.modseq)
        for f in snapshot.folders:
            folder = state.folders[f.uidvalidity] = FolderState(
                f.name, f.uidvalidity, f.uidnext, expunged=_from_ranges(f.expunged_ranges),
                flag_changes=list(f.flag_changes))
            for m in (*f.messages, *f.unfiled):
                if m.identity:
                    folder.filed[m.uid] = m.identity
                    state.filed.add(m.identity)
                if m.flags_modseq or m.flags_set or m.flags or m.removed:
                    folder.folds[m.uid] = FlagFold(m.flags_set, set(m.flags), set(m.removed), m.flags_modseq)
        return state


def _fold_into(message: events_pb2.SnapshotMessage, fold: FlagFold | None) -> None:
    if fold is None:
        return
    message.flags_set = fold.absolute
    message.flags.extend(sorted(fold.flags))
    message.removed.extend(sorted(fold.removed))
    message.flags_modseq = fold.modseq


def _ranges(uids: set[int]) -> list[int]:
    """UIDs as (first, last) pairs, flattened: an EXPUNGE of thousands is a few numbers."""
    out: list[int] = []
    for uid in sorted(uids):
        if out and out[-1] == uid - 1:
            out[-1] = uid
        else:
            out += [uid, uid]
    return out


def _from_ranges(ranges: Iterable[int]) -> set[int]:
    flat = list(ranges)
    return {uid for first, last in zip(flat[::2], flat[1::2], strict=True) for uid in range(first, last + 1)}


# --- where snapshots live ----------------------------------------------------------------------
@dataclass(frozen=True)
class StoredHead:
    """An account's current snapshot as its head names it; ``seq``: the head's sequence on
    MBXSNAP (what a new head must replace)."""

    token: str
    head: events_pb2.MailboxSnapshotHead
    seq: int


class SnapshotStore:
    """The MBXSNAP stream: per account, a head (``rempart.mbxsnap.head.<token>``) naming the
    current snapshot, whose body is zlib-compressed in chunks on a subject of its own
    (``rempart.mbxsnap.body.<token>.<mbxlog seq>-<random>``)."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def head(self, token: str) -> StoredHead | None:
        try:
            msg = await self._js.get_last_msg(MAILBOX_SNAPSHOT_STREAM, mailbox_snapshot_head_subject(token),
                                              direct=True)
        except NotFoundError:
            return None
        return StoredHead(token, events_pb2.MailboxSnapshotHead.FromString(msg.data or b""), int(msg.seq or 0))

    async def heads(self) -> dict[str, StoredHead]:
        """Every account's current head, by account token."""
        out = {}
        async for subject, data, seq in read_stream(self._js, MAILBOX_SNAPSHOT_STREAM, MAILBOX_SNAPSHOT_HEADS,
                                                    last_per_subject=True):
            token = subject.rsplit(".", 1)[1]
            out[token] = StoredHead(token, events_pb2.MailboxSnapshotHead.FromString(data), seq)
        return out

    async def load(self, stored: StoredHead) -> AccountState:
        head = stored.head
        subject = mailbox_snapshot_body_subject(stored.token, head.body)
        body = b"".join([data async for _, data, _ in read_stream(self._js, MAILBOX_SNAPSHOT_STREAM, subject)])
        if len(body) != head.size or hashlib.sha256(body).digest() != head.sha256:
            raise SnapshotUnreadable(f"snapshot {subject}: {len(body)} of {head.size} bytes, or altered")
        return AccountState.from_snapshot(events_pb2.MailboxSnapshot.FromString(zlib.decompress(body)))

    async def save(self, token: str, snapshot: events_pb2.MailboxSnapshot, replaces: StoredHead | None,
                   messages: int) -> StoredHead | None:
        """Store a snapshot and make it the account's current one, unless another was made
        current since ``replaces`` was (then None, and nothing of this one stays)."""
        body = zlib.compress(snapshot.SerializeToString())
        name = f"{snapshot.mbxlog_seq}-{secrets.token_hex(6)}"
        subject = mailbox_snapshot_body_subject(token, name)
        chunks = 0
        try:
            for start in range(0, len(body), SNAPSHOT_CHUNK):
                await self._js.publish(subject, body[start : start + SNAPSHOT_CHUNK], stream=MAILBOX_SNAPSHOT_STREAM,
                                       timeout=PUBLISH_TIMEOUT)
                chunks += 1
        except BaseException:
            await self._drop(subject)
            raise
        head = events_pb2.MailboxSnapshotHead(
            account=snapshot.account, mbxlog_seq=snapshot.mbxlog_seq, body=name, chunks=chunks, size=len(body),
            sha256=hashlib.sha256(body).digest(), messages=messages, records=snapshot.records,
            time_unix_ms=snapshot.time_unix_ms)
        try:
            ack = await self._js.publish(
                mailbox_snapshot_head_subject(token), head.SerializeToString(), stream=MAILBOX_SNAPSHOT_STREAM,
                timeout=PUBLISH_TIMEOUT,
                headers={"Nats-Expected-Last-Subject-Sequence": str(replaces.seq if replaces else 0)})
        except APIError as exc:
            await self._drop(subject)  # refused: no head names these chunks
            if exc.err_code == _WRONG_LAST_SEQUENCE:
                return None
            raise
        # Any other failure (a timeout): the head may have been written and its acknowledgement
        # lost, so its chunks stay; if it was not, the account's next compaction drops them.
        await self._forget_older(token, name, snapshot.mbxlog_seq, int(ack.seq))
        return StoredHead(token, head, int(ack.seq))

    async def _forget_older(self, token: str, name: str, mbxlog_seq: int, head_seq: int) -> None:
        """Older heads and bodies: a body named in an older head, or one written by a compaction
        that started from an older head (its head will be refused); never one still to come:
        those cover a later sequence. Best effort: what stays is space, and the next
        compaction of the account drops it."""
        try:
            await self._js.purge_stream(MAILBOX_SNAPSHOT_STREAM, subject=mailbox_snapshot_head_subject(token),
                                        seq=head_seq)
            bodies = await subject_counts(self._js, MAILBOX_SNAPSHOT_STREAM, mailbox_snapshot_body_subject(token, "*"))
        except Exception as exc:  # noqa: BLE001 - see above
            log.warning("older snapshots of %s not dropped: %s", token, exc)
            return
        for old in bodies:
            other = old.rsplit(".", 1)[1]
            if other != name and int(other.split("-", 1)[0]) <= mbxlog_seq:
                await self._drop(old)

    async def _drop(self, subject: str) -> None:
        try:
            await self._js.purge_stream(MAILBOX_SNAPSHOT_STREAM, subject=subject)
        except Exception as exc:  # noqa: BLE001 - best effort: a later compaction drops it
            log.warning("snapshot chunks %s not dropped: %s", subject, exc)


# --- replay ------------------------------------------------------------------------------------
async def replay_account(js: JetStreamContext, store: SnapshotStore, token: str
                         ) -> tuple[AccountState | None, StoredHead | None]:
    """One account's state: its snapshot, then its records after it, to the end of its
    subject. None when it has neither. Started again when its snapshot is replaced meanwhile
    (the records it expected may have been purged)."""
    for _ in range(_REPLAY_ATTEMPTS):
        stored = await store.head(token)
        try:
            state = await store.load(stored) if stored is not None else None
        except SnapshotUnreadable:
            if await store.head(token) == stored:
                raise
            continue
        after = stored.head.mbxlog_seq if stored is not None else 0
        async for _, data, _ in read_stream(js, MAILBOX_LOG_STREAM, MAILBOX_LOG_PREFIX + token, after=after):
            state = state or AccountState()
            state.apply(events_pb2.MailboxChange.FromString(data))
        if await store.head(token) == stored:
            return state, stored
    raise RuntimeError(f"account {token}: its snapshot keeps being replaced; stop the compactors and retry")


async def replay_accounts(js: JetStreamContext, store: SnapshotStore) -> dict[str, AccountState]:
    """Every account's state, by account: the snapshots, then one pass over the change log
    that skips what each account's snapshot holds. An account compacted during the pass (its
    head changed: records the pass expected may be purged) is replayed again on its own."""
    heads = await store.heads()
    accounts: dict[str, AccountState] = {}
    again: set[str] = set()
    for token, stored in heads.items():
        try:
            accounts[stored.head.account] = await store.load(stored)
        except SnapshotUnreadable:
            again.add(token)
    covered = {MAILBOX_LOG_PREFIX + token: stored.head.mbxlog_seq for token, stored in heads.items()}
    async for subject, data, seq in read_stream(js, MAILBOX_LOG_STREAM, MAILBOX_LOG_PREFIX + ">"):
        if seq > covered.get(subject, 0):
            change = events_pb2.MailboxChange.FromString(data)
            accounts.setdefault(change.account, AccountState()).apply(change)
    now = await store.heads()
    again |= {token for token, stored in now.items() if heads.get(token) != stored}
    for token in sorted(again):
        state, current = await replay_account(js, store, token)
        if current is not None and state is not None:
            accounts[current.head.account] = state
    return accounts


# --- compaction --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Compaction:
    account: str
    records_before: int  # the account's records in MBXLOG before
    records_after: int  # and after (those appended meanwhile stay)
    folded: int  # records folded into the snapshot this time
    mbxlog_seq: int
    snapshot_bytes: int
    messages: int
    seconds: float


async def _records(js: JetStreamContext, subject: str) -> int:
    return (await subject_counts(js, MAILBOX_LOG_STREAM, subject)).get(subject, 0)


async def compact_account(js: JetStreamContext, mailboxes: Mailboxes, store: SnapshotStore, account: str
                          ) -> Compaction | None:
    """Fold the account's change log up to its last record into its snapshot, then purge what
    was folded (see the module's docstring). None when there was nothing to fold or another
    compaction of the account won."""
    started = time.monotonic()
    token, subject = mailbox_log_token(account), mailbox_log_subject(account)
    stored = await store.head(token)
    if stored is not None:
        # Left by a compaction cut between its snapshot and its purge: folded already.
        await js.purge_stream(MAILBOX_LOG_STREAM, subject=subject, seq=stored.head.mbxlog_seq + 1)
    # The horizon of folded flag changes: read before the last sequence (see the docstring).
    await mailboxes.recover(account)
    horizon = await mailboxes.index.counter(account)
    for entry in (await mailboxes.index.journal(account)).values():
        horizon = min(horizon, int(entry["m"]) - 1)
    try:
        last = int((await js.get_last_msg(MAILBOX_LOG_STREAM, subject, direct=True)).seq or 0)
    except NotFoundError:
        return None
    if stored is not None and last <= stored.head.mbxlog_seq:
        return None
    before = await _records(js, subject)
    try:
        state = await store.load(stored) if stored is not None else AccountState()
    except SnapshotUnreadable:
        if await store.head(token) != stored:
            return None  # another replica's compaction replaced it meanwhile
        raise
    folded = 0
    after = stored.head.mbxlog_seq if stored is not None else 0
    async for _, data, _ in read_stream(js, MAILBOX_LOG_STREAM, subject, after=after, up_to=last):
        state.apply(events_pb2.MailboxChange.FromString(data))
        folded += 1
    for folder in state.folders.values():
        folder.settle(horizon)
    snapshot = state.to_snapshot(account, last, (stored.head.records if stored is not None else 0) + folded)
    messages = sum(len(f.messages) for f in snapshot.folders)
    saved = await store.save(token, snapshot, stored, messages)
    if saved is None:
        log.info("mailbox log compaction lost to another replica's", extra={"account": account})
        return None
    await js.purge_stream(MAILBOX_LOG_STREAM, subject=subject, seq=last + 1)
    done = Compaction(account, before, await _records(js, subject), folded, last, saved.head.size, messages,
                      time.monotonic() - started)
    log.info("mailbox log compacted: %d records before, %d after (%d folded into a %d-byte snapshot of %d messages)",
             done.records_before, done.records_after, done.folded, done.snapshot_bytes, done.messages,
             extra={"account": account, "mbxlog_seq": last, "seconds": round(done.seconds, 3)})
    return done


async def compact_grown(js: JetStreamContext, mailboxes: Mailboxes, store: SnapshotStore, threshold: int
                        ) -> list[Compaction]:
    """Compact, one at a time, every account with more than ``threshold`` records in MBXLOG
    (what its log grew by since its snapshot). The counts are JetStream's own per-subject
    counts: no write on the mail path keeps them, and they are right after any crash. Accounts
    are taken in random order and counted again just before: other replicas doing the same
    rarely pick the same one at once (and when they do, one compaction wins)."""
    counts = await subject_counts(js, MAILBOX_LOG_STREAM, MAILBOX_LOG_PREFIX + ">")
    grown = [subject for subject, records in counts.items() if records > threshold]
    random.shuffle(grown)
    done = []
    for subject in grown:
        if await _records(js, subject) <= threshold:
            continue  # compacted meanwhile
        try:
            last = await js.get_last_msg(MAILBOX_LOG_STREAM, subject, direct=True)
        except NotFoundError:
            continue
        account = events_pb2.MailboxChange.FromString(last.data or b"").account
        compaction = await compact_account(js, mailboxes, store, account)
        if compaction is not None:
            done.append(compaction)
    return done


async def run_compactor(js: JetStreamContext, mailboxes: Mailboxes, threshold: int,
                        every: float = COMPACT_EVERY_SECONDS) -> None:
    """The background compactor (imap-pop): every ``every`` seconds or so, the accounts whose
    log grew by more than ``threshold`` records are compacted. A failure is logged and tried
    again at the next round: until then replay is longer, nothing else."""
    store = SnapshotStore(js)
    while True:
        await asyncio.sleep(every * random.uniform(0.5, 1.5))
        try:
            await compact_grown(js, mailboxes, store, threshold)
        except Exception as exc:  # noqa: BLE001 - NATS or Redis away: the next round retries
            log.warning("mailbox log compaction failed, retried in a while: %s", exc)
