"""One reading of ips.blocked events for every edge (R-IPS-4, R-IPS-6)."""

from __future__ import annotations

from rempart.common.ipblocks import read_block_event
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
