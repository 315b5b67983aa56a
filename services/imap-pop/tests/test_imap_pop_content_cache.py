"""The replica's cache of messages as served (R-MBX-6: bounded memory; a message read by two
clients is read from JetStream once)."""

from __future__ import annotations

import asyncio

import pytest
from imappop_helpers import simple_message
from test_imap_pop_condstore import session

from rempart.common.mailstore import IndexedMessage
from rempart.imap_pop.session import ContentCache

pytestmark = pytest.mark.timeout(60)


def message(uid: int, txn: str, seq: int = 0, blob: str = "") -> IndexedMessage:
    return IndexedMessage(uid=uid, blob=blob, size=0, internal_date_ms=0, flags=frozenset(), transaction_id=txn,
                          record_seq=seq)


def test_content_cache_is_bounded_by_bytes_and_shared_by_copies() -> None:
    cache = ContentCache(1000)
    first = message(1, "t1", seq=10)
    cache.put(first, b"a" * 100)
    # A copy (COPY/MOVE) names its delivery first: the same entry.
    assert cache.get(message(7, "t1/abc0", seq=10)) == b"a" * 100
    for n in range(2, 12):
        cache.put(message(n, f"t{n}", seq=10 + n), b"b" * 100)
    assert cache.held <= 1000
    assert cache.get(first) is None  # the least recently used went first
    assert cache.get(message(11, "t11", seq=21)) == b"b" * 100
    cache.put(message(50, "big", blob="blob-big"), b"c" * 200)  # over an eighth of the cache
    assert cache.get(message(50, "big", blob="blob-big")) is None and cache.held <= 1000
    off = ContentCache(0)  # REMPART_IMAP_CONTENT_CACHE_MB=0
    off.put(first, b"")
    assert off.get(first) is None


async def test_a_message_fetched_twice_is_read_from_jetstream_once(service) -> None:  # type: ignore[no-untyped-def]
    for n in range(1, 4):
        await service.deliver(simple_message(f"m{n}"))
    store = service.backend.store
    reads: list[int] = []
    real = store.read_message

    async def counting(m: IndexedMessage) -> bytes:
        reads.append(m.uid)
        return await real(m)

    store.read_message = counting
    out = await asyncio.to_thread(session, service.ports["imap"], "SELECT INBOX", "FETCH 1:* BODY.PEEK[]",
                                  "FETCH 1:* BODY.PEEK[]", "COPY 1 INBOX", "NOOP", "FETCH 4 BODY.PEEK[]")
    bodies = [b"\n".join(lines) for lines in out[1:3]]
    assert bodies[0] == bodies[1].replace(b"c3 OK", b"c2 OK") and b"m3" in bodies[0]
    assert sorted(reads) == [1, 2, 3]  # the second FETCH and the copy's read nothing again
    assert out[5][-1].startswith(b"c6 OK") and b"m1" in b"\n".join(out[5])


async def test_pipelined_single_message_fetches_are_answered_in_order_each_read_once(service) -> None:  # type: ignore[no-untyped-def]
    """mbsync's pattern: a UID FETCH per message, all sent at once. The messages of the commands
    already received are read ahead, several at once; every answer is still the right message,
    in the order asked, and each message is read from the store once."""
    from imappop_helpers import BOB, BOB_PASSWORD, raw_connect

    for n in range(1, 31):
        await service.deliver(simple_message(f"piped {n}"))
    store = service.backend.store
    reads: list[int] = []
    real = store.read_message
    in_flight, most = [0], [0]

    async def counting(m: IndexedMessage) -> bytes:
        reads.append(m.uid)
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        try:
            await asyncio.sleep(0.02)  # a slow store: reads one after the other would show
            return await real(m)
        finally:
            in_flight[0] -= 1

    store.read_message = counting
    order = [7, 3, 30, 12, 1, 25, 18, 9, 2, 27, 14, 5, 22, 11, 29, 4, 16, 8, 20, 6]

    def run() -> list[bytes]:
        raw = raw_connect(service.ports["imap"])
        raw.line()
        raw.send(f'a LOGIN {BOB} "{BOB_PASSWORD}"\r\nb SELECT INBOX\r\n'.encode())
        raw.until(b"b ")
        raw.send(b"".join(b"f%d UID FETCH %d (BODY.PEEK[])\r\n" % (k, uid) for k, uid in enumerate(order)))
        return raw.until(b"f%d " % (len(order) - 1))

    lines = await asyncio.to_thread(run)
    tagged = [line for line in lines if line.startswith(b"f")]
    assert tagged == [b"f%d OK UID FETCH completed" % k for k in range(len(order))]
    subjects = [int(line.split(b"piped ")[1]) for line in lines if line.startswith(b"Subject: piped ")]
    assert subjects == order
    assert sorted(reads) == sorted(order)
    assert most[0] > 1  # read ahead: several at once
