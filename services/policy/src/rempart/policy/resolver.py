"""The DNS layer of the policy service (R-DNS-7): dnspython's async resolver behind a TTL cache.

The nameservers come from ``REMPART_DNS_NAMESERVERS`` (``host`` or ``host:port``, IPv6 as
``[addr]:port``; empty = the system's resolv.conf). Answers are cached for their TTL, negative
answers (NXDOMAIN, NODATA) for the SOA minimum (RFC 2308 section 5), the cache is bounded (least
recently used entries go first). A timeout, SERVFAIL or any other failure raises
:class:`DnsTemporaryError`, which every rule turns into a 4xx, never a 5xx: a DNS outage must
never reject good mail permanently. Failures are not cached, so the next message tries again.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.resolver
import dns.reversename
from prometheus_client import Counter

log = logging.getLogger(__name__)

DNS_QUERIES = Counter("rempart_policy_dns_queries_total", "DNS questions", ["rdtype", "outcome"])

MAX_TTL = 86400  # an answer is never trusted longer than a day, whatever its TTL says
DEFAULT_NEGATIVE_TTL = 300  # NXDOMAIN without an SOA (RFC 2308 says: do not cache; we cap low)
MAX_NAME = 253


class DnsTemporaryError(Exception):
    """The question got no usable answer now (timeout, SERVFAIL, refused): try again later."""


@dataclass(frozen=True)
class DnsAnswer:
    records: tuple[dns.rdata.Rdata, ...]
    nxdomain: bool = False

    @property
    def exists(self) -> bool:
        return bool(self.records)

    def texts(self) -> list[str]:
        return [r.to_text() for r in self.records]


def parse_nameservers(text: str) -> list[dns.nameserver.Do53Nameserver]:
    """``"10.0.0.10, 127.0.0.1:5353, [::1]:53"`` -> nameservers; raises ValueError."""
    out: list[dns.nameserver.Do53Nameserver] = []
    for raw in (part.strip() for part in text.split(",")):
        if not raw:
            continue
        host, port = raw, 53
        if raw.startswith("["):
            host, _, rest = raw[1:].partition("]")
            if rest:
                port = int(rest.removeprefix(":"))
        elif raw.count(":") == 1:
            host, _, port_text = raw.partition(":")
            port = int(port_text)
        ipaddress.ip_address(host)  # a nameserver is an address: resolving it would need DNS
        if not 0 < port < 65536:
            raise ValueError(f"bad nameserver port in {raw!r}")
        out.append(dns.nameserver.Do53Nameserver(host, port))
    return out


def reverse_name(ip: str, zone: str = "") -> str:
    """``1.2.0.192.<zone>`` / IPv6 nibbles (RFC 5782 2.1, 2.4); the PTR name without a zone."""
    name = dns.reversename.from_address(ip)
    if not zone:
        return name.to_text()
    suffix = dns.name.from_text("in-addr.arpa." if ":" not in ip else "ip6.arpa.")
    relative = name.relativize(suffix)
    return f"{relative.to_text()}.{zone.strip('.')}."


class CachingResolver:
    """One per process: every rule asks through it, so that the cache is shared."""

    def __init__(self, nameservers: str = "", max_entries: int = 20000) -> None:
        servers = parse_nameservers(nameservers)
        self._resolver = dns.asyncresolver.Resolver(configure=not servers)
        if servers:
            self._resolver.nameservers = servers
        self._resolver.cache = None  # ours knows negative TTLs and its own bound
        self._max_entries = max_entries
        self._cache: OrderedDict[tuple[str, int], tuple[float, DnsAnswer]] = OrderedDict()

    @property
    def cached_entries(self) -> int:
        return len(self._cache)

    def _cached(self, key: tuple[str, int]) -> DnsAnswer | None:
        found = self._cache.get(key)
        if found is None:
            return None
        expires, answer = found
        if expires <= time.monotonic():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return answer

    def _store(self, key: tuple[str, int], answer: DnsAnswer, ttl: float) -> None:
        if ttl <= 0:
            return
        self._cache[key] = (time.monotonic() + min(ttl, MAX_TTL), answer)
        self._cache.move_to_end(key)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)

    async def query(self, name: str, rdtype: str, timeout: float) -> DnsAnswer:
        """The records of ``name``/``rdtype``; empty for NXDOMAIN or NODATA."""
        qname = name.lower().rstrip(".") + "."
        if len(qname) > MAX_NAME + 1:
            return DnsAnswer((), nxdomain=True)
        type_code = dns.rdatatype.from_text(rdtype)
        key = (qname, int(type_code))
        found = self._cached(key)
        if found is not None:
            DNS_QUERIES.labels(rdtype, "cached").inc()
            return found
        try:
            result = await self._resolver.resolve(
                qname, type_code, search=False, raise_on_no_answer=False, lifetime=timeout
            )
        except dns.resolver.NXDOMAIN as exc:
            DNS_QUERIES.labels(rdtype, "nxdomain").inc()
            answer = DnsAnswer((), nxdomain=True)
            self._store(key, answer, _negative_ttl(_nx_response(exc, qname)))
            return answer
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.YXDOMAIN) as exc:
            DNS_QUERIES.labels(rdtype, "temporary").inc()
            raise DnsTemporaryError(f"{rdtype} {qname}: {exc.__class__.__name__}") from exc
        except dns.exception.DNSException as exc:
            DNS_QUERIES.labels(rdtype, "temporary").inc()
            raise DnsTemporaryError(f"{rdtype} {qname}: {exc}") from exc
        if result.rrset is None:
            DNS_QUERIES.labels(rdtype, "nodata").inc()
            answer = DnsAnswer(())
            self._store(key, answer, _negative_ttl(result.response))
            return answer
        DNS_QUERIES.labels(rdtype, "answer").inc()
        answer = DnsAnswer(tuple(result.rrset))
        self._store(key, answer, result.rrset.ttl)
        return answer

    async def addresses(self, name: str, timeout: float) -> set[str]:
        """A and AAAA of ``name``, as compressed address texts."""
        out: set[str] = set()
        for rdtype in ("A", "AAAA"):
            for record in (await self.query(name, rdtype, timeout)).records:
                out.add(ipaddress.ip_address(record.to_text()).compressed)
        return out


def _nx_response(exc: dns.resolver.NXDOMAIN, qname: str) -> dns.message.Message | None:
    try:
        response = exc.response(dns.name.from_text(qname))  # type: ignore[no-untyped-call]
    except (KeyError, IndexError, AttributeError):
        return None
    return response if isinstance(response, dns.message.Message) else None


def _negative_ttl(response: dns.message.Message | None) -> float:
    """RFC 2308 5: min(SOA TTL, SOA MINIMUM) of the authority section."""
    if response is None:
        return DEFAULT_NEGATIVE_TTL
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            minimum = int(rrset[0].minimum)
            return float(min(rrset.ttl, minimum))
    return DEFAULT_NEGATIVE_TTL
