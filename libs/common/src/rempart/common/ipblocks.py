"""What an ``ips.blocked`` event covers, read the same way by every edge (R-IPS-4, R-IPS-6).

Policy announces each block on ``rempart.events.ips.blocked``; when the setting says so, every
edge replica closes the open connections the block covers at once. For IPv6 a block covers the
client's whole prefix (the event's ``prefix`` attribute, e.g. ``2001:db8:1:2::/64``), so the
other addresses of that /64 are closed as well, not only the one that tripped it.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from rempart.common.netmatch import ip_in_networks
from rempart.common.pb.events.v1 import events_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockedScope:
    ip: str  # the address that tripped the block, as the refusal text names it
    prefix: str  # the IPv6 network the block covers, or ""

    def covers(self, client_ip: str) -> bool:
        if client_ip == self.ip:
            return True
        if self.prefix:
            return ip_in_networks(client_ip, [self.prefix])
        return _same_address(client_ip, self.ip)

    @property
    def refusal(self) -> str:
        return f"Intrusion prevention active for [{self.ip}]"


def _same_address(a: str, b: str) -> bool:
    # ::ffff:192.0.2.1 and 192.0.2.1 are one client.
    try:
        first, second = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return False
    first = first.ipv4_mapped or first if isinstance(first, ipaddress.IPv6Address) else first
    second = second.ipv4_mapped or second if isinstance(second, ipaddress.IPv6Address) else second
    return first == second


def read_block_event(data: bytes) -> BlockedScope | None:
    """The scope of a block announcement; None (logged) for a malformed one, which is ignored."""
    try:
        event = events_pb2.Event.FromString(data)
    except Exception:  # noqa: BLE001 - protobuf raises DecodeError and others; never fatal
        log.warning("malformed ips.blocked event ignored")
        return None
    if not event.client_ip:
        return None
    return BlockedScope(ip=event.client_ip, prefix=event.attributes.get("prefix", ""))
