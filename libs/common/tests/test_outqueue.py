"""The outbound queue's shared state (real Redis): what the relay enters, and the administrator's
walk, retry and removal of it."""

from __future__ import annotations

import asyncio
import json

import redis.asyncio as aioredis

from rempart.common import keys
from rempart.common.outqueue import OutboundQueue, RecipientState
from rempart.common.pb.events.v1 import events_pb2

ARRIVAL = 1_796_500_000_000  # 2026-12-05, ms


def record(txn: str, sender: str = "alice@example.org", rcpts: tuple[str, ...] = ("bob@remote.test",),
           arrival: int = ARRIVAL) -> events_pb2.DeliveryRecord:
    return events_pb2.DeliveryRecord(transaction_id=txn, mail_from=sender, remote_recipients=list(rcpts),
                                     received_unix_ms=arrival, size=1234)


async def enter(queue: OutboundQueue, txn: str, arrival: int = ARRIVAL, seq: int = 7,
                rcpts: tuple[str, ...] = ("bob@remote.test",)) -> None:
    await queue.enter(record(txn, rcpts=rcpts, arrival=arrival), seq, {r: RecipientState() for r in rcpts})


async def test_r_out_2_entered_transaction_is_seen_with_its_facts_and_recipient_states(redis: aioredis.Redis) -> None:
    queue = OutboundQueue(redis)
    rcpts = ("carol@b.test", "bob@a.test", "dan@b.test")
    await enter(queue, "t1", rcpts=rcpts)
    states = await queue.load("t1")
    states["bob@a.test"] = RecipientState("pending", attempts=2, next_ms=ARRIVAL + 60_000,
                                          reply="451 4.7.1 greylisted, come back later", remote_reply=True,
                                          mta="mx.a.test", last_ms=ARRIVAL + 1_000)
    states["carol@b.test"] = RecipientState("delivered", reply="250 2.0.0 Ok", remote_reply=True, last_ms=ARRIVAL)
    states["dan@b.test"] = RecipientState("sending")
    await queue.save("t1", states)
    message = await queue.get("t1")
    assert message is not None
    assert (message.sender, message.size, message.received_ms, message.seq) == ("alice@example.org", 1234, ARRIVAL, 7)
    assert list(message.recipients) == list(rcpts)  # the record's order
    assert [s.view_state for s in message.recipients.values()] == ["delivered", "deferred", "sending"]
    assert message.waiting == ["bob@a.test", "dan@b.test"]
    assert message.destinations == ["a.test", "b.test"]
    assert message.attempts == 2 and message.next_attempt == ARRIVAL + 60_000
    assert RecipientState().view_state == "pending" and RecipientState("dropped").view_state == "bounced"
    # A second sight (a redelivered record) keeps the place in the queue and the sequence.
    await queue.enter(record("t1", rcpts=rcpts, arrival=ARRIVAL + 5), 0, {})
    again = await queue.get("t1")
    assert again is not None and (again.received_ms, again.seq) == (ARRIVAL, 7)
    await queue.done("t1")
    assert await queue.get("t1") is None and await queue.depth_and_oldest_ms() == (0, 0)


async def test_r_out_2_walk_in_arrival_order_resumes_after_a_cursor_across_equal_times(redis: aioredis.Redis) -> None:
    queue = OutboundQueue(redis)
    # Seven transactions at the same millisecond, three later: the walk must neither skip nor repeat.
    names = [f"same{i}" for i in range(7)] + ["later0", "later1", "later2"]
    for i, txn in enumerate(names):
        await enter(queue, txn, arrival=ARRIVAL + (0 if txn.startswith("same") else i))
    walked = [m.transaction_id async for m in queue.scan(batch=3)]
    assert walked == sorted(names[:7]) + names[7:]
    await queue.done("same5")  # leaves meanwhile: the walk goes on from where it was
    rest = [m.transaction_id async for m in queue.scan((ARRIVAL, "same3"), batch=2)]
    assert rest == ["same4", "same6", "later0", "later1", "later2"]
    older = [m.transaction_id async for m in queue.scan(received_before_ms=ARRIVAL + 8)]
    assert older == ["same0", "same1", "same2", "same3", "same4", "same6", "later0"]


async def test_r_out_2_retry_makes_the_waiting_recipients_due_now_and_asks_the_relays(redis: aioredis.Redis) -> None:
    queue = OutboundQueue(redis)
    await enter(queue, "t1", rcpts=("a@x.test", "b@x.test", "c@x.test"))
    await queue.save("t1", {"a@x.test": RecipientState("pending", attempts=3, next_ms=ARRIVAL + 3_600_000),
                            "b@x.test": RecipientState("delivered"),
                            "c@x.test": RecipientState("sending")})
    due = await queue.retry("t1", now_ms=ARRIVAL + 10)
    assert due == ["a@x.test"]
    states = await queue.load("t1")
    assert states["a@x.test"].next_ms == ARRIVAL + 10 and states["a@x.test"].attempts == 3
    assert states["b@x.test"].state == "delivered" and states["c@x.test"].state == "sending"
    assert await redis.zscore(keys.RELAY_RETRIES, "t1") == ARRIVAL + 10
    assert await queue.retry("missing") is None


async def test_r_out_2_retry_never_overwrites_a_result_the_relay_writes_meanwhile(redis: aioredis.Redis) -> None:
    """A relay's write between the retry's read and its write makes the retry read again."""
    queue = OutboundQueue(redis)
    rcpts = tuple(f"r{i}@x.test" for i in range(50))
    await enter(queue, "t1", rcpts=rcpts)

    async def relay_delivers() -> None:
        for rcpt in rcpts:
            await queue.save("t1", {rcpt: RecipientState("delivered", reply="250 2.0.0 Ok")})

    await asyncio.gather(relay_delivers(), *(queue.retry("t1") for _ in range(20)))
    assert all(s.state == "delivered" for s in (await queue.load("t1")).values())


async def test_r_out_2_removal_leaves_the_mark_the_relay_looks_for(redis: aioredis.Redis) -> None:
    queue = OutboundQueue(redis)
    await enter(queue, "t1")
    await queue.retry("t1")
    assert not await queue.removed("t1")
    assert await queue.remove("t1", "admin@example.org", now_ms=ARRIVAL + 1)
    assert await queue.removed("t1") and await queue.get("t1") is None
    assert await redis.zscore(keys.RELAY_RETRIES, "t1") is None
    assert json.loads(str(await redis.get(keys.relay_removed("t1")))) == {"by": "admin@example.org",
                                                                         "at_ms": ARRIVAL + 1}
    assert 0 < await redis.ttl(keys.relay_removed("t1"))
    # Only what is queued is removed: a finished or unknown transaction gets no mark.
    assert not await queue.remove("t1", "admin@example.org")
    assert not await queue.remove("never-queued", "admin@example.org")
    assert not await queue.removed("never-queued")
