"""The message store (DESIGN.md "Durability").

An accepted message is one blob in the JetStream object store ``MAILBLOBS`` plus one
:class:`DeliveryRecord` on the ``MAIL`` stream naming every local mailbox and remote recipient;
both are acknowledged by JetStream (which fsyncs before it acks) before the edge answers
``250``. One record per transaction makes the accept atomic: either the record exists and every
recipient gets the message, or it does not and none does.

The per-mailbox index in Redis (UIDVALIDITY, UIDNEXT, UID -> blob, flags, size, internal
date) is derived from the records, idempotently (a transaction id maps to one UID per
folder), and can be rebuilt from the stream.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from nats.js import JetStreamContext
from nats.js import api as jsapi
from nats.js.object_store import ObjectStore

from rempart.common import keys
from rempart.common.events import (
    BLOB_BUCKET,
    MAIL_ACCEPTED_SUBJECT,
    MAIL_APPENDED_SUBJECT,
    MAIL_EXPUNGED_SUBJECT,
    MAIL_STREAM,
)
from rempart.common.pb.events.v1 import events_pb2

log = logging.getLogger(__name__)

INBOX = "INBOX"
PUBLISH_TIMEOUT = 10.0


def new_transaction_id() -> str:
    """Time-ordered and unique: milliseconds, then 64 random bits."""
    return f"{int(time.time() * 1000):013x}{os.urandom(8).hex()}"


class MessageStore:
    """Writes blobs and records; reads blobs."""

    def __init__(self, js: JetStreamContext, blobs: ObjectStore) -> None:
        self._js = js
        self._blobs = blobs

    @classmethod
    async def open(cls, js: JetStreamContext) -> MessageStore:
        return cls(js, await js.object_store(BLOB_BUCKET))

    async def put_blob(self, data: bytes, name: str = "") -> str:
        name = name or new_transaction_id()
        await self._blobs.put(name, data)
        return name

    async def accept(
        self,
        data: bytes,
        *,
        mail_from: str,
        local_mailboxes: list[str],
        remote_recipients: list[str],
        client_ip: str = "",
        authenticated_account: str = "",
        dsn: dict[str, str] | None = None,
        folder: str = "",
        flags: list[str] | None = None,
        subject: str = MAIL_ACCEPTED_SUBJECT,
        transaction_id: str = "",
        remote_senders: dict[str, str] | None = None,
    ) -> tuple[events_pb2.DeliveryRecord, int]:
        """Store durably; returns the record and its stream sequence. Raises on any failure."""
        blob = await self.put_blob(data, transaction_id)
        record = events_pb2.DeliveryRecord(
            transaction_id=blob,
            blob=blob,
            size=len(data),
            mail_from=mail_from,
            local_mailboxes=sorted(set(local_mailboxes)),
            remote_recipients=remote_recipients,
            received_unix_ms=int(time.time() * 1000),
            client_ip=client_ip,
            authenticated_account=authenticated_account,
            dsn=dsn or {},
            folder=folder,
            flags=flags or [],
            remote_senders=remote_senders or {},
        )
        ack = await self._js.publish(
            subject,
            record.SerializeToString(),
            stream=MAIL_STREAM,
            timeout=PUBLISH_TIMEOUT,
            headers={"Nats-Msg-Id": record.transaction_id},
        )
        return record, int(ack.seq)

    async def append(
        self, mailbox: str, folder: str, data: bytes, flags: list[str]
    ) -> tuple[events_pb2.DeliveryRecord, int]:
        """IMAP APPEND: the same durable path as SMTP, for one mailbox and folder."""
        return await self.accept(
            data,
            mail_from="",
            local_mailboxes=[mailbox],
            remote_recipients=[],
            folder=folder,
            flags=flags,
            subject=MAIL_APPENDED_SUBJECT,
        )

    async def record_expunge(self, mailbox: str, folder: str, transaction_ids: list[str]) -> None:
        record = events_pb2.ExpungeRecord(
            mailbox=mailbox,
            folder=folder,
            transaction_ids=transaction_ids,
            time_unix_ms=int(time.time() * 1000),
        )
        await self._js.publish(
            MAIL_EXPUNGED_SUBJECT, record.SerializeToString(), stream=MAIL_STREAM, timeout=PUBLISH_TIMEOUT
        )

    async def read_blob(self, name: str) -> bytes:
        result = await self._blobs.get(name)
        return bytes(result.data or b"")


@dataclass(frozen=True)
class IndexedMessage:
    uid: int
    blob: str
    size: int
    internal_date_ms: int
    flags: frozenset[str]
    transaction_id: str


@dataclass(frozen=True)
class FolderStatus:
    uidvalidity: int
    uidnext: int
    exists: int


# A new folder's UIDVALIDITY: strictly greater than any given before, even after a flush in
# the same second (RFC 3501 2.3.1.1: new UIDs must come with a new, larger UIDVALIDITY).
_NEW_FOLDER_LUA = """
if redis.call('HEXISTS', KEYS[1], 'uidvalidity') == 1 then return 0 end
local v = redis.call('INCR', KEYS[2])
if v < tonumber(ARGV[1]) then redis.call('SET', KEYS[2], ARGV[1]); v = tonumber(ARGV[1]) end
redis.call('HSET', KEYS[1], 'uidvalidity', v, 'uidnext', 1)
redis.call('SADD', KEYS[3], ARGV[2])
return 1
"""

# Append one message to a folder unless this transaction is already there (idempotent).
_APPEND_LUA = """
local existing = redis.call('HGET', KEYS[3], ARGV[1])
if existing then return tonumber(existing) end
if redis.call('HEXISTS', KEYS[1], 'uidvalidity') == 0 then
  local v = redis.call('INCR', KEYS[5])
  if v < tonumber(ARGV[6]) then redis.call('SET', KEYS[5], ARGV[6]); v = tonumber(ARGV[6]) end
  redis.call('HSET', KEYS[1], 'uidvalidity', v, 'uidnext', 1)
  redis.call('SADD', KEYS[4], ARGV[8])
end
local uid = redis.call('HINCRBY', KEYS[1], 'uidnext', 1) - 1
redis.call('ZADD', KEYS[2], uid, uid)
redis.call('HSET', ARGV[5] .. uid, 'blob', ARGV[2], 'size', ARGV[3], 'date', ARGV[4],
           'flags', ARGV[7], 'txn', ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], uid)
return uid
"""


class MailboxIndex:
    """The Redis view of mailboxes: what IMAP and POP3 list, flag and expunge."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._append = redis.register_script(_APPEND_LUA)
        self._new_folder = redis.register_script(_NEW_FOLDER_LUA)

    async def apply(self, record: events_pb2.DeliveryRecord) -> dict[str, int]:
        """Index a delivery record; returns mailbox -> UID. Safe to call twice."""
        folder = record.folder or INBOX
        out: dict[str, int] = {}
        for mailbox in record.local_mailboxes:
            uid = await self._append(
                keys=[
                    keys.mailbox_meta(mailbox, folder),
                    keys.mailbox_uids(mailbox, folder),
                    keys.mailbox_txn(mailbox, folder),
                    keys.mailbox_folders(mailbox),
                    keys.UIDVALIDITY_SEQ,
                ],
                args=[
                    record.transaction_id,
                    record.blob,
                    record.size,
                    record.received_unix_ms,
                    keys.mailbox_message_prefix(mailbox, folder),
                    _new_uidvalidity(),
                    " ".join(record.flags),
                    folder,
                ],
            )
            out[mailbox] = int(uid)
        return out

    async def create_folder(self, mailbox: str, folder: str) -> bool:
        created = await self._new_folder(
            keys=[keys.mailbox_meta(mailbox, folder), keys.UIDVALIDITY_SEQ, keys.mailbox_folders(mailbox)],
            args=[_new_uidvalidity(), folder],
        )
        return bool(created)

    async def folders(self, mailbox: str) -> list[str]:
        names = {str(m) for m in await self._redis.smembers(keys.mailbox_folders(mailbox))}
        names.add(INBOX)
        return sorted(names, key=lambda n: (n != INBOX, n))

    async def status(self, mailbox: str, folder: str = INBOX) -> FolderStatus:
        meta = keys.mailbox_meta(mailbox, folder)
        if not await self._redis.exists(meta):
            await self.create_folder(mailbox, folder)
        raw = await self._redis.hmget(meta, ["uidvalidity", "uidnext"])
        exists = await self._redis.zcard(keys.mailbox_uids(mailbox, folder))
        return FolderStatus(int(raw[0] or 1), int(raw[1] or 1), int(exists))

    async def messages(self, mailbox: str, folder: str = INBOX) -> list[IndexedMessage]:
        members = await self._redis.zrange(keys.mailbox_uids(mailbox, folder), 0, -1)
        uids = [int(str(u)) for u in members]
        if not uids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for uid in uids:
                pipe.hgetall(keys.mailbox_message(mailbox, folder, uid))
            rows = await pipe.execute()
        out = []
        for uid, row in zip(uids, rows, strict=True):
            if not row:
                continue
            data = {str(k): str(v) for k, v in row.items()}
            out.append(
                IndexedMessage(
                    uid=uid,
                    blob=data["blob"],
                    size=int(data["size"]),
                    internal_date_ms=int(data["date"]),
                    flags=frozenset(f for f in data.get("flags", "").split(" ") if f),
                    transaction_id=data.get("txn", ""),
                )
            )
        return out

    async def set_flags(self, mailbox: str, folder: str, uid: int, flags: set[str]) -> None:
        key = keys.mailbox_message(mailbox, folder, uid)
        if await self._redis.exists(key):
            await self._redis.hset(key, "flags", " ".join(sorted(flags)))

    async def remove(self, mailbox: str, folder: str, messages: list[IndexedMessage]) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            for message in messages:
                pipe.zrem(keys.mailbox_uids(mailbox, folder), message.uid)
                pipe.delete(keys.mailbox_message(mailbox, folder, message.uid))
            await pipe.execute()

    async def flush(self) -> int:
        """Forget the whole index (before a rebuild)."""
        removed = 0
        async for key in self._redis.scan_iter(match=keys.MAILBOX_ALL_PATTERN, count=1000):
            removed += int(await self._redis.delete(key))
        return removed


def _new_uidvalidity() -> int:
    # Seconds since the epoch: grows across rebuilds, as RFC 3501 2.3.1.1 requires of a new one.
    return int(time.time())


async def expunge(
    store: MessageStore, index: MailboxIndex, mailbox: str, folder: str, messages: list[IndexedMessage]
) -> None:
    """Remove messages for good: the tombstone is durable before the index forgets them."""
    if not messages:
        return
    await store.record_expunge(mailbox, folder, [m.transaction_id for m in messages])
    await index.remove(mailbox, folder, messages)


async def rebuild_index(js: JetStreamContext, index: MailboxIndex) -> int:
    """Flush the index and replay the MAIL stream; returns the number of records applied.

    UIDs are reassigned in stream order; each folder gets a new UIDVALIDITY, as RFC 3501
    requires whenever UIDs may differ from before.
    """
    await index.flush()
    info = await js.stream_info(MAIL_STREAM)
    last = int(info.state.last_seq)
    if last == 0:
        return 0
    records: list[events_pb2.DeliveryRecord] = []
    expunged: set[tuple[str, str, str]] = set()
    sub = await js.subscribe(
        "rempart.mail.>",
        stream=MAIL_STREAM,
        ordered_consumer=True,
        deliver_policy=jsapi.DeliverPolicy.ALL,
    )
    try:
        while True:
            msg = await sub.next_msg(timeout=5)
            if msg.subject == MAIL_EXPUNGED_SUBJECT:
                tomb = events_pb2.ExpungeRecord.FromString(msg.data)
                for txn in tomb.transaction_ids:
                    expunged.add((tomb.mailbox, tomb.folder or INBOX, txn))
            else:
                records.append(events_pb2.DeliveryRecord.FromString(msg.data))
            if msg.metadata.sequence.stream >= last:
                break
    finally:
        await sub.unsubscribe()
    applied = 0
    for record in records:
        folder = record.folder or INBOX
        keep = [m for m in record.local_mailboxes if (m, folder, record.transaction_id) not in expunged]
        if not keep:
            continue
        del record.local_mailboxes[:]
        record.local_mailboxes.extend(keep)
        await index.apply(record)
        applied += 1
    return applied


async def run_indexer(js: JetStreamContext, index: MailboxIndex, durable: str = "mailbox-indexer") -> None:
    """Catch-up indexer: a durable pull consumer shared by every replica that runs it.

    The edge indexes inline right after the ack; this covers an edge that died between the
    ack and the index write, so that every acknowledged record reaches its mailboxes.
    """
    sub = await js.pull_subscribe("rempart.mail.>", durable=durable, stream=MAIL_STREAM)
    me = asyncio.current_task()
    while True:
        try:
            msgs = await sub.fetch(batch=50, timeout=5)
        except Exception as exc:  # noqa: BLE001 - a timeout, or NATS reconnecting: retry
            if me is not None and me.cancelling():
                raise asyncio.CancelledError from None  # nats-py may turn our cancel into a timeout
            if not isinstance(exc, TimeoutError):
                log.warning("indexer fetch failed: %s", exc)
                await asyncio.sleep(1)
            continue
        for msg in msgs:
            if msg.subject == MAIL_EXPUNGED_SUBJECT:
                await msg.ack()
                continue
            try:
                await index.apply(events_pb2.DeliveryRecord.FromString(msg.data))
                await msg.ack()
            except (aioredis.RedisError, OSError) as exc:
                log.warning("indexer could not apply a record, will retry: %s", exc)
                await msg.nak(delay=1)
