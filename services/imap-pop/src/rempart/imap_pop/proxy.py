"""PROXY protocol v1 and v2 (haproxy's proxy-protocol.txt), accepted only from trusted load
balancers (R-OPS-2): from anyone else a PROXY header would let a client choose its own IP.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from rempart.imap_pop.stream import Stream

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the spec's worst case, CRLF included
V2_MAX_BODY = 4096


class ProxyError(ValueError):
    pass


@dataclass(frozen=True)
class ProxyAddress:
    """The real client; None fields mean LOCAL/UNKNOWN: keep the socket's own peer."""

    client_ip: str | None
    client_port: int | None


def parse_v1(line: bytes) -> ProxyAddress:
    """``line`` without its CRLF: ``PROXY TCP4 src dst sport dport`` or ``PROXY UNKNOWN ...``."""
    parts = line.decode("ascii", "strict").split(" ")
    if len(parts) < 2 or parts[0] != "PROXY":
        raise ProxyError("not a PROXY v1 line")
    if parts[1] == "UNKNOWN":
        return ProxyAddress(None, None)
    if parts[1] not in ("TCP4", "TCP6") or len(parts) != 6:
        raise ProxyError("bad PROXY v1 line")
    src = ipaddress.ip_address(parts[2])
    ipaddress.ip_address(parts[3])
    if (src.version == 4) != (parts[1] == "TCP4"):
        raise ProxyError("address family mismatch")
    ports = [int(p) for p in parts[4:6]]
    if any(not 0 <= p <= 65535 or str(p) != s for p, s in zip(ports, parts[4:6], strict=True)):
        raise ProxyError("bad port")
    return ProxyAddress(str(src), ports[0])


def parse_v2(head: bytes, body: bytes) -> ProxyAddress:
    """``head`` is the 16-byte fixed part, ``body`` the address block and TLVs."""
    if head[:12] != V2_SIGNATURE:
        raise ProxyError("bad PROXY v2 signature")
    ver_cmd, family = head[12], head[13]
    if ver_cmd >> 4 != 2:
        raise ProxyError("bad PROXY v2 version")
    command = ver_cmd & 0x0F
    if command == 0:  # LOCAL: the balancer's own health check
        return ProxyAddress(None, None)
    if command != 1:
        raise ProxyError("bad PROXY v2 command")
    if family == 0x11:  # TCP over IPv4
        if len(body) < 12:
            raise ProxyError("short PROXY v2 IPv4 block")
        src = socket.inet_ntop(socket.AF_INET, body[0:4])
        (sport,) = struct.unpack("!H", body[8:10])
        return ProxyAddress(src, sport)
    if family == 0x21:  # TCP over IPv6
        if len(body) < 36:
            raise ProxyError("short PROXY v2 IPv6 block")
        src = socket.inet_ntop(socket.AF_INET6, body[0:16])
        (sport,) = struct.unpack("!H", body[32:34])
        return ProxyAddress(src, sport)
    if family == 0x00:
        return ProxyAddress(None, None)
    raise ProxyError("unsupported PROXY v2 family")


async def read_proxy_header(stream: Stream) -> ProxyAddress:
    """Read one mandatory PROXY header (v1 or v2) from the start of the stream."""
    if not await stream.ensure(5):
        raise ProxyError("connection closed before the PROXY header")
    if stream.peek(5) != b"PROXY" and stream.peek(4) != V2_SIGNATURE[:4]:
        # Neither version can follow: refuse now rather than wait for the header timeout.
        raise ProxyError("no PROXY header from a proxy address")
    if stream.peek(5) == b"PROXY":
        while stream.find(b"\r\n") < 0:
            if stream.pending() >= V1_MAX or not await stream.ensure(stream.pending() + 1):
                raise ProxyError("PROXY v1 line too long or truncated")
        end = stream.find(b"\r\n")
        if end + 2 > V1_MAX:
            raise ProxyError("PROXY v1 line too long")
        line = stream.consume(end + 2)[:-2]
        return parse_v1(line)
    if not await stream.ensure(16):
        raise ProxyError("truncated PROXY v2 header")
    head = stream.peek(16)
    if head[:12] != V2_SIGNATURE:
        raise ProxyError("no PROXY header from a proxy address")
    (length,) = struct.unpack("!H", head[14:16])
    if length > V2_MAX_BODY or not await stream.ensure(16 + length):
        raise ProxyError("PROXY v2 block too long or truncated")
    stream.consume(16)
    return parse_v2(head, stream.consume(length))


def build_v1(client_ip: str, client_port: int, server_ip: str, server_port: int) -> bytes:
    """For tests and tools: the v1 line a balancer would send."""
    family = "TCP6" if ":" in client_ip else "TCP4"
    return f"PROXY {family} {client_ip} {server_ip} {client_port} {server_port}\r\n".encode()


def build_v2(client_ip: str, client_port: int, server_ip: str, server_port: int) -> bytes:
    if ":" in client_ip:
        block = (socket.inet_pton(socket.AF_INET6, client_ip) + socket.inet_pton(socket.AF_INET6, server_ip)
                 + struct.pack("!HH", client_port, server_port))
        family = 0x21
    else:
        block = (socket.inet_pton(socket.AF_INET, client_ip) + socket.inet_pton(socket.AF_INET, server_ip)
                 + struct.pack("!HH", client_port, server_port))
        family = 0x11
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(block)) + block
