"""Client input that multiplied the server's work (the DoS review, findings 4 and 6): a FETCH that
repeats an item, or asks for many, and a SEARCH with many keys that read the message. Each test
counts the work done (calls of the costly function) or the memory held, or reads the refusal;
none relies on wall-clock time.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from imappop_helpers import BOB, BOB_PASSWORD, Raw, raw_connect

from rempart.common import mime as M
from rempart.imap_pop import imap as imap_module

pytestmark = pytest.mark.timeout(120)

# As imap.MAX_FETCH_ITEMS and imap_search.MAX_SEARCH_CONTENT_KEYS (written here, so that the
# tests also run, and fail, against code without the limits).
MAX_FETCH_ITEMS = 64
MAX_SEARCH_CONTENT_KEYS = 64


def selected(port: int) -> Raw:
    raw = raw_connect(port)
    raw.line()
    raw.send(f'a LOGIN {BOB} "{BOB_PASSWORD}"\r\n'.encode())
    assert raw.until(b"a ")[-1].startswith(b"a OK")
    raw.send(b"b SELECT INBOX\r\n")
    assert raw.until(b"b ")[-1].startswith(b"b OK")
    return raw


def counting(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[int]:
    """Replace ``owner.name`` by a wrapper that counts its calls (one list entry per call)."""
    calls: list[int] = []
    original: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def multipart(parts: int) -> bytes:
    body = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\npart %d\r\n" % n for n in range(1, parts + 1))
    return (b"From: alice@example.net\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + body + b"--b--\r\n")


# Finding 4: FETCH items.


async def test_fetch_repeated_item_is_rendered_and_answered_once(service, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    await service.deliver(multipart(40))
    renders = counting(monkeypatch, imap_module, "render_item")

    def run() -> tuple[list[bytes], list[bytes]]:
        raw = selected(service.ports["imap"])
        raw.send(b"c FETCH 1 (" + b" ".join([b"BODY.PEEK[1]"] * 400) + b")\r\n")
        peeked = raw.until(b"c ")
        # The same section, once peeked and once not: one BODY[1], and \Seen is still set.
        raw.send(b"d FETCH 1 (BODY.PEEK[2] BODY[2] BODY.PEEK[2])\r\n")
        return peeked, raw.until(b"d ")

    peeked, read = await asyncio.to_thread(run)
    assert peeked == [b"* 1 FETCH (BODY[1] {6}", b"part 1)", b"c OK FETCH completed"]
    assert len(renders) == 1 + 1  # one for c, one for d (the FLAGS d adds are not an item)
    assert read == [b"* 1 FETCH (BODY[2] {6}", b"part 2 FLAGS (\\Recent \\Seen))", b"d OK FETCH completed"]


async def test_fetch_of_many_parts_parses_the_message_once(service, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Forty different parts of a 40-part message in one FETCH: one MIME tree, not forty (each
    # one a whole parse of the message: 400-part messages made a FETCH take seconds).
    await service.deliver(multipart(40))
    built = counting(monkeypatch, M, "structure")

    def run() -> list[bytes]:
        raw = selected(service.ports["imap"])
        raw.send(b"c FETCH 1 (" + b" ".join(b"BODY.PEEK[%d]" % n for n in range(1, 41)) + b")\r\n")
        return raw.until(b"c ")

    lines = await asyncio.to_thread(run)
    assert lines[-1] == b"c OK FETCH completed"
    assert b"".join(lines).count(b"part ") == 40
    assert len(built) == 1


async def test_fetch_with_too_many_distinct_items_is_refused(service) -> None:  # type: ignore[no-untyped-def]
    await service.deliver(multipart(2))

    def items(count: int) -> bytes:
        return b" ".join(b"BODY.PEEK[HEADER.FIELDS (X-%d)]" % n for n in range(count))

    def run() -> list[bytes]:
        raw = selected(service.ports["imap"])
        raw.send(b"c FETCH 1 (" + items(MAX_FETCH_ITEMS + 1) + b")\r\n")
        lines = raw.until(b"c ")
        raw.send(b"d FETCH 1 (" + items(MAX_FETCH_ITEMS) + b")\r\n")
        lines += raw.until(b"d ")[-1:]
        raw.send(b"e FETCH 1 (" + items(MAX_FETCH_ITEMS) + b" " + items(MAX_FETCH_ITEMS) + b")\r\n")  # repeats
        return lines + raw.until(b"e ")[-1:]

    assert await asyncio.to_thread(run) == [
        b"c BAD too many FETCH items (at most %d different ones)" % MAX_FETCH_ITEMS,
        b"d OK FETCH completed", b"e OK FETCH completed"]


async def test_fetch_memory_is_one_item_not_items_times_message_size(service) -> None:  # type: ignore[no-untyped-def]
    size = 1024 * 1024
    await service.deliver(b"Subject: big\r\n\r\n" + b"y" * size)
    count = 40  # distinct items (different origins), each nearly the whole message

    def run() -> tuple[int, float]:
        raw = selected(service.ports["imap"])
        raw.send(b"c NOOP\r\n")
        raw.until(b"c ")
        tracemalloc.start()
        raw.send(b"m FETCH 1 (" + b" ".join(b"BODY.PEEK[]<%d.%d>" % (n, size) for n in range(count)) + b")\r\n")
        received, tail = 0, raw.buf
        raw.buf = b""
        raw.sock.settimeout(30)
        while not (b"\r\nm " in tail and tail.endswith(b"\r\n")):  # read and drop: the client holds nothing
            chunk = raw.sock.recv(1 << 16)
            if not chunk:
                break
            received += len(chunk)
            tail = tail[-64:] + chunk
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        raw.sock.close()
        assert tail.endswith(b"\r\nm OK FETCH completed\r\n"), tail[-64:]
        return received, peak / size

    received, peak = await asyncio.to_thread(run)
    assert received > count * (size - count)
    # Holding every rendered item at once (and then their join) took over 2 x count x size.
    assert peak < 12, peak


# Finding 6: SEARCH keys that read the message.


def search_mail(n: int, word: str = "") -> bytes:
    """A message whose text says ``word`` in base64 only: found by decoding, not in the raw octets."""
    text = base64.b64encode(f"Message {n} says {word or 'nothing'}.\r\n".encode()).decode()
    return (f"From: alice@example.net\r\nSubject: m{n}\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n{text}\r\n").encode()


async def test_search_decodes_each_message_once_whatever_the_number_of_keys(service, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for n in range(1, 4):
        await service.deliver(search_mail(n, "zebra" if n == 2 else ""))
    decodes = counting(monkeypatch, M, "text_for_search")
    keys = 40

    def run() -> list[bytes]:
        raw = selected(service.ports["imap"])
        criteria = b"OR BODY giraffe%d " * (keys - 1) % tuple(range(keys - 1)) + b"BODY zebra"
        raw.send(b"c SEARCH " + criteria + b"\r\n")
        lines = raw.until(b"c ")
        raw.send(b"d SEARCH (OR BODY zebra BODY okapi) NOT (BODY okapi)\r\n")
        return lines + raw.until(b"d ")

    assert await asyncio.to_thread(run) == [b"* SEARCH 2", b"c OK SEARCH completed",
                                            b"* SEARCH 2", b"d OK SEARCH completed"]
    # Once per message and SEARCH (40 keys per message before: 120 for c alone).
    assert len(decodes) == 3 + 3


async def test_search_with_too_many_content_keys_is_refused(service) -> None:  # type: ignore[no-untyped-def]
    await service.deliver(search_mail(1, "zebra"))

    def run() -> list[bytes]:
        raw = selected(service.ports["imap"])
        over = b"OR BODY giraffe " * MAX_SEARCH_CONTENT_KEYS + b"BODY zebra"
        raw.send(b"c SEARCH " + over + b"\r\n")
        lines = raw.until(b"c ")
        nested = b"(" + b"OR SUBJECT m9 " * (MAX_SEARCH_CONTENT_KEYS // 2) + b"(" + \
            b"OR HEADER X-A a " * (MAX_SEARCH_CONTENT_KEYS // 2) + b"TEXT zebra))"  # one key too many
        raw.send(b"d SEARCH " + nested + b"\r\n")
        lines += raw.until(b"d ")
        at_limit = b"OR BODY giraffe " * (MAX_SEARCH_CONTENT_KEYS - 1) + b"BODY zebra"
        raw.send(b"e SEARCH " + at_limit + b"\r\n")
        return lines + raw.until(b"e ")

    refusal = b"NO [LIMIT] Too many SEARCH keys that read messages (at most %d)" % MAX_SEARCH_CONTENT_KEYS
    assert await asyncio.to_thread(run) == [b"c " + refusal, b"d " + refusal,
                                            b"* SEARCH 1", b"e OK SEARCH completed"]


async def test_content_search_lets_other_sessions_run_between_messages(service, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for n in range(1, 6):
        await service.deliver(search_mail(n))
    monkeypatch.setattr(imap_module, "SEARCH_YIELD_SECONDS", -1.0, raising=False)  # yield at every message
    ticks = 0
    seen_at: list[int] = []
    original = M.text_for_search

    def decode(data: bytes, body_only: bool) -> str:
        seen_at.append(ticks)
        return original(data, body_only)

    monkeypatch.setattr(M, "text_for_search", decode)

    async def ticker(done: asyncio.Event) -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0)

    def run() -> list[bytes]:
        raw = selected(service.ports["imap"])
        raw.send(b"c SEARCH BODY okapi\r\n")
        return raw.until(b"c ")

    done = asyncio.Event()
    ticking = asyncio.create_task(ticker(done))
    try:
        assert await asyncio.to_thread(run) == [b"* SEARCH", b"c OK SEARCH completed"]
    finally:
        done.set()
        await ticking
    # The five messages are one read window: before, they were decoded back to back.
    assert len(seen_at) == 5
    assert all(later > earlier for earlier, later in itertools.pairwise(seen_at)), seen_at

