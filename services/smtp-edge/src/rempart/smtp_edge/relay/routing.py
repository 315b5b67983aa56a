"""Where mail for a domain goes (R-OUT-1): a smarthost override, else the MX records in
preference order, else the domain's own address records (RFC 5321 5.1 "implicit MX").

A null MX (RFC 7505: one MX record whose exchange is ".") means the domain accepts no mail:
that is a permanent failure, bounced at once. A DNS timeout or SERVFAIL is temporary (R-DNS-7:
a DNS timeout never becomes a 5xx); a domain that does not exist is permanent.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from rempart.common.config import SmarthostTransport
from rempart.smtp_edge.relay.replies import Reply


@dataclass(frozen=True)
class MailHost:
    """One host to try: ``name`` for TLS (SNI and certificate checks), ``port`` to connect to."""

    name: str
    port: int
    preference: int = 0


@dataclass(frozen=True)
class Route:
    domain: str
    hosts: list[MailHost]
    smarthost: SmarthostTransport | None = None
    transport_key: str = ""  # the transports entry that matched ("" for MX delivery)


@dataclass
class RouteError(Exception):
    reply: Reply

    def __str__(self) -> str:
        return str(self.reply)


@dataclass
class Router:
    """Resolves destinations through the configured resolvers (``REMPART_DNS_NAMESERVERS``).

    dnspython's cache keeps answers for their TTL (R-DNS-7), so a queue full of mail for one
    domain asks once.
    """

    nameservers: list[str]
    timeout: float = 5.0
    mx_port: int = 25
    _resolver: dns.asyncresolver.Resolver = field(init=False)

    def __post_init__(self) -> None:
        self._resolver = dns.asyncresolver.Resolver(configure=not self.nameservers)
        if self.nameservers:
            self._resolver.nameservers = []
            for entry in self.nameservers:
                host, _, port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
                self._resolver.nameservers.append(host)
                if port:
                    self._resolver.port = int(port)
        self._resolver.lifetime = self.timeout
        self._resolver.cache = dns.resolver.LRUCache(50_000)

    async def route(self, domain: str, transports: dict[str, SmarthostTransport]) -> Route:
        domain = domain.lower().rstrip(".")
        key = domain if domain in transports else ("*" if "*" in transports else "")
        if key:
            transport = transports[key]
            return Route(domain, await self._smarthost_hosts(transport.host), transport, key)
        return Route(domain, await self.mx_hosts(domain))

    async def _smarthost_hosts(self, spec: str) -> list[MailHost]:
        """Postfix's syntax: ``[host]:port`` is that host; ``host:port`` looks up host's MX."""
        spec = spec.strip()
        if spec.startswith("["):
            host, _, rest = spec[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else 25
            return [MailHost(host, port)]
        host, _, port_text = spec.rpartition(":") if ":" in spec else (spec, "", "")
        port = int(port_text) if port_text else 25
        return [MailHost(h.name, port, h.preference) for h in await self.mx_hosts(host)]

    async def mx_hosts(self, domain: str) -> list[MailHost]:
        try:
            answer = await self._resolver.resolve(domain, "MX", search=False)
        except dns.resolver.NXDOMAIN:
            raise RouteError(Reply(550, "5.1.2", f"Domain {domain} does not exist")) from None
        except dns.resolver.NoAnswer:
            # No MX: the domain itself is the mail host if it has an address (RFC 5321 5.1).
            if await self.addresses(domain):
                return [MailHost(domain, self.mx_port)]
            raise RouteError(Reply(550, "5.1.2", f"Domain {domain} has no MX and no address")) from None
        except dns.exception.DNSException as exc:
            raise RouteError(Reply(451, "4.4.3", f"DNS lookup for {domain} failed: {type(exc).__name__}")) from None
        records = [(int(r.preference), str(r.exchange).rstrip(".").lower()) for r in answer]  # type: ignore[attr-defined]
        if any(name == "" for _, name in records):
            # RFC 7505 3: a null MX says the domain accepts no mail at all.
            raise RouteError(Reply(556, "5.1.10", f"Domain {domain} does not accept mail (null MX)"))
        # RFC 5321 5.1: lowest preference first; equal preferences in random order.
        random.shuffle(records)
        records.sort(key=lambda r: r[0])
        return [MailHost(name, self.mx_port, pref) for pref, name in records]

    async def txt(self, name: str) -> list[str] | None:
        """The TXT records of ``name``, each one's strings joined (RFC 7208 3.3 / RFC 8461 3.1);
        [] when there are none, None when DNS did not answer."""
        try:
            answer = await self._resolver.resolve(name, "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException:
            return None
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]  # type: ignore[attr-defined]

    async def addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses of ``host`` ([] when it has none); DNS failures raise
        :class:`RouteError` with a temporary reply."""
        try:
            literal = ipaddress.ip_address(host)
            return [str(literal)]
        except ValueError:
            pass
        out: list[str] = []
        failures = 0
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(host, rdtype, search=False)
                out.extend(str(r.address) for r in answer)  # type: ignore[attr-defined]
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException:
                failures += 1
        if not out and failures:
            raise RouteError(Reply(451, "4.4.3", f"DNS lookup for {host} failed"))
        return out
