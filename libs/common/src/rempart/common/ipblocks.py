"""Intrusion-prevention blocks, one definition for whoever makes, lifts or enforces them.

What a block is named by (:func:`intrusion_subject`), the record it keeps
(:func:`block_document`), its lifting (:func:`unblock`) and who is never blocked
(:func:`never_blocked`) are shared by the policy service, which counts and blocks, and the admin
API, which lists, adds and removes blocks by hand (R-IPS-5): a block the admin API makes is the
one the policy enforces, and the address an administrator unblocks finds it.

Policy announces each block on ``rempart.events.ips.blocked``; when the setting says so, every
edge replica closes the open connections the block covers at once. For IPv6 a block covers the
client's whole prefix (the event's ``prefix`` attribute, e.g. ``2001:db8:1:2::/64``), so the
other addresses of that /64 are closed as well, not only the one that tripped it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from dataclasses import dataclass

import redis.asyncio as aioredis

from rempart.common import keys
from rempart.common.config import MailSettings
from rempart.common.netmatch import ip_in_networks
from rempart.common.pb.events.v1 import events_pb2

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

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


def intrusion_subject(ip: Address, ipv6_prefix_length: int) -> tuple[str, str]:
    """R-IPS-6: what intrusion prevention counts and blocks for a client address, as
    (subject, prefix).

    An IPv4 address is its own subject, also when an IPv4-mapped IPv6 address carries it (else
    every mapped client would share ``::ffff:0:0/96``'s one prefix). An IPv6 client picks any
    address of its prefix at will (RFC 8981 temporary addresses, or a script walking its /64),
    so counting per address would let it dodge every counter: its subject is the network
    address of its prefix, a plain address so that the admin API's ``/v1/ips/blocks/{ip}`` can
    name it, and ``prefix`` names the network (``2001:db8:1:2::/64``); "" for a single address.
    """
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address) or ipv6_prefix_length >= 128:
        return ip.compressed, ""
    network = ipaddress.IPv6Network((ip, ipv6_prefix_length), strict=False)
    return network.network_address.compressed, network.compressed


def never_blocked(ip: Address, settings: MailSettings) -> bool:
    """R-IPS-5: trusted hosts (``relay.trusted_hosts``) and the IPS whitelist are never counted
    nor blocked, so a block of theirs would never be enforced. (The policy also exempts the
    addresses its trusted host *names* resolve to, known only to it.)"""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    text = ip.compressed
    return ip_in_networks(text, settings.relay.trusted_hosts) or ip_in_networks(text, settings.ips.whitelist)


def block_document(*, reason: str, blocked_at: float, expires_at: float, client_ip: str, prefix: str = "",
                   protocol: str = "", session_id: str = "", blocked_by: str = "") -> str:
    """The JSON a block's key holds (``keys.ips_block(subject)``), as ``GET /v1/ips/blocks`` shows
    it: why, when, until when, the address that tripped it and, for IPv6, the prefix it covers;
    ``blocked_by`` names the administrator of a block made by hand."""
    doc: dict[str, str | float] = {
        "reason": reason, "blocked_at": blocked_at, "expires_at": expires_at, "protocol": protocol,
        "session_id": session_id[:128], "client_ip": client_ip,
    }
    if prefix:
        doc["prefix"] = prefix
    if blocked_by:
        doc["blocked_by"] = blocked_by
    return json.dumps(doc)


async def unblock(redis: aioredis.Redis, subject: str) -> bool:
    """Remove a block and the subject's intrusion counters (connections, failed logins, unknown
    recipients, relay denials, RSETs, open sessions), so that its next connection does not count
    on from where the block began and block it again at once; True if a block was there.
    ``subject`` is the block's name (:func:`intrusion_subject`). A known-IP record (R-IPS-6)
    stays: it says the user logged in, not that it was good."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.ips_block(subject))
        pipe.zrem(keys.IPS_BLOCKS, subject)
        pipe.delete(*(keys.ips_counter(trigger, subject) for trigger in keys.IPS_TRIGGERS),
                    keys.ips_connections(subject))
        removed = await pipe.execute()
    return any(int(n) for n in removed[:2])
