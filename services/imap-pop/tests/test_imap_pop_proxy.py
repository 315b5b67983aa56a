"""PROXY protocol v1/v2 (R-OPS-2): parsing, and only from trusted balancer addresses."""

from __future__ import annotations

import asyncio

import pytest
from imappop_helpers import BLOCKED_IP, BLOCKED_TEXT, raw_connect

from rempart.imap_pop.proxy import ProxyError, build_v1, build_v2, parse_v1, parse_v2


def test_parse_v1() -> None:
    address = parse_v1(build_v1("192.0.2.7", 40000, "198.51.100.1", 143)[:-2])
    assert (address.client_ip, address.client_port) == ("192.0.2.7", 40000)
    assert parse_v1(b"PROXY UNKNOWN").client_ip is None
    for bad in (b"PROXY TCP4 ::1 ::1 1 2", b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1", b"PROXY TCP4 a b c d", b"HELLO"):
        with pytest.raises((ProxyError, ValueError)):
            parse_v1(bad)


def test_parse_v2() -> None:
    header = build_v2("2001:db8::5", 1234, "2001:db8::1", 993)
    address = parse_v2(header[:16], header[16:])
    assert (address.client_ip, address.client_port) == ("2001:db8::5", 1234)
    local = header[:12] + bytes([0x20, 0x00, 0, 0])
    assert parse_v2(local, b"").client_ip is None
    with pytest.raises(ProxyError):
        parse_v2(header[:12] + bytes([0x21, 0x11, 0, 4]), b"\0\0\0\0")


@pytest.mark.timeout(60)
async def test_r_ops_2_proxy_header_sets_client_ip(start_service) -> None:  # type: ignore[no-untyped-def]
    service = await start_service(proxy_cidrs="127.0.0.1/32")

    def run() -> list[bytes]:
        lines = []
        for header in (build_v1(BLOCKED_IP, 5555, "127.0.0.1", 143), build_v2(BLOCKED_IP, 5555, "127.0.0.1", 143)):
            raw = raw_connect(service.ports["imap"])
            raw.send(header)
            lines.append(raw.line())
        raw = raw_connect(service.ports["imap"])
        raw.send(b"a NOOP\r\n")  # no header from a balancer address: refused
        lines.append(b"closed" if raw.closed() else b"open")
        return lines

    assert await asyncio.to_thread(run) == [f"* BYE {BLOCKED_TEXT}".encode()] * 2 + [b"closed"]


@pytest.mark.timeout(60)
async def test_r_ops_2_proxy_header_ignored_from_untrusted_peer(service) -> None:  # type: ignore[no-untyped-def]
    def run() -> list[bytes]:
        raw = raw_connect(service.ports["imap"])
        greeting = raw.line()
        raw.send(build_v1(BLOCKED_IP, 5555, "127.0.0.1", 143))
        return [greeting, raw.line()]

    greeting, reply = await asyncio.to_thread(run)
    assert greeting.startswith(b"* OK")
    assert reply == b"PROXY BAD Unknown command or wrong state"  # just a bogus command
