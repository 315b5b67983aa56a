"""The outbound queue's state in Redis: what the relay writes as it delivers, and what the admin
API shows and changes (R-OUT-2, R-OUT-3; the queue view of issue 10).

The queue's system of record is the MAIL stream: the relay's durable consumer leaves a delivery
record unacknowledged until every remote recipient has a final result (relay/app.py). Redis
keeps what happened to each transaction, and only what the relay itself acts on:

- ``relay_recipients(id)``: recipient -> :class:`RecipientState` (JSON), written after every
  remote reply: the per-recipient results and the schedule (``next_ms``);
- ``relay_message(id)``: the envelope facts a view needs without reading the message (sender,
  recipients in order, size, arrival, the record's MAIL stream sequence), written by the relay
  when it first sees the record;
- ``RELAY_QUEUE``: id -> arrival (ms) of every transaction not yet final: the depth, the age of
  the oldest, and the order of the view;
- ``RELAY_RETRIES``: id -> when, the retries asked for. One relay replica takes each and
  processes the record at once, while JetStream still holds its copy until the ``nak`` delay;
- ``relay_removed(id)``: a removal. The relay looks for it before each record, each connection
  and each final dot, so a replica in the middle of a delivery sends nothing after it; it then
  acknowledges the record, and the recipients not yet delivered get no DSN.

A retry rewrites ``next_ms``, which is what the relay reads to decide what is due; a removal is
read by the relay at every step. There is no other copy of the schedule.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from rempart.common import keys
from rempart.common.pb.events.v1 import events_pb2

State = Literal["pending", "sending", "delivered", "failed", "bounced", "dropped"]
FINAL: frozenset[str] = frozenset({"delivered", "bounced", "dropped"})
# Results outlive the record's last redelivery: an ack lost on the way finds them still there.
RESULT_RETENTION_SECONDS = 30 * 24 * 3600
# A retry asked for wakes the relays at once (core NATS; the relays also look every few seconds).
RETRY_SUBJECT = "rempart.relay.retry"

# What a person is shown for a recipient: never tried yet, on its way (the final dot sent, no
# reply yet), tried and refused for now, delivered, or refused for good (with or without a DSN).
ViewState = Literal["pending", "sending", "deferred", "delivered", "bounced"]


@dataclass
class RecipientState:
    """One remote recipient of a queued transaction:

    - ``pending``: not yet delivered; ``attempts`` and ``next_ms`` give the backoff;
    - ``sending``: accepted at RCPT and the final dot is on its way; found like this after a
      restart it means the remote may or may not have the message (counted, logged, resent);
    - ``delivered``: the remote answered 250 to the dot;
    - ``failed``: a permanent failure, its DSN not yet stored; ``bounced``: DSN stored (or none due);
    - ``dropped``: failed, and no DSN is allowed (``<>`` sender, ``NOTIFY=NEVER``).
    """

    state: State = "pending"
    attempts: int = 0
    next_ms: int = 0
    reply: str = ""
    remote_reply: bool = False
    mta: str = ""
    last_ms: int = 0
    delay_noticed: bool = False

    @property
    def final(self) -> bool:
        return self.state in FINAL

    @property
    def view_state(self) -> ViewState:
        if self.state == "delivered":
            return "delivered"
        if self.state in ("failed", "bounced", "dropped"):
            return "bounced"
        if self.state == "sending":
            return "sending"
        return "deferred" if self.attempts > 0 else "pending"

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> RecipientState:
        data = json.loads(raw)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


@dataclass(frozen=True)
class QueuedMessage:
    """A transaction in the queue, as the relay's own state describes it."""

    transaction_id: str
    sender: str  # the envelope sender; "" for <> (a DSN)
    recipients: dict[str, RecipientState]  # every remote recipient, in the record's order
    size: int
    received_ms: int  # when the edge accepted it (the queue's order)
    seq: int  # the delivery record's sequence on the MAIL stream; 0 if not known yet

    @property
    def waiting(self) -> list[str]:
        """The recipients without a final result."""
        return [r for r, s in self.recipients.items() if not s.final]

    @property
    def attempts(self) -> int:
        return max((s.attempts for s in self.recipients.values()), default=0)

    @property
    def destinations(self) -> list[str]:
        """The domains still to be delivered to."""
        return sorted({domain_of(r) for r in self.waiting})

    def next_attempt_ms(self, state: RecipientState) -> int | None:
        """When the relay tries this recipient next (a recipient never tried is due from arrival)."""
        if state.state != "pending":
            return None
        return max(state.next_ms, self.received_ms)

    @property
    def next_attempt(self) -> int | None:
        due = [t for s in self.recipients.values() if (t := self.next_attempt_ms(s)) is not None]
        return min(due) if due else None


# A removal, only of a transaction still queued: out of the queue and of the retries asked for,
# and the mark the relay looks for, at once.
_REMOVE_LUA = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], ARGV[2], 'EX', tonumber(ARGV[3]))
return 1
"""


def _decoded(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in raw.items()}


def _message(transaction_id: str, arrival_ms: int, facts: dict[str, str],
             results: dict[str, str]) -> QueuedMessage:
    states = {r: RecipientState.from_json(v) for r, v in results.items()}
    try:
        order = [str(r) for r in json.loads(facts.get("recipients", "[]"))]
    except ValueError:
        order = []
    # The record's order first; a recipient known only from its result (a transaction queued
    # before its facts were kept) after it.
    recipients = {r: states.get(r, RecipientState()) for r in order}
    recipients.update({r: s for r, s in states.items() if r not in recipients})
    return QueuedMessage(
        transaction_id=transaction_id,
        sender=facts.get("sender", ""),
        recipients=recipients,
        size=int(facts.get("size", 0) or 0),
        received_ms=arrival_ms,
        seq=int(facts.get("seq", 0) or 0),
    )


class OutboundQueue:
    """The queue's Redis state: the relay's reads and writes, and the administrator's view,
    retry and removal."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._remove = redis.register_script(_REMOVE_LUA)

    # The relay ---------------------------------------------------------------------------------
    async def load(self, transaction_id: str) -> dict[str, RecipientState]:
        raw = await self._redis.hgetall(keys.relay_recipients(transaction_id))
        return {k: RecipientState.from_json(v) for k, v in _decoded(raw).items()}

    async def save(self, transaction_id: str, states: dict[str, RecipientState]) -> None:
        """Write these recipients' states (after every remote reply)."""
        if not states:
            return
        key = keys.relay_recipients(transaction_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={r: s.to_json() for r, s in states.items()})
            pipe.expire(key, RESULT_RETENTION_SECONDS)
            await pipe.execute()

    async def enter(self, record: events_pb2.DeliveryRecord, seq: int, states: dict[str, RecipientState]) -> None:
        """First sight of a record: its facts, its new recipients' states and its place in the
        queue, in one round trip."""
        txn = record.transaction_id
        facts: dict[Any, Any] = {
            "sender": record.mail_from,
            "recipients": json.dumps(list(dict.fromkeys(record.remote_recipients))),
            "size": record.size,
            "received_ms": record.received_unix_ms,
            "seq": seq,
        }
        async with self._redis.pipeline(transaction=True) as pipe:
            if states:
                pipe.hset(keys.relay_recipients(txn), mapping={r: s.to_json() for r, s in states.items()})
                pipe.expire(keys.relay_recipients(txn), RESULT_RETENTION_SECONDS)
            if not seq:
                facts.pop("seq")  # a sequence found before stays
            pipe.hset(keys.relay_message(txn), mapping=facts)
            pipe.expire(keys.relay_message(txn), RESULT_RETENTION_SECONDS)
            pipe.zadd(keys.RELAY_QUEUE, {txn: record.received_unix_ms or 1}, nx=True)
            await pipe.execute()

    async def has_facts(self, transaction_id: str) -> bool:
        return bool(await self._redis.exists(keys.relay_message(transaction_id)))

    async def done(self, transaction_id: str) -> None:
        """Every recipient is final (or the message was removed): out of the queue."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrem(keys.RELAY_QUEUE, transaction_id)
            pipe.zrem(keys.RELAY_RETRIES, transaction_id)
            await pipe.execute()

    async def removed(self, transaction_id: str) -> bool:
        return bool(await self._redis.exists(keys.relay_removed(transaction_id)))

    async def depth_and_oldest_ms(self) -> tuple[int, int]:
        depth = int(await self._redis.zcard(keys.RELAY_QUEUE))
        first = await self._redis.zrange(keys.RELAY_QUEUE, 0, 0, withscores=True)
        return depth, int(first[0][1]) if first else 0

    # The administrator -------------------------------------------------------------------------
    async def get(self, transaction_id: str) -> QueuedMessage | None:
        """The transaction if it is in the queue (not yet final, not removed)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zscore(keys.RELAY_QUEUE, transaction_id)
            pipe.hgetall(keys.relay_message(transaction_id))
            pipe.hgetall(keys.relay_recipients(transaction_id))
            arrival, facts, results = await pipe.execute()
        if arrival is None:
            return None
        return _message(transaction_id, int(arrival), _decoded(facts), _decoded(results))

    async def _many(self, members: list[tuple[str, int]]) -> list[QueuedMessage]:
        if not members:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for txn, _ in members:
                pipe.hgetall(keys.relay_message(txn))
                pipe.hgetall(keys.relay_recipients(txn))
            rows = await pipe.execute()
        return [_message(txn, arrival, _decoded(rows[2 * i]), _decoded(rows[2 * i + 1]))
                for i, (txn, arrival) in enumerate(members)]

    async def scan(self, after: tuple[int, str] | None = None, received_before_ms: int | None = None,
                   batch: int = 100) -> AsyncIterator[QueuedMessage]:
        """The queued transactions in arrival order (ties by id), after ``after`` (arrival, id)
        and, with ``received_before_ms``, only those that arrived before. Transactions that
        leave the queue meanwhile never make the walk skip one that stays."""
        high: float | str = received_before_ms - 1 if received_before_ms is not None else "+inf"
        skip = 0
        while True:
            low: float | str = after[0] if after is not None else "-inf"
            rows: list[Any] = await self._redis.zrangebyscore(  # type: ignore[assignment]
                keys.RELAY_QUEUE, low, high, start=skip, num=batch, withscores=True)
            if not rows:
                return
            members = [(str(m), int(s)) for m, s in rows]
            fresh = [(txn, arrival) for txn, arrival in members if after is None or (arrival, txn) > after]
            if not fresh:
                skip += len(rows)  # a run of equal arrival times already walked
                continue
            skip = 0
            for message in await self._many(fresh):
                yield message
            after = (fresh[-1][1], fresh[-1][0])

    async def retry(self, transaction_id: str, now_ms: int | None = None) -> list[str] | None:
        """Make every recipient waiting for a retry due now, and ask the relays to take the
        transaction at once. The recipients made due (none when all are on their way right
        now); None when the transaction is not in the queue."""
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        key = keys.relay_recipients(transaction_id)
        while True:
            async with self._redis.pipeline(transaction=True) as pipe:
                try:
                    # The relay writes a recipient's state after every reply: a write between
                    # this read and the retry's is not overwritten, the retry is redone.
                    await pipe.watch(key)
                    if await pipe.zscore(keys.RELAY_QUEUE, transaction_id) is None:
                        return None
                    states = {k: RecipientState.from_json(v) for k, v in _decoded(await pipe.hgetall(key)).items()}
                    due = [r for r, s in states.items() if s.state == "pending"]
                    pipe.multi()  # type: ignore[no-untyped-call]
                    for rcpt in due:
                        states[rcpt].next_ms = now_ms
                        pipe.hset(key, rcpt, states[rcpt].to_json())
                    if due:
                        pipe.zadd(keys.RELAY_RETRIES, {transaction_id: now_ms})
                    await pipe.execute()
                    return due
                except WatchError:
                    continue

    async def remove(self, transaction_id: str, by: str, now_ms: int | None = None) -> bool:
        """Take the transaction out of the queue for good: the relay stops before the next
        connection or final dot, acknowledges the record, and bounces nothing. False when it
        was not in the queue."""
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        removed = await self._remove(
            keys=[keys.RELAY_QUEUE, keys.RELAY_RETRIES, keys.relay_removed(transaction_id)],
            args=[transaction_id, json.dumps({"by": by, "at_ms": now_ms}), RESULT_RETENTION_SECONDS])
        return bool(removed)
