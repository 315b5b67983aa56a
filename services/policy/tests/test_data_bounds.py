"""Issue 11: an accepted recipient's verdict carries the DATA stage's bounds, so that the edge asks
nothing at DATA for a message within them. The bounds must say exactly what the DATA pipeline
decides: on each side of each bound, for each rule that sets one (R-LIM-5, R-LIM-7, R-IPS-3).
Likewise an accepted MAIL verdict says for how long and up to which SIZE= the session may give it
again to the same sender (Verdict.reuse): its size bound is the MAIL stage's own (R-LIM-7)."""

from __future__ import annotations

from typing import Any

import pytest
from policy_testkit import TRUSTED_IP, Policy

from rempart.common.pb.policy.v1 import policy_pb2 as pb

BOB = "bob@example.org"


async def bounds_of(policy: Policy, ip: str, account: str = "", **kw: Any) -> tuple[int, int]:
    verdict = await policy.rcpt(BOB, ip=ip, account=account, **kw)
    assert verdict.action == pb.ACTION_ACCEPT
    assert verdict.HasField("data_bounds")
    return verdict.data_bounds.max_size, verdict.data_bounds.max_hops


async def data(policy: Policy, ip: str, size: int, hops: int, account: str = "") -> pb.Verdict:
    return await policy.check(pb.STAGE_DATA, ip=ip, account=account, mail_from="x@remote.example",
                              accepted_recipients=[BOB], message_size=size, hop_count=hops)


async def assert_bounds_match_data_stage(policy: Policy, ip: str, account: str = "") -> tuple[int, int]:
    size, hops = await bounds_of(policy, ip, account)
    within = await data(policy, ip, size, hops, account)
    assert (within.action, within.code) == (pb.ACTION_ACCEPT, 250)
    too_many_hops = await data(policy, ip, size, hops + 1, account)
    assert (too_many_hops.action, too_many_hops.code, too_many_hops.rule) == (pb.ACTION_REJECT, 554, "R-LIM-5")
    too_big = await data(policy, ip, size + 1, hops, account)
    assert too_big.action != pb.ACTION_ACCEPT  # last: an IPS size block closes the IP's sessions
    return size, hops


async def test_defaults(policy: Policy) -> None:
    size, hops = await assert_bounds_match_data_stage(policy, "203.0.113.10")
    assert (size, hops) == (50 * 1024 * 1024, 20)  # SPEC defaults (R-LIM-5, R-LIM-7)


async def test_server_limits(policy: Policy) -> None:
    await policy.settings({"limits": {"max_message_size": 4096, "max_hops": 5}})
    assert await assert_bounds_match_data_stage(policy, "203.0.113.11") == (4096, 5)
    too_big = await data(policy, "203.0.113.11", 4097, 0)
    assert (too_big.code, too_big.rule) == (552, "R-LIM-7")


async def test_account_limit_for_an_authenticated_sender(policy: Policy) -> None:
    await policy.settings({"limits": {"max_message_size": 10_000}}, scope=f"account:{BOB}")
    assert (await assert_bounds_match_data_stage(policy, "203.0.113.12", account=BOB))[0] == 10_000
    # Anyone else keeps the server's limit.
    assert (await bounds_of(policy, "203.0.113.13"))[0] == 50 * 1024 * 1024


async def test_ips_size_block_is_a_bound_where_ips_applies(policy: Policy) -> None:
    await policy.settings({"ips": {"max_message_size_mb": 1}})
    assert (await assert_bounds_match_data_stage(policy, "203.0.113.14"))[0] == 1024 * 1024
    blocked = await data(policy, "203.0.113.15", 1024 * 1024 + 1, 0)
    assert (blocked.action, blocked.ip_blocked) == (pb.ACTION_CLOSE, True)
    # A trusted host is never blocked (R-IPS-5): only the size limit bounds it.
    assert (await assert_bounds_match_data_stage(policy, TRUSTED_IP))[0] == 50 * 1024 * 1024


async def test_discarded_recipient_has_bounds_refused_has_none(policy: Policy) -> None:
    await policy.settings({"recipients": {"unknown_recipient_action": "discard"}}, scope="domain:example.org")
    discarded = await policy.rcpt("nobody@example.org", ip="203.0.113.16")
    assert discarded.action == pb.ACTION_DISCARD and discarded.HasField("data_bounds")
    await policy.settings({"recipients": {"unknown_recipient_action": "reject"}}, scope="domain:example.org")
    refused = await policy.rcpt("nobody@example.org", ip="203.0.113.17")
    assert refused.action == pb.ACTION_REJECT and not refused.HasField("data_bounds")


@pytest.mark.parametrize("stage", [pb.STAGE_MAIL, pb.STAGE_DATA, pb.STAGE_CONNECT])
async def test_only_rcpt_verdicts_carry_bounds(policy: Policy, stage: int) -> None:
    verdict = await policy.check(stage, ip="203.0.113.18", mail_from="x@remote.example", message_size=10)
    assert verdict.action == pb.ACTION_ACCEPT and not verdict.HasField("data_bounds")


async def mail(policy: Policy, ip: str, size: int = 0, account: str = "",
               sender: str = "x@remote.example") -> pb.Verdict:
    return await policy.check(pb.STAGE_MAIL, ip=ip, account=account, mail_from=sender, message_size=size)


async def assert_reuse_matches_mail_stage(policy: Policy, ip: str, account: str = "",
                                          sender: str = "x@remote.example") -> int:
    verdict = await mail(policy, ip, account=account, sender=sender)
    assert verdict.action == pb.ACTION_ACCEPT and verdict.HasField("reuse")
    assert verdict.reuse.seconds == 30
    limit = verdict.reuse.max_size
    assert (await mail(policy, ip, limit, account, sender)).action == pb.ACTION_ACCEPT
    too_big = await mail(policy, ip, limit + 1, account, sender)
    assert (too_big.code, too_big.enhanced_code, too_big.rule) == (552, "5.3.4", "R-LIM-7")
    assert not too_big.HasField("reuse")
    return limit


async def test_accepted_mail_may_be_reused_up_to_the_size_limit(policy: Policy) -> None:
    assert await assert_reuse_matches_mail_stage(policy, "203.0.113.20") == 50 * 1024 * 1024
    await policy.settings({"limits": {"max_message_size": 4096}})
    assert await assert_reuse_matches_mail_stage(policy, "203.0.113.21") == 4096
    await policy.settings({"limits": {"max_message_size": 10_000}}, scope=f"account:{BOB}")
    assert await assert_reuse_matches_mail_stage(policy, "203.0.113.22", account=BOB, sender=BOB) == 10_000


async def test_refused_mail_is_never_reused(policy: Policy) -> None:
    """R-REL-3: a sender that is not the authenticated account is refused, and that verdict
    carries no reuse (only an accept is reused; anything else is asked every time)."""
    await policy.settings({"relay": {"reject_auth_sender_mismatch": True}})
    refused = await mail(policy, "203.0.113.23", account=BOB, sender="mallory@remote.example")
    assert (refused.code, refused.rule) == (501, "R-REL-3") and not refused.HasField("reuse")
    assert (await mail(policy, "203.0.113.23", account=BOB, sender=BOB)).HasField("reuse")
    bad = await mail(policy, "203.0.113.24", sender="not an address")
    assert bad.action == pb.ACTION_REJECT and not bad.HasField("reuse")


@pytest.mark.parametrize("stage", [pb.STAGE_RCPT, pb.STAGE_DATA, pb.STAGE_CONNECT])
async def test_only_mail_verdicts_carry_reuse(policy: Policy, stage: int) -> None:
    verdict = await policy.check(stage, ip="203.0.113.25", mail_from="x@remote.example",
                                 recipient=BOB, message_size=10)
    assert verdict.action == pb.ACTION_ACCEPT and not verdict.HasField("reuse")
