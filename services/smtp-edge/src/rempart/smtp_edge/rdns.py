"""The client's reverse DNS name for the Received header (R-TLS-5 "add the client's rDNS").

Looked up once per session in the background, never holding up the greeting; a name is used
only when it resolves back to the client's address (forward-confirmed), so a PTR record that
lies cannot put a trusted-looking name into the trace.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import OrderedDict

import dns.asyncresolver
import dns.exception
import dns.resolver
import dns.reversename

CACHE_SIZE = 10_000
NEGATIVE_TTL = 300.0


class ReverseNames:
    def __init__(self, nameservers: list[str], timeout: float = 2.0) -> None:
        self._resolver = dns.asyncresolver.Resolver(configure=not nameservers)
        if nameservers:
            self._resolver.nameservers = []
            for entry in nameservers:
                host, _, port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
                self._resolver.nameservers.append(host)
                if port:
                    self._resolver.port = int(port)
        self._resolver.lifetime = timeout
        self._cache: OrderedDict[str, tuple[float, str]] = OrderedDict()

    async def lookup(self, ip: str) -> str:
        """The forward-confirmed name of ``ip``, or "" (no PTR, mismatch, timeout)."""
        now = time.monotonic()
        cached = self._cache.get(ip)
        if cached is not None and cached[0] > now:
            self._cache.move_to_end(ip)
            return cached[1]
        name, ttl = await self._resolve(ip)
        self._cache[ip] = (now + ttl, name)
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return name

    async def _resolve(self, ip: str) -> tuple[str, float]:
        try:
            address = ipaddress.ip_address(ip)
            answer = await self._resolver.resolve(dns.reversename.from_address(ip), "PTR")
            name = str(answer[0].target).rstrip(".")
            forward = await self._resolver.resolve(name, "AAAA" if address.version == 6 else "A")
            if any(ipaddress.ip_address(r.address) == address for r in forward):
                return name.lower()[:253], float(min(answer.rrset.ttl, forward.rrset.ttl))  # type: ignore[union-attr]
            return "", NEGATIVE_TTL
        except (ValueError, dns.exception.DNSException):
            return "", NEGATIVE_TTL
        except asyncio.CancelledError:
            raise
