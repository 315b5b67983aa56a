"""One reading of ips.blocked events for every edge (R-IPS-4, R-IPS-6), and one definition of a
block's subject, record and lifting for the policy and the admin API (R-IPS-5)."""

from __future__ import annotations

import ipaddress
import json

import redis.asyncio as aioredis

from rempart.common import keys
from rempart.common.config import MailSettings
from rempart.common.ipblocks import block_document, intrusion_subject, never_blocked, read_block_event, unblock
from rempart.common.pb.events.v1 import events_pb2


def test_r_ips_6_a_prefix_block_covers_its_whole_network_and_nothing_else() -> None:
    event = events_pb2.Event(client_ip="2001:db8:1:2::10", attributes={"prefix": "2001:db8:1:2::/64"})
    scope = read_block_event(event.SerializeToString())
    assert scope is not None
    assert scope.covers("2001:db8:1:2::10") and scope.covers("2001:db8:1:2:abcd::1")
    assert not scope.covers("2001:db8:1:3::10") and not scope.covers("192.0.2.1")
    assert scope.refusal == "Intrusion prevention active for [2001:db8:1:2::10]"


def test_r_ips_4_an_address_block_covers_that_address_in_either_spelling() -> None:
    scope = read_block_event(events_pb2.Event(client_ip="192.0.2.7").SerializeToString())
    assert scope is not None
    assert scope.covers("192.0.2.7") and scope.covers("::ffff:192.0.2.7")
    assert not scope.covers("192.0.2.8") and not scope.covers("not an ip")


def test_malformed_or_empty_events_are_ignored() -> None:
    assert read_block_event(b"\xff not a protobuf") is None
    assert read_block_event(events_pb2.Event().SerializeToString()) is None


def test_r_ips_6_the_subject_of_a_client_is_its_prefix_or_its_ipv4_address() -> None:
    v6 = ipaddress.ip_address("2001:db8:1:2:abcd::5")
    assert intrusion_subject(v6, 64) == ("2001:db8:1:2::", "2001:db8:1:2::/64")
    assert intrusion_subject(v6, 128) == ("2001:db8:1:2:abcd::5", "")
    assert intrusion_subject(ipaddress.ip_address("::ffff:192.0.2.9"), 64) == ("192.0.2.9", "")
    assert intrusion_subject(ipaddress.ip_address("192.0.2.9"), 64) == ("192.0.2.9", "")


def test_r_ips_5_trusted_hosts_and_the_whitelist_are_never_blocked() -> None:
    settings = MailSettings.model_validate({"ips": {"whitelist": ["198.51.100.0/24", "2001:db8:9::/48"]}})
    for ip in ("127.0.0.1", "::1", "198.51.100.7", "::ffff:198.51.100.7", "2001:db8:9:1::1"):
        assert never_blocked(ipaddress.ip_address(ip), settings), ip
    for ip in ("192.0.2.1", "2001:db8:8::1"):
        assert not never_blocked(ipaddress.ip_address(ip), settings), ip


def test_r_ips_5_a_block_document_holds_what_the_listing_shows() -> None:
    doc = json.loads(block_document(reason="spam run", blocked_at=10.0, expires_at=70.0, client_ip="2001:db8::5",
                                    prefix="2001:db8::/64", session_id="s" * 300, blocked_by="root@example.org"))
    assert doc == {"reason": "spam run", "blocked_at": 10.0, "expires_at": 70.0, "protocol": "",
                   "session_id": "s" * 128, "client_ip": "2001:db8::5", "prefix": "2001:db8::/64",
                   "blocked_by": "root@example.org"}
    assert "prefix" not in json.loads(block_document(reason="x", blocked_at=1, expires_at=2, client_ip="192.0.2.1"))


async def test_r_ips_5_unblock_lifts_the_block_and_clears_every_counter(redis: aioredis.Redis) -> None:
    subject = "192.0.2.44"
    await redis.set(keys.ips_block(subject), "{}", ex=60)
    await redis.zadd(keys.IPS_BLOCKS, {subject: 1e12})
    for trigger in keys.IPS_TRIGGERS:
        await redis.set(keys.ips_counter(trigger, subject), 3)
    await redis.zadd(keys.ips_connections(subject), {"session": 1})
    await redis.set(keys.ips_known(subject), "user@example.org")
    assert await unblock(redis, subject) is True
    assert await redis.exists(keys.ips_block(subject), keys.ips_connections(subject)) == 0
    assert await redis.zscore(keys.IPS_BLOCKS, subject) is None
    assert await redis.keys(keys.ips_counter("*", subject)) == []
    assert await redis.get(keys.ips_known(subject)) == "user@example.org"  # a login, not a verdict
    assert await unblock(redis, subject) is False
