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

import array
import base64
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js import api as jsapi
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore
from redis.commands.core import AsyncScript

from rempart.common import keys, tracing
from rempart.common.events import (
    BLOB_BUCKET,
    MAIL_ACCEPTED_SUBJECT,
    MAIL_APPENDED_SUBJECT,
    MAIL_STREAM,
)
from rempart.common.mime import MessageSummary
from rempart.common.pb.events.v1 import events_pb2
from rempart.common.redisconn import run_scripts

log = logging.getLogger(__name__)

INBOX = "INBOX"
PUBLISH_TIMEOUT = 10.0
READ_TIMEOUT = 5.0
# The object store's layout (NATS ADR-20): one metadata message per object, then its chunks.
_BLOB_STREAM = f"OBJ_{BLOB_BUCKET}"
_BLOB_META = f"$O.{BLOB_BUCKET}.M."
_BLOB_CHUNKS = f"$O.{BLOB_BUCKET}.C."


class BlobUnreadable(Exception):
    """A stored message could not be read (missing, deleted or corrupt): not a transient error."""


def new_transaction_id() -> str:
    """Time-ordered and unique: milliseconds, then 64 random bits."""
    return f"{int(time.time() * 1000):013x}{os.urandom(8).hex()}"


# Messages up to this size travel inside their delivery record (issue 11): one acknowledged
# write (one fsync) instead of three, one direct get to read. Far below NATS's 1 MiB payload.
DEFAULT_INLINE_MAX_BYTES = 64 * 1024
MAX_INLINE_BYTES = 512 * 1024


# Batched reads of delivery records (MessageStore.read_record_bodies): the longest run of stream
# sequences one request covers, and the fewest wanted records worth one.
BATCH_SPAN = 200
BATCH_MIN = 4


class MessageStore:
    """Writes messages (inside the record when small, else a blob plus the record) and reads them."""

    def __init__(self, js: JetStreamContext, blobs: ObjectStore,
                 inline_max_bytes: int = DEFAULT_INLINE_MAX_BYTES) -> None:
        self._js = js
        self._blobs = blobs
        self._inline_max = max(0, min(inline_max_bytes, MAX_INLINE_BYTES))

    @classmethod
    async def open(cls, js: JetStreamContext, inline_max_bytes: int = DEFAULT_INLINE_MAX_BYTES) -> MessageStore:
        return cls(js, await js.object_store(BLOB_BUCKET), inline_max_bytes)

    async def put_blob(self, data: bytes, name: str = "") -> str:
        name = name or new_transaction_id()
        with tracing.blob_write(BLOB_BUCKET, len(data)):
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
        internal_date_ms: int = 0,
    ) -> tuple[events_pb2.DeliveryRecord, int]:
        """Store durably; returns the record and its stream sequence. Raises on any failure.

        ``internal_date_ms`` is the message's INTERNALDATE when not now (IMAP APPEND's date)."""
        transaction_id = transaction_id or new_transaction_id()
        inline = len(data) <= self._inline_max
        blob = "" if inline else await self.put_blob(data, transaction_id)
        record = events_pb2.DeliveryRecord(
            transaction_id=transaction_id,
            blob=blob,
            body=data if inline else b"",
            size=len(data),
            mail_from=mail_from,
            local_mailboxes=sorted(set(local_mailboxes)),
            remote_recipients=remote_recipients,
            received_unix_ms=internal_date_ms or int(time.time() * 1000),
            client_ip=client_ip,
            authenticated_account=authenticated_account,
            dsn=dsn or {},
            folder=folder,
            flags=flags or [],
            remote_senders=remote_senders or {},
        )
        with tracing.store_write(MAIL_STREAM, subject, message_id=record.transaction_id, size=len(data)):
            ack = await self._js.publish(
                subject,
                record.SerializeToString(),
                stream=MAIL_STREAM,
                timeout=PUBLISH_TIMEOUT,
                headers=tracing.with_trace_context({"Nats-Msg-Id": record.transaction_id}),
            )
        return record, int(ack.seq)

    async def append(
        self, mailbox: str, folder: str, data: bytes, flags: list[str], internal_date_ms: int = 0
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
            internal_date_ms=internal_date_ms,
        )

    async def reclaim(self, gone: Reclaimable) -> bool:
        """Free a delivery nothing refers to any more (R-MBX-5): its blob and its record. A
        record that still names remote recipients stays (the relay may need it). False when
        nothing was deleted."""
        record = await self.record_at(gone.seq, gone.transaction_id) if gone.seq else None
        if record is None or record.remote_recipients:
            return False
        if record.blob:
            await self.delete_blob(record.blob)
        await self._js.delete_msg(MAIL_STREAM, gone.seq)
        return True

    async def delete_blob(self, name: str) -> None:
        """Purge a blob's chunks (its metadata stays, marked deleted)."""
        await self._blobs.delete(name)

    async def read_blob(self, name: str) -> bytes:
        return b"".join([chunk async for chunk in self.iter_blob(name)])

    async def read_message(self, message: IndexedMessage) -> bytes:
        """A message in a mailbox: from its blob, or from inside its delivery record."""
        if message.blob:
            return await self.read_blob(message.blob)
        if not message.record_seq:
            raise BlobUnreadable(f"message {message.transaction_id}: no blob and no record sequence")
        # A copy's identity is its delivery's transaction id, '/', a suffix (MailboxIndex.copy).
        return await self.read_record_body(message.record_seq, message.transaction_id.split("/", 1)[0])

    async def read_record_bodies(self, wanted: dict[int, str]) -> dict[int, bytes]:
        """The bodies of several inline records (stream sequence -> transaction id), read by
        batched direct gets over runs of nearby sequences (one request for a run of up to
        BATCH_SPAN sequences at least half of which are wanted: a folder filled in one go, a
        client's first sync) instead of one request each. What does not come back this way (a
        scattered record, a record gone, a server without batched direct get) is missing from
        the answer: the caller reads it alone."""
        out: dict[int, bytes] = {}
        seqs = sorted(wanted)
        i = 0
        while i < len(seqs):
            j = i
            while (j + 1 < len(seqs) and seqs[j + 1] - seqs[i] < BATCH_SPAN
                   and 2 * (j + 2 - i) >= seqs[j + 1] - seqs[i] + 1):
                j += 1
            if j - i + 1 >= BATCH_MIN:
                try:
                    await self._read_run(seqs[i], seqs[j] - seqs[i] + 1, wanted, out)
                except (NatsError, TimeoutError, ValueError) as exc:
                    log.debug("batched direct get from %d failed, reading one by one: %s", seqs[i], exc)
            i = j + 1
        return out

    async def _read_run(self, first: int, count: int, wanted: dict[int, str], out: dict[int, bytes]) -> None:
        nc = self._js._nc  # nats-py has no batched direct get: the request is made here
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        try:
            # Without the per-message headers (no_hdr): a record names its own transaction.
            request = {"seq": first, "batch": count, "no_hdr": True}
            await nc.publish(f"$JS.API.DIRECT.GET.{MAIL_STREAM}", json.dumps(request).encode(), reply=inbox)
            by_transaction = {transaction: seq for seq, transaction in wanted.items()}
            for _ in range(count + 1):
                msg = await sub.next_msg(timeout=PUBLISH_TIMEOUT)
                headers = msg.headers or {}
                if headers.get(jsapi.Header.STATUS):
                    return  # 204: end of the batch (or 404: nothing there)
                record = events_pb2.DeliveryRecord.FromString(msg.data or b"")
                seq = by_transaction.get(record.transaction_id, 0)
                if seq and (not headers or int(headers.get("Nats-Sequence", "0")) == seq):
                    out[seq] = bytes(record.body)
                if headers and "Nats-Num-Pending" not in headers:
                    return  # a server that answers one message per request: the rest one by one
        finally:
            await sub.unsubscribe()

    async def record_at(self, seq: int, transaction_id: str = "") -> events_pb2.DeliveryRecord | None:
        """The delivery record at a MAIL stream sequence; None when it is gone, or (with
        ``transaction_id``) when the record there is another message's."""
        try:
            raw = await self._js.get_msg(MAIL_STREAM, seq=seq, direct=True)
        except NotFoundError:
            return None
        record = events_pb2.DeliveryRecord.FromString(raw.data or b"")
        return None if transaction_id and record.transaction_id != transaction_id else record

    async def read_record_body(self, seq: int, transaction_id: str = "") -> bytes:
        record = await self.record_at(seq, transaction_id)
        if record is None:
            raise BlobUnreadable(f"record {seq} of message {transaction_id or '?'} not found")
        return bytes(record.body)

    async def record_body(self, record: events_pb2.DeliveryRecord) -> bytes:
        """The message of a record in hand (the relay, a DSN): inline, or its blob."""
        return bytes(record.body) if not record.blob else await self.read_blob(record.blob)

    async def iter_blob(self, name: str) -> AsyncIterator[bytes]:
        """The blob's chunks, read by direct get: no JetStream consumer per read.

        The object store's own ``get`` creates an ordered consumer for every read; a header
        sync of thousands of messages then hits the server's consumer limit and every read on
        the replica fails for seconds (issue 15). A direct get is a plain request that any
        stream replica answers. The digest is checked as the chunks arrive.
        """
        meta_subject = _BLOB_META + base64.urlsafe_b64encode(name.encode()).decode()
        try:
            meta = await self._js.get_last_msg(_BLOB_STREAM, meta_subject, direct=True)
        except NotFoundError:
            raise BlobUnreadable(f"blob {name} not found") from None
        info = json.loads(meta.data or b"{}")
        if info.get("deleted") or not info.get("nuid"):
            raise BlobUnreadable(f"blob {name} deleted")
        size, chunks = int(info.get("size", 0)), int(info.get("chunks", 0))
        if size == 0:
            return
        subject = _BLOB_CHUNKS + str(info["nuid"])
        digest = hashlib.sha256()
        seq, read = 1, 0
        for _ in range(chunks):
            try:
                msg = await self._js.get_msg(_BLOB_STREAM, seq=seq, subject=subject, next=True, direct=True)
            except NotFoundError:
                raise BlobUnreadable(f"blob {name}: a chunk is missing") from None
            data = msg.data or b""
            digest.update(data)
            read += len(data)
            seq = int(msg.seq or seq) + 1
            yield data
        expected = str(info.get("digest", "")).split("=", 1)[-1]
        if read != size or (expected and base64.urlsafe_b64encode(digest.digest()).decode().rstrip("=")
                            != expected.rstrip("=")):
            raise BlobUnreadable(f"blob {name}: size or digest mismatch")


@dataclass(frozen=True)
class IndexedMessage:
    uid: int
    blob: str
    size: int
    internal_date_ms: int
    flags: frozenset[str]
    transaction_id: str
    record_seq: int = 0  # the MAIL stream sequence of its record (where an inline body is)
    modseq: int = 0  # RFC 7162: the account's change counter at its last change


# The summary's fields in a message's index hash (hdr, env, bdy, bs). The header block is kept as Latin-1 text:
# the connection decodes replies as UTF-8, and Latin-1 maps every byte to one code point, so
# any octets (8-bit headers included) survive the round trip exactly.


def _summary_values(summary: MessageSummary | None) -> list[str]:
    if summary is None:
        return ["", "", "", ""]
    return [summary.header.decode("latin-1"), summary.envelope, summary.body, summary.bodystructure]


def _summary_from(size: str | None, values: list[str | None]) -> MessageSummary | None:
    header, env, body, bs = values
    if not env or not bs or body is None:
        return None
    return MessageSummary(size=int(size or 0), header=(header or "").encode("latin-1"),
                          envelope=env, body=body, bodystructure=bs)


@dataclass(frozen=True)
class Filed:
    """Where a message is: its folder, the folder's UIDVALIDITY and its UID there."""

    folder: str
    uidvalidity: int
    uid: int
    modseq: int = 0  # the change counter after it was filed (at least)


@dataclass(frozen=True)
class Reservation:
    """A folder needs more UIDs reserved in the change log before it hands out ``uidnext``."""

    folder: str
    uidvalidity: int
    uidnext: int


@dataclass(frozen=True)
class Reclaimable:
    """A delivery no index entry refers to any more: its blob and record can go (R-MBX-5)."""

    transaction_id: str
    blob: str
    seq: int


@dataclass(frozen=True)
class Copied:
    """One message of a COPY: its UID in the source, its place in the target (UID 0: it was
    gone), the identity of the copy and its flags."""

    source_uid: int
    place: Filed
    identity: str
    flags: frozenset[str]


@dataclass
class UidCache:
    """A folder's UIDs at a MODSEQ, kept in Redis so that SELECT of a large folder reads one
    value and the changes since, instead of the whole folder (R-MBX-2): every UID, ascending,
    and the first without \\Seen (0: none). Only valid for the folder instance of its
    UIDVALIDITY. Any session may rewrite it; each value is consistent on its own."""

    uidvalidity: int
    modseq: int
    first_unseen: int
    uids: array.array[int]


@dataclass(frozen=True)
class RestoredMessage:
    uid: int
    record: events_pb2.DeliveryRecord
    seq: int
    flags: frozenset[str]
    identity: str = ""  # a copy's (delivery transaction id, '/', suffix); else the record's id


@dataclass(frozen=True)
class FolderStatus:
    uidvalidity: int
    uidnext: int
    exists: int
    highestmodseq: int = 0  # the last MODSEQ of a change in it (0: none yet; RFC 7162 shows at least 1)


@dataclass(frozen=True)
class FolderCounts:
    """What STATUS tells of a folder: its :class:`FolderStatus`, the messages no session has seen
    yet (RECENT) and those without \\Seen (UNSEEN)."""
    status: FolderStatus
    recent: int
    unseen: int


# A folder's count of messages without \\Seen (its meta's 'unseen', for STATUS UNSEEN at the
# cost of one read): kept by every script that adds, removes or flags messages, and only where
# it is already counted (a folder from before the counter is counted once, by folder_unseen in
# _FOLDER_UNSEEN_LUA, for STATUS and for SELECT's UNSEEN alike).
_UNSEEN_LUA = """
local function unseen(flags)
  return not string.find(' ' .. (flags or '') .. ' ', ' \\\\Seen ', 1, true)
end
local function count_unseen(meta, delta)
  if delta ~= 0 and redis.call('HEXISTS', meta, 'unseen') == 1 then redis.call('HINCRBY', meta, 'unseen', delta) end
end
"""

# A new folder's UIDVALIDITY: strictly greater than any given before, even after a flush in
# the same second (RFC 3501 2.3.1.1: new UIDs must come with a new, larger UIDVALIDITY).
# Returns it, or 0 when the folder exists.
_UIDVALIDITY_LUA = """
local function next_uidvalidity(counter, floor)
  local v = redis.call('INCR', counter)
  if v < tonumber(floor) then redis.call('SET', counter, floor); v = tonumber(floor) end
  return v
end
-- A folder (its meta hash), listed among the account's folders, with a new UIDVALIDITY.
local function make_folder(meta, counter, floor, folders, name)
  local v = next_uidvalidity(counter, floor)
  redis.call('HSET', meta, 'uidvalidity', v, 'uidnext', 1, 'unseen', 0)
  redis.call('SADD', folders, name)
  return v
end
"""

_NEW_FOLDER_LUA = _UIDVALIDITY_LUA + """
if redis.call('HEXISTS', KEYS[1], 'uidvalidity') == 1 then return 0 end
return make_folder(KEYS[1], KEYS[2], ARGV[1], KEYS[3], ARGV[2])
"""

_NEXT_UIDVALIDITY_LUA = _UIDVALIDITY_LUA + """
return next_uidvalidity(KEYS[1], ARGV[1])
"""

# A folder's keys under a new name (RENAME): meta, UIDs, transaction map and each message's
# hash; refused (0) when the new name exists or the old one does not.
_RENAME_FOLDER_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
for _, uid in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  if redis.call('EXISTS', ARGV[1] .. uid) == 1 then redis.call('RENAME', ARGV[1] .. uid, ARGV[2] .. uid) end
end
redis.call('RENAME', KEYS[1], KEYS[2])
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('RENAME', KEYS[3], KEYS[4]) end
if redis.call('EXISTS', KEYS[5]) == 1 then redis.call('RENAME', KEYS[5], KEYS[6]) end
if redis.call('EXISTS', KEYS[8]) == 1 then redis.call('RENAME', KEYS[8], KEYS[9]) end
if redis.call('EXISTS', KEYS[10]) == 1 then redis.call('RENAME', KEYS[10], KEYS[11]) end
redis.call('SREM', KEYS[7], ARGV[3])
redis.call('SADD', KEYS[7], ARGV[4])
return tonumber(redis.call('HGET', KEYS[2], 'uidvalidity'))
"""

# Shared by the scripts that drop messages (ARGV[3] is the prefix of the reference counters).
_UNREF_LUA = """
local ARGV_REF = ARGV[3]
-- One reference to a message's delivery fewer (R-MBX-5); the last one reports the delivery
-- (transaction id, blob, record sequence) so that its bytes can be deleted.
local function unref(key, gone)
  local row = redis.call('HMGET', key, 'txn', 'blob', 'seq')
  if not row[1] then return end
  local base = string.match(row[1], '^[^/]*')
  local left = redis.call('DECR', ARGV_REF .. base)
  if left <= 0 then
    redis.call('DEL', ARGV_REF .. base)
    if left == 0 then
      gone[#gone + 1] = base; gone[#gone + 1] = row[2] or ''; gone[#gone + 1] = row[3] or ''
    end
  end
end
"""

# A folder and everything in it leaves the index; returns its UIDVALIDITY (0: there was none).
_DELETE_FOLDER_LUA = _UNREF_LUA + """
local gone = {}
local v = redis.call('HGET', KEYS[1], 'uidvalidity')
for _, uid in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  redis.call('HINCRBY', KEYS[7], 'bytes', -tonumber(redis.call('HGET', ARGV[1] .. uid, 'size') or '0'))
  redis.call('HINCRBY', KEYS[7], 'messages', -1)
  unref(ARGV[1] .. uid, gone)
  redis.call('DEL', ARGV[1] .. uid)
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[5], KEYS[6])
redis.call('SREM', KEYS[4], ARGV[2])
table.insert(gone, 1, tonumber(v or 0))
return gone
"""

# Append one message to a folder unless this transaction is already there (idempotent).
_APPEND_LUA = _UIDVALIDITY_LUA + _UNSEEN_LUA + """
-- One delivery record filed in each of its mailboxes (one call, however many: the summary and
-- the record's facts are sent once). KEYS[1]: the UIDVALIDITY counter, KEYS[2]: the record's
-- reference count; then 7 keys per mailbox: meta, uids, txn, folders, modseq, changes, usage.
-- ARGV: txn, blob, size, date, UIDVALIDITY floor, flags, folder, hdr, env, bdy, bs, seq,
-- references, then each mailbox's message key prefix. Reply: 4 values per mailbox, {uid,
-- uidvalidity, 0, modseq} where it is (already, or now), {0, uidvalidity, uidnext, 0} where
-- the UIDs reserved in the change log are used up (the caller records a reservation first).
local out = {}
local mailboxes = (#KEYS - 2) / 7
for m = 0, mailboxes - 1 do
  local k = 2 + 7 * m
  local meta, uids, txn, folders, modseq_key, changes, usage =
    KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5], KEYS[k + 6], KEYS[k + 7]
  local prefix = ARGV[14 + m]
  local existing = redis.call('HGET', txn, ARGV[1])
  if existing then
    out[#out + 1] = tonumber(existing); out[#out + 1] = tonumber(redis.call('HGET', meta, 'uidvalidity'))
    out[#out + 1] = 0; out[#out + 1] = tonumber(redis.call('GET', modseq_key) or '0')
  else
    if redis.call('HEXISTS', meta, 'uidvalidity') == 0 then
      make_folder(meta, KEYS[1], ARGV[5], folders, ARGV[7])
    end
    local info = redis.call('HMGET', meta, 'uidvalidity', 'uidnext', 'reserved')
    if tonumber(info[2]) >= tonumber(info[3] or '1') then
      -- Past what the change log has reserved: the caller records a reservation first.
      out[#out + 1] = 0; out[#out + 1] = tonumber(info[1]); out[#out + 1] = tonumber(info[2]); out[#out + 1] = 0
    else
      local uid = redis.call('HINCRBY', meta, 'uidnext', 1) - 1
      local modseq = redis.call('INCR', modseq_key)
      redis.call('HSET', meta, 'highestmodseq', modseq)
      redis.call('ZADD', changes, modseq, uid)
      redis.call('ZADD', uids, uid, uid)
      redis.call('HINCRBY', usage, 'bytes', ARGV[3])
      redis.call('HINCRBY', usage, 'messages', 1)
      -- Its references: one per recipient mailbox, counted once when the first is placed, so a
      -- recipient placed late (reserved first, then filed) is never left without its bytes.
      if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('SET', KEYS[2], ARGV[13]) end
      redis.call('HSET', prefix .. uid, 'blob', ARGV[2], 'size', ARGV[3], 'date', ARGV[4],
                 'flags', ARGV[6], 'txn', ARGV[1], 'seq', ARGV[12], 'modseq', modseq)
      if ARGV[9] ~= '' then
        redis.call('HSET', prefix .. uid, 'hdr', ARGV[8], 'env', ARGV[9], 'bdy', ARGV[10], 'bs', ARGV[11])
      end
      redis.call('HSET', txn, ARGV[1], uid)
      if unseen(ARGV[6]) then count_unseen(meta, 1) end
      out[#out + 1] = uid; out[#out + 1] = tonumber(info[1]); out[#out + 1] = 0; out[#out + 1] = modseq
    end
  end
end
return out
"""

# RFC 3501 \Recent: the first session to see a message gets it as recent. The folder keeps the
# first UID no session has seen yet; a session takes everything below ARGV[1] and learns from
# which UID on they are its own (the reply).
_CLAIM_RECENT_LUA = """
local first = tonumber(redis.call('HGET', KEYS[1], 'recentfrom') or '1')
if redis.call('EXISTS', KEYS[1]) == 1 and tonumber(ARGV[1]) > first then
  redis.call('HSET', KEYS[1], 'recentfrom', ARGV[1])
end
return first
"""

# COPY by reference (R-MBX-5): each source message (ARGV[6..], UIDs; ARGV[1] the source
# prefix) gets a new UID in the target folder (KEYS[1..3], named ARGV[5]) with the same body,
# summary and flags, under a new identity (its delivery's transaction id, '/', ARGV[3], a
# counter): no byte is copied. What was done is also kept in the account's journal (KEYS[7],
# under ARGV[3]) until the change log has it (see _JOURNAL). Reply: the target's UIDVALIDITY, the
# change counter taken (KEYS[4]), then per source UID its new UID (0: gone), identity and
# flags; or {0, uidvalidity, uidnext} when the UIDs needed pass what the log reserved, or {}
# when the target does not exist.
_COPY_LUA = _UNSEEN_LUA + """
local meta = redis.call('HMGET', KEYS[1], 'uidvalidity', 'uidnext', 'reserved')
if not meta[1] then return {} end
local wanted = #ARGV - 5
if tonumber(meta[2]) + wanted > tonumber(meta[3] or '1') then return {0, tonumber(meta[1]), tonumber(meta[2])} end
local out = {tonumber(meta[1]), redis.call('INCR', KEYS[4])}
local journal = {}
for i = 6, #ARGV do
  local source = ARGV[1] .. ARGV[i]
  local row = redis.call('HGETALL', source)
  if #row == 0 then
    out[#out + 1] = 0; out[#out + 1] = ''; out[#out + 1] = ''
  else
    local uid = redis.call('HINCRBY', KEYS[1], 'uidnext', 1) - 1
    local txn = redis.call('HGET', source, 'txn') or ''
    local base = string.match(txn, '^[^/]*')
    local identity = base .. '/' .. ARGV[3] .. (i - 5)
    redis.call('HSET', ARGV[2] .. uid, unpack(row))
    redis.call('HSET', ARGV[2] .. uid, 'txn', identity, 'modseq', out[2])
    redis.call('ZADD', KEYS[5], out[2], uid)
    redis.call('HINCRBY', KEYS[6], 'bytes', tonumber(redis.call('HGET', source, 'size') or '0'))
    redis.call('HINCRBY', KEYS[6], 'messages', 1)
    -- Counted only where the delivery is (mail from before the counters is never freed).
    if redis.call('EXISTS', ARGV[4] .. base) == 1 then redis.call('INCR', ARGV[4] .. base) end
    redis.call('ZADD', KEYS[2], uid, uid)
    redis.call('HSET', KEYS[3], identity, uid)
    out[#out + 1] = uid; out[#out + 1] = identity; out[#out + 1] = redis.call('HGET', source, 'flags') or ''
    journal[#journal + 1] = {uid, identity, out[#out]}
    if unseen(out[#out]) then count_unseen(KEYS[1], 1) end
  end
end
redis.call('HSET', KEYS[1], 'highestmodseq', out[2])
if #journal > 0 then
  redis.call('HSET', KEYS[7], ARGV[3], cjson.encode({k = 'copy', f = ARGV[5], v = out[1], m = out[2], c = journal}))
end
return out
"""

# UIDs up to ARGV[2] (excluded) are recorded in the change log as reserved for this folder
# instance (ARGV[1] its UIDVALIDITY); never lowered.
_RESERVE_LUA = """
local meta = redis.call('HMGET', KEYS[1], 'uidvalidity', 'reserved')
if meta[1] ~= ARGV[1] then return 0 end
if tonumber(meta[2] or '0') < tonumber(ARGV[2]) then redis.call('HSET', KEYS[1], 'reserved', ARGV[2]) end
return 1
"""


_STORE_SUMMARY_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'size', ARGV[1], 'hdr', ARGV[2], 'env', ARGV[3], 'bdy', ARGV[4], 'bs', ARGV[5])
return 1
"""


# A page of a folder's messages: uid, blob, size, date, flags, txn, seq, modseq for each, in UID order.
_LIST_PAGE_LUA = """
local uids = redis.call('ZRANGE', KEYS[1], ARGV[2], ARGV[3])
local out = {}
for _, uid in ipairs(uids) do
  local row = redis.call('HMGET', ARGV[1] .. uid, 'blob', 'size', 'date', 'flags', 'txn', 'seq', 'modseq')
  out[#out + 1] = uid
  for j = 1, 7 do out[#out + 1] = row[j] or '' end
end
return out
"""

# A folder's unseen count: its meta's, or counted once (a folder from before the counter) and kept.
_FOLDER_UNSEEN_LUA = _UNSEEN_LUA + """
local function folder_unseen(meta, uids, prefix)
  local known = redis.call('HGET', meta, 'unseen')
  if known then return tonumber(known) end
  if redis.call('EXISTS', meta) == 0 then return 0 end
  local n = 0
  for _, uid in ipairs(redis.call('ZRANGE', uids, 0, -1)) do
    if unseen(redis.call('HGET', prefix .. uid, 'flags')) then n = n + 1 end
  end
  redis.call('HSET', meta, 'unseen', n)
  return n
end
"""
_UNSEEN_COUNT_LUA = _FOLDER_UNSEEN_LUA + """
return folder_unseen(KEYS[1], KEYS[2], ARGV[1])
"""

# Everything STATUS tells of a folder in one call (RFC 3501 6.3.10, RFC 7162 3.1.9): UIDVALIDITY,
# UIDNEXT, HIGHESTMODSEQ, MESSAGES, RECENT (from the first UID no session has seen) and UNSEEN;
# an empty reply when the folder has no meta yet.
_STATUS_LUA = _FOLDER_UNSEEN_LUA + """
local meta = redis.call('HMGET', KEYS[1], 'uidvalidity', 'uidnext', 'highestmodseq', 'recentfrom')
if not meta[1] then return {} end
return {tonumber(meta[1]), tonumber(meta[2] or 1), tonumber(meta[3] or 0), redis.call('ZCARD', KEYS[2]),
        redis.call('ZCOUNT', KEYS[2], tonumber(meta[4] or 1), '+inf'), folder_unseen(KEYS[1], KEYS[2], ARGV[1])}
"""

# Some messages by UID, as _LIST_PAGE_LUA gives them (an expunged one: its UID and empty fields).
_BY_UID_LUA = """
local out = {}
for i = 2, #ARGV do
  local row = redis.call('HMGET', ARGV[1] .. ARGV[i], 'blob', 'size', 'date', 'flags', 'txn', 'seq', 'modseq')
  out[#out + 1] = ARGV[i]
  for j = 1, 7 do out[#out + 1] = row[j] or '' end
end
return out
"""

# The first message from UID ARGV[2] on without \\Seen (its UID; 0: none), read a page at a time.
_FIRST_UNSEEN_LUA = """
local from = ARGV[2]
while true do
  local uids = redis.call('ZRANGEBYSCORE', KEYS[1], from, '+inf', 'LIMIT', 0, 500)
  if #uids == 0 then return 0 end
  for _, uid in ipairs(uids) do
    local flags = redis.call('HGET', ARGV[1] .. uid, 'flags')
    if flags and not string.find(' ' .. flags .. ' ', ' \\\\Seen ', 1, true) then return tonumber(uid) end
  end
  from = '(' .. uids[#uids]
end
"""

# The messages changed (flags, or new) after a MODSEQ, in UID order, as _LIST_PAGE_LUA gives
# them; {} when more than ARGV[3] of them (the caller reloads the folder instead).
_CHANGED_SINCE_LUA = """
local uids = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[2], '+inf', 'LIMIT', 0, tonumber(ARGV[3]) + 1)
if #uids > tonumber(ARGV[3]) then return {'overflow'} end
local numbers = {}
for _, uid in ipairs(uids) do numbers[#numbers + 1] = tonumber(uid) end
table.sort(numbers)
local out = {}
for _, uid in ipairs(numbers) do
  local row = redis.call('HMGET', ARGV[1] .. uid, 'blob', 'size', 'date', 'flags', 'txn', 'seq', 'modseq')
  out[#out + 1] = uid
  for j = 1, 7 do out[#out + 1] = row[j] or '' end
end
return out
"""

# Summaries of some messages: size, hdr, env, bdy, bs for each UID in ARGV[2..].
_SUMMARY_PAGE_LUA = """
local out = {}
for i = 2, #ARGV do
  local row = redis.call('HMGET', ARGV[1] .. ARGV[i], 'size', 'hdr', 'env', 'bdy', 'bs')
  for j = 1, 5 do out[#out + 1] = row[j] or '' end
end
return out
"""
LIST_PAGE = 5000
# A member no folder can have ('*' is refused in names): the special-use hash and the
# subscription set exist once set up, even when every entry is gone.
PROVISIONED = "*"
# In a flag change's reply: the message is gone; it was left as it was (too many flags, or
# changed since UNCHANGEDSINCE).
_GONE = "\0"
FLAG_LIMIT = "\0limit"
FLAG_MODIFIED = "\0modified"
# Expunged UIDs kept per folder for QRESYNC's VANISHED; older ones are reported as a range.
VANISHED_KEPT = 100_000


@dataclass(frozen=True)
class FlagState:
    flags: frozenset[str]
    modseq: int


# Flags of several messages changed in one atomic step each: ARGV[1] set|add|remove,
# ARGV[2] the most flags a message may carry (0: no limit), ARGV[3] UNCHANGEDSINCE (RFC 7162
# 3.1.3; empty: none), ARGV[4] the journal entry's name, ARGV[5] and ARGV[6] the folder's name
# and UIDVALIDITY, ARGV[7..] the flags; KEYS[1] the account's change counter (MODSEQ), KEYS[2]
# the folder's meta, KEYS[3] its messages by MODSEQ, KEYS[4] the account's journal, KEYS[5..] the
# messages. Reply: the MODSEQ this change took (negative when a message changed and the change
# was journaled), then for each message its flags and its MODSEQ afterwards ('\0' for a message
# that is gone; the flags end in ' \0limit' or ' \0modified' where the message was left as it
# was).
_CHANGE_FLAGS_LUA = _UNSEEN_LUA + """
local modseq = redis.call('INCR', KEYS[1])
local out = {modseq}
local since = tonumber(ARGV[3])  -- nil: no UNCHANGEDSINCE
local changed = {}
for i = 5, #KEYS do
  local key = KEYS[i]
  local row = redis.call('HMGET', key, 'flags', 'modseq')
  local current, mine = row[1], tonumber(row[2] or '0')
  if not current then
    out[#out + 1] = '\0'; out[#out + 1] = 0
  elseif since ~= nil and mine > since then
    out[#out + 1] = current .. ' \0modified'; out[#out + 1] = mine
  else
    local set, count = {}, 0
    if ARGV[1] ~= 'set' then
      for flag in string.gmatch(current, '%S+') do set[flag] = true; count = count + 1 end
    end
    for j = 7, #ARGV do
      local flag = ARGV[j]
      if ARGV[1] == 'remove' then
        if set[flag] then set[flag] = nil; count = count - 1 end
      elseif not set[flag] then
        set[flag] = true; count = count + 1
      end
    end
    local limit = tonumber(ARGV[2])
    if limit > 0 and count > limit then
      out[#out + 1] = current .. ' \0limit'; out[#out + 1] = mine
    else
      local list = {}
      for flag in pairs(set) do list[#list + 1] = flag end
      table.sort(list)
      local joined = table.concat(list, ' ')
      if joined ~= current then
        local uid = string.match(key, '(%d+)$')
        count_unseen(KEYS[2], (unseen(joined) and 1 or 0) - (unseen(current) and 1 or 0))
        redis.call('HSET', key, 'flags', joined, 'modseq', modseq)
        redis.call('ZADD', KEYS[3], modseq, uid)
        mine = modseq
        changed[#changed + 1] = tonumber(uid)
      end
      out[#out + 1] = joined; out[#out + 1] = mine
    end
  end
end
if #changed > 0 then
  redis.call('HSET', KEYS[2], 'highestmodseq', modseq)
  local flags = {}
  for j = 7, #ARGV do flags[#flags + 1] = ARGV[j] end
  redis.call('HSET', KEYS[4], ARGV[4], cjson.encode({k = 'flags', f = ARGV[5], v = tonumber(ARGV[6]), m = modseq,
                                                   mode = ARGV[1], fl = flags, u = changed}))
  out[1] = -modseq  -- journaled: the caller clears the entry once the change log has it
end
return out
"""

# EXPUNGE: the messages leave the folder; their UIDs are kept with the MODSEQ of their removal
# for QRESYNC's VANISHED (RFC 7162 3.2.5), the oldest forgotten past ARGV[2] of them (the
# folder's 'vanishedfloor' says from which MODSEQ on the list is complete). KEYS: the account's
# counter, meta, UIDs, vanished; ARGV[1] the message prefix, ARGV[3..] the UIDs.
_REMOVE_LUA = _UNREF_LUA + _UNSEEN_LUA + """
local gone = {}
local modseq = redis.call('INCR', KEYS[1])
for i = 4, #ARGV do
  if redis.call('ZREM', KEYS[3], ARGV[i]) == 1 then
    if unseen(redis.call('HGET', ARGV[1] .. ARGV[i], 'flags')) then count_unseen(KEYS[2], -1) end
    redis.call('HINCRBY', KEYS[6], 'bytes', -tonumber(redis.call('HGET', ARGV[1] .. ARGV[i], 'size') or '0'))
    redis.call('HINCRBY', KEYS[6], 'messages', -1)
    unref(ARGV[1] .. ARGV[i], gone)
  end
  redis.call('ZREM', KEYS[5], ARGV[i])
  redis.call('DEL', ARGV[1] .. ARGV[i])
  redis.call('ZADD', KEYS[4], modseq, ARGV[i])
end
redis.call('HSET', KEYS[2], 'highestmodseq', modseq)
local extra = redis.call('ZCARD', KEYS[4]) - tonumber(ARGV[2])
if extra > 0 then
  local oldest = redis.call('ZRANGE', KEYS[4], extra - 1, extra - 1, 'WITHSCORES')
  redis.call('ZREMRANGEBYRANK', KEYS[4], 0, extra - 1)
  redis.call('HSET', KEYS[2], 'vanishedfloor', oldest[2])
end
table.insert(gone, 1, modseq)
return gone
"""


# Folders whose STATUS one round trip reads (:meth:`MailboxIndex.counts`).
STATUS_PAGE = 200


class MailboxIndex:
    """The Redis view of mailboxes: what IMAP and POP3 list, flag and expunge."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._append = redis.register_script(_APPEND_LUA)
        self._new_folder = redis.register_script(_NEW_FOLDER_LUA)
        self._store_summary = redis.register_script(_STORE_SUMMARY_LUA)
        self._list_page = redis.register_script(_LIST_PAGE_LUA)
        self._change_flags = redis.register_script(_CHANGE_FLAGS_LUA)
        self._summary_page = redis.register_script(_SUMMARY_PAGE_LUA)
        self._rename_folder = redis.register_script(_RENAME_FOLDER_LUA)
        self._next_uidvalidity = redis.register_script(_NEXT_UIDVALIDITY_LUA)
        self._reserve = redis.register_script(_RESERVE_LUA)
        self._copy = redis.register_script(_COPY_LUA)
        self._remove = redis.register_script(_REMOVE_LUA)
        self._changed_since = redis.register_script(_CHANGED_SINCE_LUA)
        self._claim_recent = redis.register_script(_CLAIM_RECENT_LUA)
        self._delete_folder = redis.register_script(_DELETE_FOLDER_LUA)
        self._by_uid = redis.register_script(_BY_UID_LUA)
        self._unseen_count = redis.register_script(_UNSEEN_COUNT_LUA)
        self._status = redis.register_script(_STATUS_LUA)
        self._first_unseen = redis.register_script(_FIRST_UNSEEN_LUA)

    async def file(
        self, record: events_pb2.DeliveryRecord, mailboxes: Iterable[str], summary: MessageSummary | None = None, *,
        seq: int = 0
    ) -> dict[str, Filed | Reservation]:
        """Index a delivery record in some of its mailboxes; returns mailbox -> where it is (UID,
        UIDVALIDITY). Safe to call twice: the second call answers the first's place. A UID is
        only handed out below what the change log has reserved for the folder; past it, the
        answer is a :class:`Reservation` to record (:meth:`reserve`), then call again.

        With the message's summary (the delivery path has the bytes at hand), FETCH of
        headers, ENVELOPE and BODYSTRUCTURE reads no blob; without it (a message stored as a blob,
        rebuild) the summary is computed at the first FETCH and kept (:meth:`store_summary`).
        """
        return (await self.file_many([(record, list(mailboxes), summary, seq)]))[0]

    async def file_many(
        self, items: Sequence[tuple[events_pb2.DeliveryRecord, list[str], MessageSummary | None, int]]
    ) -> list[dict[str, Filed | Reservation]]:
        """:meth:`file` for several records (record, mailboxes, summary, stream sequence), every
        mailbox of every record in one Redis round trip (each record filed in all its mailboxes by
        one atomic script call)."""
        calls: list[tuple[AsyncScript, list[Any], list[Any]]] = []
        where: list[tuple[int, list[str], str]] = []
        for n, (record, mailboxes, summary, seq) in enumerate(items):
            if not record.blob and not seq:
                # The body is inside the record: without its sequence nobody could read it.
                raise ValueError(f"record {record.transaction_id} has its body inline: its stream sequence is needed")
            if not mailboxes:
                continue
            folder = record.folder or INBOX
            size = summary.size if summary is not None else record.size
            where.append((n, mailboxes, folder))
            calls.append((self._append, [
                keys.UIDVALIDITY_SEQ,
                keys.message_refs(record.transaction_id),
                *(key for mailbox in mailboxes for key in (
                    keys.mailbox_meta(mailbox, folder),
                    keys.mailbox_uids(mailbox, folder),
                    keys.mailbox_txn(mailbox, folder),
                    keys.mailbox_folders(mailbox),
                    keys.mailbox_modseq(mailbox),
                    keys.mailbox_changes(mailbox, folder),
                    keys.mailbox_usage(mailbox),
                )),
            ], [
                record.transaction_id,
                record.blob,
                size,
                record.received_unix_ms,
                _new_uidvalidity(),
                " ".join(record.flags),
                folder,
                *_summary_values(summary),
                seq,
                len(record.local_mailboxes),
                *(keys.mailbox_message_prefix(mailbox, folder) for mailbox in mailboxes),
            ]))
        out: list[dict[str, Filed | Reservation]] = [{} for _ in items]
        if not calls:
            return out
        for (n, mailboxes, folder), reply in zip(where, await run_scripts(self._redis, calls), strict=True):
            for i, mailbox in enumerate(mailboxes):
                uid, uidvalidity, uidnext, modseq = reply[4 * i: 4 * i + 4]
                if uid:
                    out[n][mailbox] = Filed(folder, int(uidvalidity), int(uid), int(modseq))
                else:
                    out[n][mailbox] = Reservation(folder, int(uidvalidity), int(uidnext))
        return out

    async def copy(self, mailbox: str, source: str, target: str, uids: list[int]
                   ) -> tuple[list[Copied], int, str] | Reservation | None:
        """COPY without copying: new entries in ``target`` for the same messages (body, summary,
        flags as they are now in the index, not as a session last saw them). Returns the copies
        (in the order of ``uids``; ``uid`` 0 where the source is gone), the change counter taken
        and the name of the journal entry that holds them until the change log does (see
        :meth:`journal`); a :class:`Reservation` when more UIDs must be reserved first; None
        when the target folder does not exist."""
        entry = os.urandom(6).hex()
        reply = await self._copy(
            keys=[keys.mailbox_meta(mailbox, target), keys.mailbox_uids(mailbox, target),
                  keys.mailbox_txn(mailbox, target), keys.mailbox_modseq(mailbox),
                  keys.mailbox_changes(mailbox, target), keys.mailbox_usage(mailbox), keys.mailbox_journal(mailbox)],
            args=[keys.mailbox_message_prefix(mailbox, source), keys.mailbox_message_prefix(mailbox, target),
                  entry, keys.MESSAGE_REFS_PREFIX, target, *uids])
        if not reply:
            return None
        if int(reply[0]) == 0:
            return Reservation(target, int(reply[1]), int(reply[2]) + len(uids))
        uidvalidity, modseq = int(reply[0]), int(reply[1])
        copies = [Copied(source_uid, Filed(target, uidvalidity, int(reply[2 + 3 * i]), modseq), str(reply[3 + 3 * i]),
                         frozenset(f for f in str(reply[4 + 3 * i]).split(" ") if f))
                  for i, source_uid in enumerate(uids)]
        return copies, modseq, entry

    async def journal(self, mailbox: str) -> dict[str, dict[str, Any]]:
        """Changes Redis made that the change log may not have yet (a COPY's new UIDs, a
        STORE's flags): name -> the change, as the scripts wrote it. An entry stays from the
        moment Redis decides until :meth:`forget_journal`, after the log write: a replica killed
        in between leaves it for :meth:`Mailboxes.recover`."""
        raw = await self._redis.hgetall(keys.mailbox_journal(mailbox))
        return {str(name): json.loads(value) for name, value in raw.items()}

    async def forget_journal(self, mailbox: str, names: Iterable[str]) -> None:
        names = list(names)
        if names:
            await self._redis.hdel(keys.mailbox_journal(mailbox), *names)

    async def journaled_accounts(self) -> list[str]:
        """Every account with a journal entry (a rebuild logs them before it flushes)."""
        found = []
        async for key in self._redis.scan_iter(match=keys.MAILBOX_JOURNAL_PATTERN, count=1000):
            found.append(keys.account_of_mailbox_key(str(key)))
        return found

    async def reserve(self, mailbox: str, folder: str, uidvalidity: int, up_to: int) -> None:
        """UIDs below ``up_to`` may be handed out in this folder: the change log says so."""
        await self._reserve(keys=[keys.mailbox_meta(mailbox, folder)], args=[uidvalidity, up_to])

    async def create_folder(self, mailbox: str, folder: str) -> int:
        """A new folder's UIDVALIDITY; 0 when it exists already."""
        return int(await self._new_folder(
            keys=[keys.mailbox_meta(mailbox, folder), keys.UIDVALIDITY_SEQ, keys.mailbox_folders(mailbox)],
            args=[_new_uidvalidity(), folder],
        ))

    async def rename_folder(self, mailbox: str, old: str, new: str) -> int:
        """Move a folder, its messages and UIDs to a new name (UIDVALIDITY kept, RFC 3501 6.3.5
        allows it); returns the UIDVALIDITY, 0 when ``old`` is missing or ``new`` exists."""
        await self._redis.delete(keys.mailbox_uid_cache(mailbox, old))  # a cache is per name: dropped
        return int(await self._rename_folder(
            keys=[keys.mailbox_meta(mailbox, old), keys.mailbox_meta(mailbox, new),
                  keys.mailbox_uids(mailbox, old), keys.mailbox_uids(mailbox, new),
                  keys.mailbox_txn(mailbox, old), keys.mailbox_txn(mailbox, new), keys.mailbox_folders(mailbox),
                  keys.mailbox_vanished(mailbox, old), keys.mailbox_vanished(mailbox, new),
                  keys.mailbox_changes(mailbox, old), keys.mailbox_changes(mailbox, new)],
            args=[keys.mailbox_message_prefix(mailbox, old), keys.mailbox_message_prefix(mailbox, new), old, new],
        ))

    async def delete_folder(self, mailbox: str, folder: str) -> tuple[int, list[Reclaimable]]:
        """Forget a folder and its messages; returns the UIDVALIDITY it had (0: none) and the
        deliveries nothing refers to any more."""
        await self._redis.delete(keys.mailbox_uid_cache(mailbox, folder))
        reply = await self._delete_folder(
            keys=[keys.mailbox_meta(mailbox, folder), keys.mailbox_uids(mailbox, folder),
                  keys.mailbox_txn(mailbox, folder), keys.mailbox_folders(mailbox),
                  keys.mailbox_vanished(mailbox, folder), keys.mailbox_changes(mailbox, folder),
                  keys.mailbox_usage(mailbox)],
            args=[keys.mailbox_message_prefix(mailbox, folder), folder, keys.MESSAGE_REFS_PREFIX],
        )
        return int(reply[0]), _reclaimable(reply[1:])

    async def special_uses(self, mailbox: str) -> dict[str, str]:
        """Folder -> RFC 6154 attribute."""
        raw = await self._redis.hgetall(keys.mailbox_special_use(mailbox))
        return {str(k): str(v) for k, v in raw.items() if k != PROVISIONED}

    async def provisioned(self, mailbox: str) -> bool:
        return bool(await self._redis.exists(keys.mailbox_special_use(mailbox)))

    async def set_special_uses(self, mailbox: str, uses: dict[str, str | None]) -> None:
        """Set (or, with None, drop) folders' special use; marks the account provisioned."""
        key = keys.mailbox_special_use(mailbox)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, PROVISIONED, "1")
            for folder, use in uses.items():
                if use is None:
                    pipe.hdel(key, folder)
                else:
                    pipe.hset(key, folder, use)
            await pipe.execute()

    async def subscriptions(self, mailbox: str) -> set[str] | None:
        """Subscribed folder names; None when the account never changed one (all count)."""
        key = keys.mailbox_subscriptions(mailbox)
        names = {str(n) for n in await self._redis.smembers(key)}
        if not names:
            return None
        return names - {PROVISIONED}

    async def set_subscribed(self, mailbox: str, names: Iterable[str], subscribed: bool) -> None:
        key = keys.mailbox_subscriptions(mailbox)
        wanted = list(names)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.sadd(key, PROVISIONED)  # the set exists from now on, even with nothing subscribed
            if wanted:
                (pipe.sadd if subscribed else pipe.srem)(key, *wanted)
            await pipe.execute()

    async def folders(self, mailbox: str) -> list[str]:
        names = {str(m) for m in await self._redis.smembers(keys.mailbox_folders(mailbox))}
        names.add(INBOX)
        return sorted(names, key=lambda n: (n != INBOX, n))

    async def status(self, mailbox: str, folder: str = INBOX) -> FolderStatus:
        meta = keys.mailbox_meta(mailbox, folder)
        for _ in range(2):
            async with self._redis.pipeline(transaction=True) as pipe:  # one round trip, one moment
                pipe.hmget(meta, ["uidvalidity", "uidnext", "highestmodseq"])
                pipe.zcard(keys.mailbox_uids(mailbox, folder))
                raw, exists = await pipe.execute()
            if raw[0] is not None:
                break
            await self.create_folder(mailbox, folder)
        return FolderStatus(int(raw[0] or 1), int(raw[1] or 1), int(exists), int(raw[2] or 0))

    async def counts(self, mailbox: str, folders: Sequence[str]) -> dict[str, FolderCounts]:
        """STATUS of several folders (LIST RETURN (STATUS), RFC 5819) in a round trip per
        :data:`STATUS_PAGE` folders, one atomic script call each, instead of several round trips
        a folder. A folder without meta yet (an INBOX never opened) is made as :meth:`status`
        makes it."""
        def call(folder: str) -> tuple[AsyncScript, list[Any], list[Any]]:
            return (self._status, [keys.mailbox_meta(mailbox, folder), keys.mailbox_uids(mailbox, folder)],
                    [keys.mailbox_message_prefix(mailbox, folder)])

        out: dict[str, FolderCounts] = {}
        for start in range(0, len(folders), STATUS_PAGE):
            page = folders[start:start + STATUS_PAGE]
            for folder, reply in zip(page, await run_scripts(self._redis, [call(f) for f in page]), strict=True):
                if not reply:
                    made = await self.status(mailbox, folder)  # makes its meta
                    reply = (await run_scripts(self._redis, [call(folder)]))[0] or [
                        made.uidvalidity, made.uidnext, made.highestmodseq, made.exists, 0, 0]
                uidvalidity, uidnext, highestmodseq, exists, recent, unseen = (int(v) for v in reply)
                out[folder] = FolderCounts(FolderStatus(uidvalidity, uidnext, exists, highestmodseq), recent, unseen)
        return out

    async def vanished(self, mailbox: str, folder: str, since: int) -> tuple[list[int], bool]:
        """UIDs expunged with a MODSEQ above ``since`` (RFC 7162 3.2.5), and whether the list is
        complete (False when older removals were forgotten: the caller then reports every UID
        it cannot find, as the RFC allows)."""
        floor = await self._redis.hget(keys.mailbox_meta(mailbox, folder), "vanishedfloor")
        uids = await self._redis.zrangebyscore(keys.mailbox_vanished(mailbox, folder), f"({since}", "+inf")
        return sorted(int(str(u)) for u in uids), since >= int(floor or 0)

    async def messages(self, mailbox: str, folder: str = INBOX) -> list[IndexedMessage]:
        # The light fields only, a page of UIDs per script call: one reply per page instead of
        # one command per message (the summaries stay in Redis until a FETCH asks for them).
        out: list[IndexedMessage] = []
        start = 0
        while True:
            page = await self._list_page(
                keys=[keys.mailbox_uids(mailbox, folder)],
                args=[keys.mailbox_message_prefix(mailbox, folder), start, start + LIST_PAGE - 1],
            )
            out.extend(_rows(page))
            if len(page) < 8 * LIST_PAGE:
                return out
            start += LIST_PAGE

    async def uids(self, mailbox: str, folder: str = INBOX) -> array.array[int]:
        """Every UID of a folder, ascending (one ZRANGE; no message's fields)."""
        raw = await self._redis.zrange(keys.mailbox_uids(mailbox, folder), 0, -1)  # by score: the UID
        return array.array("I", (int(str(u)) for u in raw))

    async def messages_by_uid(self, mailbox: str, folder: str, uids: Sequence[int]) -> dict[int, IndexedMessage]:
        """The light fields of some messages (those still there), a page per script call."""
        out: dict[int, IndexedMessage] = {}
        prefix = keys.mailbox_message_prefix(mailbox, folder)
        for start in range(0, len(uids), LIST_PAGE):
            page = await self._by_uid(args=[prefix, *uids[start : start + LIST_PAGE]])
            out.update((m.uid, m) for m in _rows(page))
        return out

    async def unseen_count(self, mailbox: str, folder: str = INBOX) -> int:
        """Messages without \\Seen (STATUS UNSEEN): one read of the folder's counter."""
        return int(await self._unseen_count(
            keys=[keys.mailbox_meta(mailbox, folder), keys.mailbox_uids(mailbox, folder)],
            args=[keys.mailbox_message_prefix(mailbox, folder)]))

    async def first_unseen(self, mailbox: str, folder: str, from_uid: int = 1) -> int:
        """The UID of the first message at or above ``from_uid`` without \\Seen; 0 when none.
        Costs the messages it passes over."""
        return int(await self._first_unseen(keys=[keys.mailbox_uids(mailbox, folder)],
                                            args=[keys.mailbox_message_prefix(mailbox, folder), from_uid]))

    async def uid_cache(self, mailbox: str, folder: str) -> UidCache | None:
        """A folder's UIDs as some session last saw them (see :class:`UidCache`), or None."""
        raw = await self._redis.get(keys.mailbox_uid_cache(mailbox, folder))
        if not raw:
            return None
        try:
            uidvalidity, modseq, first_unseen, packed = str(raw).split(" ", 3)
            uids = array.array("I")
            uids.frombytes(base64.b64decode(packed))
            return UidCache(int(uidvalidity), int(modseq), int(first_unseen), uids)
        except ValueError:
            return None  # written by another version: rebuilt from the folder

    async def save_uid_cache(self, mailbox: str, folder: str, cache: UidCache) -> None:
        value = f"{cache.uidvalidity} {cache.modseq} {cache.first_unseen} " + \
            base64.b64encode(cache.uids.tobytes()).decode()
        await self._redis.set(keys.mailbox_uid_cache(mailbox, folder), value)

    async def changed_since(self, mailbox: str, folder: str, modseq: int, most: int = 5000
                            ) -> list[IndexedMessage] | None:
        """The messages whose flags changed or that arrived after ``modseq`` (R-MBX-2: what a
        selected session needs to catch up costs what changed, not the folder's size); None when
        more than ``most`` did."""
        page = await self._changed_since(keys=[keys.mailbox_changes(mailbox, folder)],
                                         args=[keys.mailbox_message_prefix(mailbox, folder), modseq, most])
        if page == ["overflow"]:
            return None
        return _rows(page)

    async def summaries(self, mailbox: str, folder: str, uids: Iterable[int]) -> dict[int, MessageSummary | None]:
        """The kept summaries of some messages, in one round trip (None where not computed yet)."""
        wanted = list(uids)
        if not wanted:
            return {}
        flat = await self._summary_page(keys=[], args=[keys.mailbox_message_prefix(mailbox, folder), *wanted])
        return {
            uid: _summary_from(flat[5 * i], list(flat[5 * i + 1 : 5 * i + 5])) for i, uid in enumerate(wanted)
        }

    async def store_summary(self, mailbox: str, folder: str, uid: int, summary: MessageSummary) -> None:
        """Keep a summary computed at FETCH time (messages indexed without one); the size
        becomes the octets FETCH serves."""
        key = keys.mailbox_message(mailbox, folder, uid)
        # Only while the message exists: an EXPUNGE in between must not resurrect a hash.
        await self._store_summary(keys=[key], args=[summary.size, *_summary_values(summary)])

    async def change_flags(
        self, mailbox: str, folder: str, uidvalidity: int, uids: list[int], mode: str, flags: set[str],
        limit: int = 0, unchanged_since: int | None = None,
    ) -> tuple[dict[int, FlagState | None], int, str]:
        """STORE FLAGS / +FLAGS / -FLAGS (``mode`` set, add, remove), atomically per message in
        Redis (R-MBX-3): two clients adding different flags at once both keep theirs, where
        writing a set computed from a session's copy lost one. Returns each message's flags and
        MODSEQ afterwards (None where it no longer exists) and the MODSEQ this change took (the
        order Redis applied changes in, for the change log). A message left as it was carries
        :data:`FLAG_LIMIT` (it would pass ``limit`` flags) or :data:`FLAG_MODIFIED` (changed
        since ``unchanged_since``, RFC 7162 3.1.3) among its flags. The third value names the
        journal entry of the change ("" when no message changed; see :meth:`journal`)."""
        if not uids:
            return {}, 0, ""
        prefix = keys.mailbox_message_prefix(mailbox, folder)
        entry = os.urandom(6).hex()
        rows = await self._change_flags(
            keys=[keys.mailbox_modseq(mailbox), keys.mailbox_meta(mailbox, folder),
                  keys.mailbox_changes(mailbox, folder), keys.mailbox_journal(mailbox),
                  *(prefix + str(uid) for uid in uids)],
            args=[mode, limit, "" if unchanged_since is None else unchanged_since, entry, folder, uidvalidity,
                  *sorted(flags)],
        )
        out: dict[int, FlagState | None] = {}
        for i, uid in enumerate(uids):
            row, modseq = rows[1 + 2 * i], rows[2 + 2 * i]
            if row == _GONE:
                out[uid] = None
            else:
                out[uid] = FlagState(frozenset(f for f in str(row).split(" ") if f), int(modseq))
        taken = int(rows[0])
        return out, abs(taken), entry if taken < 0 else ""

    async def restore_folder(self, mailbox: str, folder: str, uidvalidity: int, uidnext: int, reserved: int,
                             messages: list[RestoredMessage], modseq: int = 1) -> None:
        """A rebuild writing back a folder as the change log describes it: its UIDVALIDITY, its
        UIDNEXT and each message at its UID with its flags (RFC 3501 2.3.1.1: same UIDVALIDITY,
        same UIDs). The UIDVALIDITY counter is the caller's to raise (:meth:`raise_uidvalidity`,
        once for every folder)."""
        prefix = keys.mailbox_message_prefix(mailbox, folder)
        meta, uids, txns = (keys.mailbox_meta(mailbox, folder), keys.mailbox_uids(mailbox, folder),
                            keys.mailbox_txn(mailbox, folder))
        changes = keys.mailbox_changes(mailbox, folder)
        async with self._redis.pipeline(transaction=False) as pipe:
            # Every message and the folder at one MODSEQ, the expunge history complete from it on:
            # a client resynchronising from before gets every flag and every missing UID (RFC
            # 7162 allows more than the changes).
            pipe.hset(meta, items=["uidvalidity", uidvalidity, "uidnext", uidnext, "reserved", reserved,
                                   "highestmodseq", modseq, "vanishedfloor", modseq, "recentfrom", uidnext,
                                   "unseen", sum(1 for m in messages if "\\Seen" not in m.flags)])
            pipe.sadd(keys.mailbox_folders(mailbox), folder)
            for n, message in enumerate(messages, 1):
                record = message.record
                pipe.zadd(uids, {str(message.uid): message.uid})
                pipe.zadd(changes, {str(message.uid): modseq})
                identity = message.identity or record.transaction_id
                pipe.hset(prefix + str(message.uid), items=[
                    "blob", record.blob, "size", record.size, "date", record.received_unix_ms,
                    "flags", " ".join(sorted(message.flags)), "txn", identity, "seq", message.seq,
                    "modseq", modseq])
                pipe.hset(txns, identity, message.uid)
                pipe.incr(keys.message_refs(record.transaction_id))
                if n % 1000 == 0:
                    await pipe.execute()
            pipe.hincrby(keys.mailbox_usage(mailbox), "bytes", sum(m.record.size for m in messages))
            pipe.hincrby(keys.mailbox_usage(mailbox), "messages", len(messages))
            await pipe.execute()

    async def uidvalidity_counter(self) -> int | None:
        """The last UIDVALIDITY given; None when Redis lost it."""
        value = await self._redis.get(keys.UIDVALIDITY_SEQ)
        return None if value is None else int(value)

    async def raise_uidvalidity(self, uidvalidity: int) -> None:
        """No folder made from now on gets a UIDVALIDITY at or below this one."""
        await self._raise_counter(keys.UIDVALIDITY_SEQ, uidvalidity)

    async def claim_recent(self, mailbox: str, folder: str, below: int) -> int:
        """Take the messages below UID ``below`` that no session has seen (RFC 3501 \\Recent);
        returns the first UID of those now this session's recent ones."""
        return int(await self._claim_recent(keys=[keys.mailbox_meta(mailbox, folder)], args=[below]))

    async def recent_from(self, mailbox: str, folder: str) -> int:
        """The first UID no session has seen yet (EXAMINE shows them as recent, taking nothing)."""
        return int(await self._redis.hget(keys.mailbox_meta(mailbox, folder), "recentfrom") or 1)

    async def usage(self, mailbox: str) -> tuple[int, int]:
        """What an account's mailbox holds: bytes and messages, every folder, copies counted."""
        raw = await self._redis.hmget(keys.mailbox_usage(mailbox), ["bytes", "messages"])
        return max(0, int(raw[0] or 0)), max(0, int(raw[1] or 0))

    async def counter(self, mailbox: str) -> int:
        """The account's change counter (the last MODSEQ given)."""
        return int(await self._redis.get(keys.mailbox_modseq(mailbox)) or 0)

    async def restore_counter(self, mailbox: str, modseq: int) -> None:
        """The account's change counter after a rebuild: never below what the log has seen."""
        await self._raise_counter(keys.mailbox_modseq(mailbox), modseq)

    async def _raise_counter(self, key: str, value: int) -> None:
        current = await self._redis.get(key)
        if current is None or int(current) < value:
            await self._redis.set(key, value)

    async def new_uidvalidity(self) -> int:
        """A UIDVALIDITY never given before (a rebuild renumbering a folder)."""
        return int(await self._next_uidvalidity(keys=[keys.UIDVALIDITY_SEQ], args=[_new_uidvalidity()]))

    async def remove(self, mailbox: str, folder: str, messages: list[IndexedMessage]
                     ) -> tuple[int, list[Reclaimable]]:
        """Expunge messages from the index; returns the MODSEQ of the removal and the
        deliveries nothing refers to any more."""
        if not messages:
            return 0, []
        modseq, gone = 0, []
        for start in range(0, len(messages), 5000):
            reply = await self._remove(
                keys=[keys.mailbox_modseq(mailbox), keys.mailbox_meta(mailbox, folder),
                      keys.mailbox_uids(mailbox, folder), keys.mailbox_vanished(mailbox, folder),
                      keys.mailbox_changes(mailbox, folder), keys.mailbox_usage(mailbox)],
                args=[keys.mailbox_message_prefix(mailbox, folder), VANISHED_KEPT, keys.MESSAGE_REFS_PREFIX,
                      *(m.uid for m in messages[start : start + 5000])])
            modseq = int(reply[0])
            gone += _reclaimable(reply[1:])
        return modseq, gone

    async def replicated(self, replicas: int, timeout_ms: int = 1000) -> bool:
        """Whether this connection's writes so far reached ``replicas`` Redis replicas (WAIT);
        always true when none are asked for."""
        if replicas <= 0:
            return True
        try:
            return int(await self._redis.wait(replicas, timeout_ms)) >= replicas
        except aioredis.RedisError as exc:
            log.warning("redis WAIT failed: %s", exc)
            return False

    async def flush(self) -> int:
        """Forget the whole index (before a rebuild)."""
        removed = 0
        async for key in self._redis.scan_iter(match=keys.MAILBOX_ALL_PATTERN, count=1000):
            removed += int(await self._redis.delete(key))
        return removed


def _reclaimable(flat: list[str]) -> list[Reclaimable]:
    return [Reclaimable(str(flat[i]), str(flat[i + 1]), int(flat[i + 2] or 0)) for i in range(0, len(flat), 3)]


def _rows(page: list[str]) -> list[IndexedMessage]:
    """The flat reply of _LIST_PAGE_LUA / _CHANGED_SINCE_LUA as messages."""
    out = []
    for i in range(0, len(page), 8):
        uid, blob, size, date, flags, txn, seq, modseq = page[i : i + 8]
        if not blob and not txn:
            continue  # expunged between the ZRANGE and the HMGET of another page
        out.append(IndexedMessage(
            uid=int(uid), blob=str(blob), size=int(size or 0), internal_date_ms=int(date or 0),
            flags=frozenset(f for f in str(flags or "").split(" ") if f), transaction_id=str(txn or ""),
            record_seq=int(seq or 0), modseq=int(modseq or 0)))
    return out


def _new_uidvalidity() -> int:
    # Seconds since the epoch: grows across rebuilds, as RFC 3501 2.3.1.1 requires of a new one.
    return int(time.time())
