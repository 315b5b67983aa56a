"""Security regression tests: one per attack, named for what it stops. Each asserts the reply the
attacker sees, that the connection stays usable or is closed cleanly (our last line arrives, no
reset), that the server keeps serving others without logging a crash, and, for the bulky ones,
that memory stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator

import pytest
from imappop_helpers import BOB, BOB_PASSWORD, UNTRUSTED_IP, Raw, raw_connect

from rempart.common.config import SettingsStore
from rempart.common.pb.policy.v1 import policy_pb2
from rempart.imap_pop import replies as R

pytestmark = pytest.mark.timeout(60)

TEN_MB = 10 * 1024 * 1024


@pytest.fixture(autouse=True)
def no_crash_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.WARNING, logger="rempart.imap_pop")
    yield
    crashes = [r for r in caplog.records if r.name.startswith("rempart.imap_pop") and r.levelno >= logging.ERROR]
    assert not crashes, [r.getMessage() for r in crashes]


def still_serving(port: int, protocol: str = "imap") -> bytes:
    raw = raw_connect(port)
    greeting = raw.line()
    raw.send(b"z NOOP\r\n" if protocol == "imap" else b"NOOP\r\n")
    reply = raw.line()
    raw.sock.close()
    assert greeting.startswith(b"* OK" if protocol == "imap" else b"+OK")
    return reply


def send_in_background(raw: Raw, data: bytes) -> threading.Thread:
    """Push ``data`` while the test reads: an attacker does not wait for our replies."""

    def push() -> None:
        try:
            raw.sock.sendall(data)
        except OSError:
            pass  # the server closed on us: expected for some attacks

    thread = threading.Thread(target=push, daemon=True)
    thread.start()
    return thread


def imap_logged_in(port: int) -> Raw:
    raw = raw_connect(port)
    raw.line()
    raw.send(f'a LOGIN {BOB} "{BOB_PASSWORD}"\r\n'.encode())
    assert raw.until(b"a ")[-1].startswith(b"a OK")
    return raw


async def test_starttls_injection_plaintext_login_after_starttls_never_runs(service) -> None:  # type: ignore[no-untyped-def]
    """CVE-2011-0411 class: a LOGIN pipelined in plaintext behind STARTTLS must not log in."""

    def run() -> list[bytes]:
        raw = raw_connect(service.ports["imap"], "127.0.0.1")
        raw.line()
        raw.send(f'a STARTTLS\r\nb LOGIN {BOB} "{BOB_PASSWORD}"\r\n'.encode())
        assert raw.line() == b"a OK Begin TLS negotiation now"
        raw.sock = service.client_tls().wrap_socket(raw.sock, server_hostname="localhost")
        raw.buf = b""
        raw.send(b"c SELECT INBOX\r\n")
        return raw.until(b"c ")

    assert await asyncio.to_thread(run) == [b"c BAD Unknown command or wrong state"]
    assert not service.auth.requests


async def test_stls_injection_pipelined_user_after_stls_is_discarded(service) -> None:  # type: ignore[no-untyped-def]
    def run() -> list[bytes]:
        raw = raw_connect(service.ports["pop3"], UNTRUSTED_IP)
        raw.line()
        raw.send(f"STLS\r\nUSER {BOB}\r\n".encode())
        assert raw.line() == b"+OK Begin TLS negotiation"
        raw.sock = service.client_tls().wrap_socket(raw.sock, server_hostname="localhost")
        raw.buf = b""
        raw.send(f"PASS {BOB_PASSWORD}\r\n".encode())  # only works if the injected USER ran
        return [raw.line()]

    assert await asyncio.to_thread(run) == [b"-ERR USER first"]
    assert not service.auth.requests


async def test_ten_megabyte_literal_sent_without_waiting_for_continuation(service) -> None:  # type: ignore[no-untyped-def]
    junk = b"x" * (TEN_MB - 100)

    def run(marker: bytes) -> tuple[list[bytes], bool, float]:
        raw = raw_connect(service.ports["imap"])
        raw.line()
        attack = b"a LOGIN " + marker + b"\r\n" + junk  # built before tracing: only the server counts
        tracemalloc.start()
        pusher = send_in_background(raw, attack)
        lines = raw.until(b"* BYE")
        closed = raw.closed()
        pusher.join(10)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return lines, closed, peak / 1e6

    sync_lines, sync_closed, sync_peak = await asyncio.to_thread(run, b"{%d}" % TEN_MB)
    plus_lines, plus_closed, plus_peak = await asyncio.to_thread(run, b"{%d+}" % TEN_MB)
    # Synchronising: refused before any "+"; what follows is junk that is not a command.
    assert sync_lines == [b"a " + R.IMAP_LITERAL_TOO_LARGE.encode(), R.IMAP_BYE_DESYNC.encode()]
    # LITERAL+: the bytes are already coming; the stream cannot be resynchronised.
    assert plus_lines == [b"a " + R.IMAP_LITERAL_TOO_LARGE.encode(), R.IMAP_BYE_DESYNC.encode()]
    assert sync_closed and plus_closed
    assert sync_peak < 4 and plus_peak < 4, (sync_peak, plus_peak)  # MB, for a 10 MB attack
    assert await asyncio.to_thread(still_serving, service.ports["imap"]) == b"z OK NOOP completed"


async def test_append_over_message_size_limit_refused_before_reading(service, redis) -> None:  # type: ignore[no-untyped-def]
    await SettingsStore(redis).put_doc("server", {"limits": {"max_message_size": 1024 * 1024}})
    await service.backend.config.refresh()

    def run() -> list[bytes]:
        raw = imap_logged_in(service.ports["imap"])
        raw.send(b"b APPEND INBOX {%d}\r\n" % (2 * 1024 * 1024))  # R-LIM-7: over the 1 MB limit
        lines = raw.until(b"b ")
        raw.send(b"c APPEND INBOX {5}\r\n")
        lines.append(raw.line())
        raw.send(b"hello\r\n")
        return lines + raw.until(b"c ")

    lines = await asyncio.to_thread(run)
    assert lines[0] == b"b " + R.IMAP_LITERAL_TOO_LARGE.encode()
    assert lines[1] == b"+ Ready for literal data"
    assert lines[2].startswith(b"c OK [APPENDUID ")


async def test_literal_count_overflow_is_a_syntax_error_not_a_huge_read(service) -> None:  # type: ignore[no-untyped-def]
    def run() -> list[bytes]:
        raw = raw_connect(service.ports["imap"])
        raw.line()
        raw.send(b"a LOGIN {99999999999999999999}\r\n")
        lines = raw.until(b"a ")
        raw.send(b"b LOGIN {4294967296}\r\n")  # 2^32: fits ten digits, far over any limit
        lines += raw.until(b"b ")
        raw.send(b"c LOGIN {-1}\r\nd NOOP\r\n")
        return lines + raw.until(b"d ")

    assert await asyncio.to_thread(run) == [
        b"a BAD bad literal", b"b " + R.IMAP_LITERAL_TOO_LARGE.encode(), b"c BAD bad literal",
        b"d OK NOOP completed"]


async def test_nul_bytes_in_commands_are_refused(service) -> None:  # type: ignore[no-untyped-def]
    def imap() -> list[bytes]:
        raw = raw_connect(service.ports["imap"])
        raw.line()
        raw.send(b"a\x00 NOOP\r\nb NOOP\x00\r\nc LOGIN \"bob\x00@example.org\" x\r\nd NOOP\r\n")
        return raw.until(b"d ")

    def pop3() -> list[bytes]:
        raw = raw_connect(service.ports["pop3"])
        raw.line()
        raw.send(f"USER {BOB}\x00evil\r\nUSER {BOB}\r\nPASS {BOB_PASSWORD}\x00\r\nNOOP\r\n".encode())
        return [raw.line() for _ in range(4)]

    assert await asyncio.to_thread(imap) == [
        b"* BAD bad tag", b"b BAD control character in atom", b"c BAD control character in quoted string",
        b"d OK NOOP completed"]
    assert await asyncio.to_thread(pop3) == [R.POP3_BAD_CHARACTERS.encode(), b"+OK",
                                             R.POP3_BAD_CHARACTERS.encode(), b"+OK"]
    assert not service.auth.requests  # nothing with a NUL reached the auth service


async def test_ten_thousand_nested_parentheses_in_fetch(service) -> None:  # type: ignore[no-untyped-def]
    await service.deliver(b"Subject: x\r\n\r\nbody\r\n")

    def run() -> list[bytes]:
        raw = imap_logged_in(service.ports["imap"])
        raw.send(b"b SELECT INBOX\r\n")
        raw.until(b"b ")
        raw.send(b"c FETCH 1 " + b"(" * 10000 + b"FLAGS" + b")" * 10000 + b"\r\n")
        lines = raw.until(b"* BAD")
        raw.send(b"d FETCH 1 " + b"(" * 4000 + b"FLAGS" + b")" * 4000 + b"\r\n")  # fits a line
        lines += raw.until(b"d ")
        # Depth spread over literals (each line short) is counted across the whole command.
        raw.send(b"e FETCH 1 " + b"(" * 5 + b"{1+}\r\nx " + b"(" * 5 + b"FLAGS" + b")" * 10 + b"\r\n")
        lines += raw.until(b"e ")
        raw.send(b"f FETCH 1 (FLAGS)\r\n")
        return lines + raw.until(b"f ")

    assert await asyncio.to_thread(run) == [
        R.IMAP_LINE_TOO_LONG.encode(), b"d BAD lists nested too deep", b"e BAD lists nested too deep",
        b"* 1 FETCH (FLAGS (\\Recent))", b"f OK FETCH completed"]


async def test_sequence_set_repeated_100000_times(service) -> None:  # type: ignore[no-untyped-def]
    for n in range(3):
        await service.deliver(f"Subject: {n}\r\n\r\nbody\r\n".encode())

    def run() -> tuple[list[bytes], float]:
        raw = imap_logged_in(service.ports["imap"])
        raw.send(b"b SELECT INBOX\r\n")
        raw.until(b"b ")
        tracemalloc.start()
        raw.send(b"c FETCH " + b"1:*," * 100_000 + b"1 FLAGS\r\n")
        lines = raw.until(b"* BAD")
        raw.send(b"d UID FETCH {%d}\r\n" % (len(b"1:*,") * 100_000))  # as a literal: refused before "+"
        lines += raw.until(b"d ")
        raw.send(b"e FETCH " + b"1:*," * 2001 + b"1 FLAGS\r\n")  # fits a line, too many ranges
        lines += raw.until(b"e ")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        started = time.monotonic()
        raw.send(b"f FETCH " + b"1:*," * 1500 + b"1 (FLAGS)\r\n")  # accepted: merged into one range
        lines += raw.until(b"f ")
        lines.append(b"%.3f" % (time.monotonic() - started))
        return lines, peak / 1e6

    lines, peak = await asyncio.to_thread(run)
    assert lines[:3] == [R.IMAP_LINE_TOO_LONG.encode(), b"d " + R.IMAP_LITERAL_TOO_LARGE.encode(),
                         b"e BAD sequence set too long"]
    assert lines[3:6] == [b"* 1 FETCH (FLAGS (\\Recent))", b"* 2 FETCH (FLAGS (\\Recent))",
                          b"* 3 FETCH (FLAGS (\\Recent))"]
    assert lines[6] == b"f OK FETCH completed" and float(lines[7]) < 1.0
    assert peak < 4, peak


async def test_idle_without_done_is_logged_out_at_the_timeout(start_service) -> None:  # type: ignore[no-untyped-def]
    service = await start_service(imap_idle_timeout_seconds=1.0)

    def run() -> tuple[list[bytes], float, bool]:
        raw = imap_logged_in(service.ports["imap"])
        raw.send(b"b IDLE\r\n")
        assert raw.line().startswith(b"+ ")
        started = time.monotonic()
        lines = raw.until(b"* BYE")
        return lines, time.monotonic() - started, raw.closed()

    lines, waited, closed = await asyncio.to_thread(run)
    assert lines == [R.IMAP_BYE_AUTOLOGOUT.encode()]
    assert 0.8 < waited < 3 and closed


async def test_r_tls_2_login_before_starttls_from_untrusted_address_never_reaches_auth(service) -> None:  # type: ignore[no-untyped-def]
    def run() -> list[bytes]:
        imap = raw_connect(service.ports["imap"], UNTRUSTED_IP)
        imap.line()
        imap.send(f'a LOGIN {BOB} "{BOB_PASSWORD}"\r\nb AUTHENTICATE PLAIN\r\n'.encode())
        lines = imap.until(b"b ")
        pop = raw_connect(service.ports["pop3"], UNTRUSTED_IP)
        pop.line()
        pop.send(f"USER {BOB}\r\nPASS {BOB_PASSWORD}\r\nAUTH PLAIN\r\n".encode())
        return [*lines, pop.line(), pop.line(), pop.line()]

    assert await asyncio.to_thread(run) == [
        b"a " + R.IMAP_PRIVACY_REQUIRED.encode(), b"b " + R.IMAP_PRIVACY_REQUIRED.encode(),
        R.POP3_PLAINTEXT_DISALLOWED.encode(), R.POP3_PLAINTEXT_DISALLOWED.encode(),
        R.POP3_PLAINTEXT_DISALLOWED.encode()]
    assert not service.auth.requests
    assert not service.policy.stages(policy_pb2.STAGE_AUTH)


async def test_slow_loris_one_byte_per_second_cut_by_idle_timeout(start_service) -> None:  # type: ignore[no-untyped-def]
    service = await start_service(imap_idle_timeout_seconds=1.5, pop3_idle_timeout_seconds=1.5,
                                  preauth_timeout_seconds=1.5)

    def trickle(port: int, first: bytes, payload: bytes, stop: bytes) -> tuple[list[bytes], float]:
        raw = raw_connect(port)
        raw.line()
        if first:
            raw.send(first)
            raw.line()  # the "+" continuation
        started = time.monotonic()
        raw.sock.settimeout(0.05)
        received = b""
        for byte in payload:  # one byte a second, never a complete command
            try:
                raw.sock.sendall(bytes([byte]))
            except OSError:
                break
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                try:
                    chunk = raw.sock.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    chunk = b""
                received += chunk
                if not chunk or stop in received:
                    return received.split(b"\r\n")[:-1], time.monotonic() - started
        return received.split(b"\r\n"), time.monotonic() - started

    results = await asyncio.gather(
        asyncio.to_thread(trickle, service.ports["imap"], b"", b"a NOOP and more bytes", b"* BYE"),
        asyncio.to_thread(trickle, service.ports["imap"], b"a LOGIN {30}\r\n", b"y" * 29, b"* BYE"),
        asyncio.to_thread(trickle, service.ports["pop3"], b"", b"USER someone", b"-ERR"),
    )
    (imap_lines, imap_time), (literal_lines, literal_time), (pop_lines, pop_time) = results
    # Cut at the timeout although a byte arrived every second: the deadline is per command.
    assert imap_lines == [R.IMAP_BYE_AUTOLOGOUT.encode()] and 1.2 < imap_time < 3.5
    assert literal_lines == [R.IMAP_BYE_AUTOLOGOUT.encode()] and 1.2 < literal_time < 3.5
    assert pop_lines == [R.POP3_AUTOLOGOUT.encode()] and 1.2 < pop_time < 3.5
    assert service.server.session_count == 0


async def test_flood_of_100_bad_commands_closed_cleanly_after_the_budget(service) -> None:  # type: ignore[no-untyped-def]
    def imap() -> tuple[list[bytes], bool]:
        raw = raw_connect(service.ports["imap"])
        raw.line()
        raw.send(b"".join(b"x%d BOGUS\r\n" % i for i in range(100)))
        lines = raw.until(b"* BYE")
        return lines, raw.closed()

    def pop3() -> tuple[list[bytes], bool]:
        raw = raw_connect(service.ports["pop3"])
        raw.line()
        raw.send(b"BOGUS\r\n" * 100)
        lines = raw.until(R.POP3_TOO_MANY_BAD.encode())
        return lines, raw.closed()

    imap_lines, imap_closed = await asyncio.to_thread(imap)
    pop_lines, pop_closed = await asyncio.to_thread(pop3)
    assert imap_lines == [b"x%d BAD Unknown command or wrong state" % i for i in range(R.MAX_BAD_COMMANDS)] + [
        R.IMAP_BYE_TOO_MANY_BAD.encode()]
    assert pop_lines == [b"-ERR Unknown command"] * R.MAX_BAD_COMMANDS + [R.POP3_TOO_MANY_BAD.encode()]
    assert imap_closed and pop_closed
    assert await asyncio.to_thread(still_serving, service.ports["pop3"], "pop3") == b"+OK"


__all__ = ["socket"]


@pytest.mark.timeout(20)
async def test_list_pattern_built_to_backtrack_answers_at_once(service) -> None:  # type: ignore[no-untyped-def]
    """Issue 9: LIST "" "**********x" against a 60-character folder name (any user can make one)
    kept the replica's event loop busy for minutes; now it is answered like any LIST."""

    def run() -> tuple[list[bytes], list[bytes], list[bytes]]:
        raw = imap_logged_in(service.ports["imap"])
        raw.send(b"c CREATE " + b"a" * 60 + b"\r\n")
        assert raw.until(b"c ")[-1].startswith(b"c OK")
        raw.send(b'd LIST "" "**********x"\r\n')
        evil = raw.until(b"d ")
        raw.send(b'e LIST "" "*%*%*%*%*%*%*%*%*%*%a"\r\n')
        matching = raw.until(b"e ")
        raw.send(b'f LIST "" "' + b"*" * 300 + b'%' * 300 + b'x"\r\n')
        too_long = raw.until(b"f ")
        raw.sock.close()
        return evil, matching, too_long

    evil, matching, too_long = await asyncio.to_thread(run)
    assert evil == [b"d OK LIST completed"]
    assert matching[-1] == b"e OK LIST completed" and any(b"a" * 60 in line for line in matching)
    assert too_long == [b"f BAD LIST pattern too long"]
    assert await asyncio.to_thread(still_serving, service.ports["imap"]) == b"z OK NOOP completed"


async def test_non_ascii_digits_are_protocol_errors_on_imap_and_pop3(service) -> None:  # type: ignore[no-untyped-def]
    # "²" passes str.isdigit() and then breaks int(): a server error before, now a plain refusal.
    await service.deliver(b"Subject: x\r\n\r\nbody\r\n")

    def imap() -> list[bytes]:
        raw = raw_connect(service.ports["imap"])
        raw.line()
        raw.send(f'a LOGIN {BOB} "{BOB_PASSWORD}"\r\nb SELECT INBOX\r\n'.encode())
        raw.until(b"b ")
        raw.send("c FETCH ² FLAGS\r\nd SEARCH ²\r\ne UID FETCH 1:² FLAGS\r\nf NOOP\r\n".encode())
        return [line for line in raw.until(b"f ") if not line.startswith(b"* ")]

    def pop3() -> list[bytes]:
        raw = raw_connect(service.ports["pop3"])
        raw.line()
        raw.send(f"USER {BOB}\r\nPASS {BOB_PASSWORD}\r\n".encode())
        raw.line()
        raw.line()
        raw.send("RETR ²\r\nTOP 1 ²\r\nLIST 1\r\nQUIT\r\n".encode())
        return [raw.line() for _ in range(3)]

    answers = await asyncio.to_thread(imap)
    assert [line.split(b" ")[:2] for line in answers] == [[b"c", b"BAD"], [b"d", b"BAD"], [b"e", b"BAD"],
                                                          [b"f", b"OK"]]
    assert await asyncio.to_thread(pop3) == [b"-ERR Bad message number", b"-ERR Usage: TOP msg lines", b"+OK 1 20"]
