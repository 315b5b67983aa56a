"""The DNS layer on its own (R-DNS-7): nameserver settings, the bounded TTL cache, failures."""

from __future__ import annotations

import pytest

from rempart.common.testing.dnsserver import LoopbackDnsServer
from rempart.policy.resolver import CachingResolver, DnsTemporaryError, parse_nameservers, reverse_name


def test_nameserver_setting_forms() -> None:
    servers = parse_nameservers("10.0.0.10, 127.0.0.1:5353,[::1]:5300, 2001:db8::53")
    assert [(s.address, s.port) for s in servers] == [
        ("10.0.0.10", 53), ("127.0.0.1", 5353), ("::1", 5300), ("2001:db8::53", 53)
    ]
    assert parse_nameservers("") == []
    for bad in ("dns.example.com", "127.0.0.1:0", "127.0.0.1:x"):
        with pytest.raises(ValueError):
            parse_nameservers(bad)


def test_reverse_names_for_dnsbl_zones() -> None:
    assert reverse_name("192.0.2.1", "zen.test") == "1.2.0.192.zen.test."
    assert reverse_name("2001:db8::1", "zen.test").startswith("1.0.0.0.")
    assert reverse_name("2001:db8::1", "zen.test").endswith(".8.b.d.0.1.0.0.2.zen.test.")
    assert reverse_name("192.0.2.1") == "1.2.0.192.in-addr.arpa."


async def test_r_dns_7_cache_is_bounded_and_failures_are_not_cached() -> None:
    zone = {f"h{n}.example": {"A": [f"192.0.2.{n}"]} for n in range(5)}
    async with LoopbackDnsServer(zone) as server:
        resolver = CachingResolver(server.address, max_entries=3)
        for n in range(5):
            assert (await resolver.query(f"h{n}.example", "A", 1)).texts() == [f"192.0.2.{n}"]
        assert resolver.cached_entries == 3
        await resolver.query("h4.example", "A", 1)  # recent: still cached
        await resolver.query("h0.example", "A", 1)  # least recently used: evicted, asked again
        assert (server.asked("h4.example", "A"), server.asked("h0.example", "A")) == (1, 2)
        server.servfail_names.add("h9.example")
        for _ in range(2):
            with pytest.raises(DnsTemporaryError):
                await resolver.query("h9.example", "A", 1)
        assert server.asked("h9.example", "A") == 2
