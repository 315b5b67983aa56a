"""Reading large folders (issue 15, SPEC R-MBX-2, R-MBX-6): a client's first sync of a
10,000-message folder, twenty at once, never costs a JetStream consumer, never fails, and never
takes reading away from another account; an unreadable message fails alone.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from unittest.mock import patch

import pytest
from imappop_helpers import BOB, BOB_PASSWORD, CAROL, SourceIMAP, simple_message
from nats.aio.client import Client as NATS

from rempart.common import mailbox as mailbox_module
from rempart.common.events import MAIL_STREAM
from rempart.common.mailstore import INBOX
from rempart.common.pb.events.v1 import events_pb2

pytestmark = pytest.mark.timeout(300)

FOLDER_SIZE = 10_000
FILE_BATCH = 1000  # messages indexed per Redis round trip while filling
HEADER_SYNC = b"FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE MESSAGE-ID)])"


async def fill(harness, account: str, count: int, summaries: bool = True, first: int = 0) -> None:  # type: ignore[no-untyped-def]
    """``count`` messages through the durable path (blob + record acked), then indexed as the
    catch-up indexer does: in batches (one Redis round trip and one log record each), with the
    summary the edge would compute. Each message stays in its own record, at its own UID."""
    store, mailboxes = harness.backend.store, harness.backend.mailboxes
    gate = asyncio.Semaphore(256)

    async def one(n: int) -> tuple[tuple[events_pb2.DeliveryRecord, int], bytes]:
        data = simple_message(subject=f"Message {n}", body=f"Body of message {n}\r\n" + "x" * 1800 + "\r\n")
        async with gate:
            stored = await store.accept(data, mail_from="alice@example.net", local_mailboxes=[account],
                                        remote_recipients=[])
        return stored, data

    async def accept(numbers: range) -> list[tuple[tuple[events_pb2.DeliveryRecord, int], bytes]]:
        return await asyncio.gather(*(one(n) for n in numbers))

    numbers = range(first, first + count)
    # The first message alone: its filing reserves the UIDs, the rest fall inside the block.
    batches = [numbers[:1], *(numbers[i : i + FILE_BATCH] for i in range(1, count, FILE_BATCH))]
    # UIDs are handed out in blocks the change log reserved first (RESERVE_BLOCK at a time for the
    # edge): one block for the whole fill spares a reservation round per hundred messages.
    with patch.object(mailbox_module, "RESERVE_BLOCK", max(mailbox_module.RESERVE_BLOCK, count)):
        # Each batch is indexed (its summaries computed) while JetStream stores the next one.
        storing = asyncio.create_task(accept(batches[0]))
        for following in [*batches[1:], None]:
            part = await storing
            if following is not None:
                storing = asyncio.create_task(accept(following))
            if summaries:
                await mailboxes.file([stored for stored, _ in part], [data for _, data in part])
            else:
                # As a rebuild files them: the records without their bodies, so no summary.
                await mailboxes.file([(_without_body(record), seq) for (record, seq), _ in part])


def _without_body(record: events_pb2.DeliveryRecord) -> events_pb2.DeliveryRecord:
    bare = events_pb2.DeliveryRecord()
    bare.CopyFrom(record)
    bare.ClearField("body")
    return bare


async def lose(harness, message) -> None:  # type: ignore[no-untyped-def]
    """Make one stored message unreadable (its blob, or the record holding it, deleted)."""
    if message.blob:
        await harness.backend.store.delete_blob(message.blob)
    else:
        assert message.record_seq
        await harness.backend.nc.jetstream().delete_msg(MAIL_STREAM, message.record_seq)


def raw_login(port: int, account: str) -> socket.socket:
    """Log in and select INBOX; a temporary refusal (the replica busy, fail closed) is retried, as
    a mail client does."""
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", port), 30)
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(f'a LOGIN "{account}" "{BOB_PASSWORD}"\r\n'.encode())
        reply = reader.readline()
        while not reply.startswith(b"a "):
            reply = reader.readline()
        if reply.startswith(b"a OK"):
            sock.sendall(b"b SELECT INBOX\r\n")
            while not (line := reader.readline()).startswith(b"b "):
                pass
            assert line.startswith(b"b OK"), line
            return sock
        assert b"[UNAVAILABLE]" in reply, reply
        sock.close()
        time.sleep(0.5)
    raise AssertionError(f"{account} could not log in")


def run_fetch(sock: socket.socket, command: bytes) -> tuple[int, bytes]:
    """Send ``c <command>``; count the untagged FETCH responses (skipping literals); the tagged line."""
    reader = sock.makefile("rb")
    sock.sendall(b"c " + command + b"\r\n")
    items = 0
    while True:
        line = reader.readline()
        if not line:
            raise EOFError("connection closed during FETCH")
        if line.startswith(b"* ") and b" FETCH (" in line:
            items += 1
        literal = re.search(rb"\{(\d+)\}\r\n$", line)
        if literal:
            reader.read(int(literal.group(1)))
            continue
        if line.startswith(b"c "):
            return items, line.strip()


async def count_direct_gets(nc: NATS) -> tuple[list[int], object]:
    """Every blob read is a direct-get request: count them as they cross the server."""
    seen = [0]

    async def cb(_msg: object) -> None:
        seen[0] += 1

    sub = await nc.subscribe("$JS.API.DIRECT.GET.>", cb=cb)
    return seen, sub


async def test_r_mbx_2_r_mbx_6_twenty_header_syncs_and_a_full_read_of_10000_messages(
    service, nats_conn: NATS
) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    await fill(service, BOB, FOLDER_SIZE)
    await fill(service, CAROL, 3)
    print(f"filled {FOLDER_SIZE} in {time.monotonic() - started:.1f} s")
    js = nats_conn.jetstream()
    consumers_before = (await js.account_info()).consumers
    reads, sub = await count_direct_gets(nats_conn)
    port = service.ports["imap"]
    stop = asyncio.Event()
    carol_results: list[bytes] = []

    def carol_reads() -> None:
        sock = raw_login(port, CAROL)
        try:
            while not stop.is_set():
                items, tagged = run_fetch(sock, b"FETCH 1 (BODY.PEEK[])")
                carol_results.append(tagged if items == 1 else b"missing item: " + tagged)
                # A reader, not a load generator: her reads run all through the syncs without
                # taking the in-process server's CPU from them (and the blob-read bound below tightens).
                time.sleep(0.02)
        finally:
            sock.close()

    def header_sync() -> tuple[int, bytes]:
        sock = raw_login(port, BOB)
        try:
            return run_fetch(sock, HEADER_SYNC)
        finally:
            sock.close()

    consumer_samples: list[int] = []

    async def sample_consumers() -> None:
        while not stop.is_set():
            consumer_samples.append((await js.account_info()).consumers)
            await asyncio.sleep(0.2)

    carol = asyncio.create_task(asyncio.to_thread(carol_reads))
    sampler = asyncio.create_task(sample_consumers())
    started = time.monotonic()
    results = await asyncio.gather(*(asyncio.to_thread(header_sync) for _ in range(20)))
    elapsed = time.monotonic() - started
    stop.set()
    await carol
    await sampler
    await sub.unsubscribe()
    for items, tagged in results:
        assert tagged.startswith(b"c OK"), tagged
        assert items == FOLDER_SIZE
    # The header syncs read no blob: the only direct gets are Carol's own reads.
    assert carol_results and all(r.startswith(b"c OK") for r in carol_results), carol_results[:3]
    assert reads[0] <= 2 * len(carol_results) + 2, (reads[0], len(carol_results))
    assert max(consumer_samples) == consumers_before, consumer_samples
    print(f"20 header syncs of {FOLDER_SIZE} messages in {elapsed:.1f} s; carol read {len(carol_results)} times")

    # The same folder read in full (R-MBX-6): a client that stops reading holds the server's
    # output at the high-water mark, not the whole 20 MB answer.
    await _full_body_fetch_with_a_bounded_buffer(service, js, consumers_before)


async def _full_body_fetch_with_a_bounded_buffer(service, js, consumers_before: int) -> None:  # type: ignore[no-untyped-def]

    def slow_then_read() -> tuple[int, bytes]:
        sock = raw_login(service.ports["imap"], BOB)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        try:
            # A client that stops reading: the server must wait, not buffer 20 MB of answer.
            sock.sendall(b"s FETCH 1:* BODY.PEEK[]\r\n")
            time.sleep(2.0)
            return run_fetch(sock, b"NOOP")
        finally:
            sock.close()

    task = asyncio.create_task(asyncio.to_thread(slow_then_read))
    await asyncio.sleep(1.5)
    buffered = [s.stream.writer.transport.get_write_buffer_size()
                for s in service.server._sessions if s.account == BOB]
    items, tagged = await task
    assert buffered and max(buffered) < 2 * 1024 * 1024, buffered
    # Once the client reads again, the whole folder arrives, then the NOOP's answer.
    assert items == FOLDER_SIZE
    assert tagged.startswith(b"c OK"), tagged
    assert (await js.account_info()).consumers == consumers_before


async def test_r_mbx_2_summary_computed_once_for_messages_indexed_without_one(service) -> None:  # type: ignore[no-untyped-def]
    # A rebuild (and the indexer, for a message stored as a blob) indexes without the bytes: the first FETCH computes
    # the summary and keeps it; later header FETCHes need no blob at all (shown by deleting it).
    await fill(service, BOB, 3, summaries=False)
    messages = await service.backend.index.messages(BOB, INBOX)
    assert all(s is None for s in (await service.backend.index.summaries(BOB, INBOX, [m.uid for m in messages])).values())

    def fetch(command: bytes) -> tuple[int, bytes, bytes]:
        imap = SourceIMAP(service.ports["imap"])
        imap.login(BOB, BOB_PASSWORD)
        imap.select("INBOX")
        typ, data = imap.fetch("1:3", command.decode())
        imap.logout()
        flat = b"".join(p[0] + p[1] if isinstance(p, tuple) else p for p in data)
        return len([p for p in data if isinstance(p, tuple) or p.startswith(b"1 ") or p[:2] in (b"2 ", b"3 ")]), typ.encode(), flat

    _, typ, first = await asyncio.to_thread(fetch, b"(ENVELOPE BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert typ == b"OK" and b"Message 0" in first
    kept = await service.backend.index.summaries(BOB, INBOX, [m.uid for m in messages])
    assert all(s is not None and b"Subject: Message" in s.header for s in kept.values())
    for message in messages:
        await lose(service, message)
    _, typ, again = await asyncio.to_thread(fetch, b"(ENVELOPE BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert typ == b"OK" and again == first


async def test_one_unreadable_message_fails_alone(service) -> None:  # type: ignore[no-untyped-def]
    await fill(service, BOB, 3)
    await fill(service, CAROL, 1)
    messages = await service.backend.index.messages(BOB, INBOX)
    await lose(service, messages[1])

    def run() -> tuple[tuple[int, bytes], tuple[int, bytes], tuple[int, bytes]]:
        bob = raw_login(service.ports["imap"], BOB)
        carol = raw_login(service.ports["imap"], CAROL)
        try:
            return (run_fetch(bob, b"FETCH 1:3 BODY.PEEK[]"), run_fetch(carol, b"FETCH 1 BODY.PEEK[]"),
                    run_fetch(bob, b"FETCH 1:3 (UID FLAGS BODY.PEEK[HEADER])"))
        finally:
            bob.close()
            carol.close()

    (bob_items, bob_tagged), (carol_items, carol_tagged), (headers, header_tagged) = await asyncio.to_thread(run)
    # RFC 3501 7.4.2: the messages that could be read are sent; the tagged NO says what failed.
    assert bob_items == 2
    assert bob_tagged == b"c NO [UNAVAILABLE] 1 message(s) could not be read now, try again"
    assert (carol_items, carol_tagged[:4]) == (1, b"c OK")
    # Its header is in the index: a header FETCH still serves all three.
    assert (headers, header_tagged[:4]) == (3, b"c OK")


async def test_r_mbx_2_search_on_header_fields_reads_the_index_not_the_messages(service) -> None:  # type: ignore[no-untyped-def]
    for n in range(5):  # one at a time: sequence number n + 1 is "Message n"
        await fill(service, BOB, 1, first=n)
    messages = await service.backend.index.messages(BOB, INBOX)
    for message in messages:
        await lose(service, message)

    def run() -> tuple[bytes, bytes, bytes]:
        bob = raw_login(service.ports["imap"], BOB)
        reader = bob.makefile("rb")
        try:
            bob.sendall(b'c SEARCH SUBJECT "Message 3" FROM alice\r\n')
            found, tagged = reader.readline().strip(), reader.readline().strip()
            bob.sendall(b"d SEARCH BODY nothing\r\n")
            return found, tagged, reader.readline().strip()
        finally:
            bob.close()

    found, tagged, body_search = await asyncio.to_thread(run)
    # Header keys are answered from the summaries even with every body gone...
    assert (found, tagged) == (b"* SEARCH 4", b"c OK SEARCH completed")
    # ...while BODY needs the messages, and says it could not read them.
    assert body_search.startswith(b"d NO [UNAVAILABLE]"), body_search
