"""The one CIDR check of the client-facing services (trusted hosts R-REL-1/R-TLS-2, PROXY R-OPS-2)."""

from __future__ import annotations

from rempart.common.netmatch import ip_in_networks


def test_addresses_inside_and_outside_the_lists() -> None:
    trusted = ["127.0.0.1", "::1", "10.0.0.0/8", "not-a-network", "2001:db8::/32"]
    assert ip_in_networks("127.0.0.1", trusted)
    assert ip_in_networks("10.200.3.4", trusted)
    assert ip_in_networks("2001:db8::25", trusted)
    assert not ip_in_networks("127.0.0.2", trusted)
    assert not ip_in_networks("192.0.2.1", trusted)
    # A typo in the list and an unparsable client address never count as inside.
    assert not ip_in_networks("not-a-network", trusted)
    assert not ip_in_networks("", trusted)
    assert not ip_in_networks("127.0.0.1", [])
