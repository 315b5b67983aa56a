"""A small authoritative DNS server on loopback, for tests: real DNS packets, no mocks.

It answers UDP and TCP (RFC 1035 4.2.2 length-prefixed) on one port from zone data held in
memory, built on dnspython's message codec. Names it does not know are NXDOMAIN; a known name
without the asked type is NODATA. Negative answers carry the SOA in the authority section, whose
minimum is the negative-caching TTL (RFC 2308 section 5). Tests can make it stop answering
(to provoke resolver timeouts) or answer SERVFAIL, for every name or for chosen names, and can
read which questions reached it (to prove a cache answered instead).

    async with LoopbackDnsServer({"example.com": {"MX": ["10 mx.example.com."]}}) as dns:
        resolver.nameservers = [dns.address]   # "127.0.0.1:<port>"
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

log = logging.getLogger(__name__)

Mode = Literal["answer", "silent", "servfail"]
ZoneData = Mapping[str, Mapping[str, Sequence[str]]]

UDP_PAYLOAD = 512  # without EDNS (RFC 1035 4.2.1); larger answers are truncated, TC set
MAX_TCP_MESSAGE = 65535


@dataclass
class _Entry:
    values: list[str]
    ttl: int


@dataclass
class LoopbackDnsServer:
    """Zone data is ``{name: {rdtype: [rdata text, ...]}}``; names are case-insensitive."""

    zone: ZoneData = field(default_factory=dict)
    ttl: int = 300
    soa_minimum: int = 60
    host: str = "127.0.0.1"
    mode: Mode = "answer"
    silent_names: set[str] = field(default_factory=set)
    servfail_names: set[str] = field(default_factory=set)
    queries: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0
    _records: dict[str, dict[str, _Entry]] = field(default_factory=dict, init=False)
    _udp: asyncio.DatagramTransport | None = field(default=None, init=False)
    _tcp: asyncio.Server | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        for name, types in self.zone.items():
            for rdtype, values in types.items():
                self.set(name, rdtype, *values)

    # Zone data -----------------------------------------------------------------------------
    @staticmethod
    def _key(name: str) -> str:
        return name.lower().rstrip(".") + "."

    def set(self, name: str, rdtype: str, *values: str, ttl: int | None = None) -> None:
        """Replace ``name``'s ``rdtype`` records (no values: the name exists with no data)."""
        types = self._records.setdefault(self._key(name), {})
        if values:
            types[rdtype.upper()] = _Entry(list(values), self.ttl if ttl is None else ttl)

    def remove(self, name: str) -> None:
        self._records.pop(self._key(name), None)

    @property
    def address(self) -> str:
        """``host:port``, the form ``REMPART_DNS_NAMESERVERS`` takes."""
        return f"{self.host}:{self.port}"

    def asked(self, name: str, rdtype: str) -> int:
        """How many times the question reached this server."""
        return self.queries.count((self._key(name), rdtype.upper()))

    # Serving -------------------------------------------------------------------------------
    def _soa(self) -> dns.rrset.RRset:
        soa = dns.rrset.from_text(
            ".", self.soa_minimum, "IN", "SOA",
            f"ns.test. hostmaster.test. 1 3600 600 86400 {self.soa_minimum}",
        )
        return soa

    def respond(self, wire: bytes) -> dns.message.Message | None:
        """The response to one query, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None  # not DNS: a real server drops it too
        if not query.question:
            return None
        question = query.question[0]
        qname = question.name.to_text().lower()
        qtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((qname, qtype))
        if self.mode == "silent" or qname.rstrip(".") in self.silent_names:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if self.mode == "servfail" or qname.rstrip(".") in self.servfail_names:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        types = self._records.get(qname)
        if types is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(self._soa())
            return response
        entry = types.get(qtype)
        if entry is None:
            response.authority.append(self._soa())  # NODATA
            return response
        rrset = dns.rrset.from_text_list(question.name, entry.ttl, dns.rdataclass.IN, qtype, entry.values)
        response.answer.append(rrset)
        return response

    def _udp_wire(self, response: dns.message.Message, query_payload: int) -> bytes:
        try:
            return response.to_wire(max_size=max(UDP_PAYLOAD, query_payload))
        except dns.exception.TooBig:
            # RFC 2181 9: set TC and let the client retry over TCP.
            response.answer.clear()
            response.authority.clear()
            response.flags |= dns.flags.TC
            return response.to_wire()

    async def start(self) -> LoopbackDnsServer:
        loop = asyncio.get_running_loop()
        server = self

        class _Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                response = server.respond(data)
                if response is None:
                    return
                payload = response.request_payload if response.edns >= 0 else UDP_PAYLOAD
                server._udp_send(server._udp_wire(response, payload), addr)

        for _attempt in range(20):
            transport, _ = await loop.create_datagram_endpoint(_Udp, local_addr=(self.host, self.port))
            port = int(transport.get_extra_info("sockname")[1])
            try:
                tcp = await asyncio.start_server(self._serve_tcp, self.host, port)
            except OSError:
                transport.close()  # the TCP twin of this UDP port is taken: try another port
                if self.port:
                    raise
                continue
            self._udp = transport
            self._tcp = tcp
            self.port = port
            return self
        raise RuntimeError("no free UDP+TCP port pair for the DNS server")

    def _udp_send(self, wire: bytes, addr: tuple[str, int]) -> None:
        if self._udp is not None:
            self._udp.sendto(wire, addr)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(2)
                (length,) = struct.unpack("!H", header)
                wire = await reader.readexactly(length)
                response = self.respond(wire)
                if response is None:
                    continue  # silent: the client times out
                out = response.to_wire(max_size=MAX_TCP_MESSAGE)
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
            self._tcp = None

    async def __aenter__(self) -> LoopbackDnsServer:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
