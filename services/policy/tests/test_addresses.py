"""Relay tricks (one regression test per known attack) and address normalisation."""

from __future__ import annotations

import pytest
from policy_testkit import Policy

from rempart.common.pb.policy.v1 import policy_pb2 as pb
from rempart.policy.addresses import AddressError, parse_address, parse_sender

WE_DO_NOT_RELAY = "we do not relay"


@pytest.mark.parametrize(
    ("raw", "address"),
    [
        ("<Bob@Example.ORG>", "bob@example.org"),
        ("bob@example.org.", "bob@example.org"),
        ("<@relay.one,@relay.two:bob@example.org>", "bob@example.org"),
        ('"bob"@example.org', "bob@example.org"),
        ('"user@remote.example"@example.org', "user@remote.example@example.org"),
        ('"a\\"b"@example.org', 'a"b@example.org'),
        ("user%remote.example@example.org", "user%remote.example@example.org"),
        ("remote.example!user@example.org", "remote.example!user@example.org"),
        ("bob@[192.0.2.1]", "bob@[192.0.2.1]"),
        ("bob@[IPv6:2001:DB8::0:1]", "bob@[ipv6:2001:db8::1]"),
    ],
)
def test_normalises(raw: str, address: str) -> None:
    assert parse_address(raw).address == address


@pytest.mark.parametrize(
    "raw",
    ["", "<>", "bob", "bob@", "@example.org", "bob@exa mple.org", "bo b@example.org", "bob@[300.1.1.1]",
     "bob@-bad.org", '"unterminated@example.org', "@relay.one", ".bob@example.org", "bob..x@example.org",
     "bob@localhost", "x" * 65 + "@example.org", "bob@" + "a" * 250 + ".org", "bob\x00@example.org",
     '"bo\x01b"@example.org'],
)
def test_refuses(raw: str) -> None:
    with pytest.raises(AddressError):
        parse_address(raw)


def test_null_sender() -> None:
    assert parse_sender("<>") is None
    assert parse_sender("") is None
    sender = parse_sender("<Bob@Example.org>")
    assert sender is not None and sender.address == "bob@example.org"


@pytest.mark.parametrize(
    ("recipient", "shown"),
    [
        ("user%remote.example@example.org", "user%remote.example@example.org"),
        ("remote.example!user@example.org", "remote.example!user@example.org"),
        ('"user@remote.example"@example.org', "user@remote.example@example.org"),
        ("bob%remote.example@example.org", "bob%remote.example@example.org"),
        ('"bob%remote.example"@example.net', "bob%remote.example@example.net"),
    ],
)
async def test_r_rel_1_routing_characters_in_local_domain_are_unknown_users(
    policy: Policy, recipient: str, shown: str
) -> None:
    verdict = await policy.rcpt(recipient)
    assert (verdict.action, verdict.code, verdict.enhanced_code, verdict.text) == (
        pb.ACTION_REJECT, 550, "5.1.1", f"<{shown}>... Unknown user"
    )
    assert list(verdict.remote_recipients) == []


@pytest.mark.parametrize(
    "recipient",
    ["<@example.org:victim@remote.example>", "victim@remote.example.", "victim@[192.0.2.1]", "VICTIM@Remote.Example"],
)
async def test_r_rel_1_source_routes_trailing_dots_and_literals_are_relay(policy: Policy, recipient: str) -> None:
    verdict = await policy.rcpt(recipient)
    assert (verdict.action, verdict.code, verdict.enhanced_code) == (pb.ACTION_REJECT, 550, "5.7.1")
    assert WE_DO_NOT_RELAY in verdict.text


async def test_trailing_dot_local_domain_is_local(policy: Policy) -> None:
    verdict = await policy.rcpt("bob@example.org.")
    assert list(verdict.local_mailboxes) == ["bob@example.org"]


async def test_bad_recipient_syntax(policy: Policy) -> None:
    verdict = await policy.rcpt("not an address")
    assert (verdict.action, verdict.code, verdict.enhanced_code, verdict.text) == (
        pb.ACTION_REJECT, 501, "5.1.3", "Bad recipient address syntax"
    )
