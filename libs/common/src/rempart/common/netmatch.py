"""Is a client address in a list of CIDRs (trusted hosts, load balancers)? One answer for every
service that faces clients."""

from __future__ import annotations

import functools
import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=256)
def _networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    # Parsed once per distinct list (settings change rarely); an invalid entry is skipped, so a
    # typo narrows the list and never widens it.
    out: list[Network] = []
    for entry in entries:
        try:
            out.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            continue
    return tuple(out)


def ip_in_networks(ip: str, entries: list[str]) -> bool:
    """True when ``ip`` is an address inside one of ``entries``; an unparsable ``ip`` is outside."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in network for network in _networks(tuple(entries)))
