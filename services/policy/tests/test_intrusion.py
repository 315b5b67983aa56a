"""R-IPS: counters and blocks, asserted through real gRPC calls."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from policy_testkit import TRUSTED_IP, UNTRUSTED_IP, Policy

from rempart.common import keys
from rempart.common.events import IPS_BLOCKED
from rempart.common.pb.events.v1 import events_pb2
from rempart.common.pb.policy.v1 import policy_pb2 as pb
from rempart.policy import intrusion, replies

BLOCKED_TEXT = replies.intrusion_prevention_active(UNTRUSTED_IP)


async def collect_blocks(nats_conn: NATS) -> list[events_pb2.Event]:
    seen: list[events_pb2.Event] = []

    async def on_msg(msg: Msg) -> None:
        event = events_pb2.Event()
        event.ParseFromString(msg.data)
        seen.append(event)

    await nats_conn.subscribe(IPS_BLOCKED, cb=on_msg)
    await nats_conn.flush()
    return seen


async def wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


def assert_closed(verdict: pb.Verdict, ip: str = UNTRUSTED_IP) -> None:
    assert (verdict.action, verdict.code, verdict.enhanced_code, verdict.text) == (
        pb.ACTION_CLOSE, 421, "4.0.0", replies.intrusion_prevention_active(ip)
    )


async def test_r_ips_3_unknown_recipients_block_ip(policy: Policy, nats_conn: NATS) -> None:
    events = await collect_blocks(nats_conn)
    for n in range(3):
        verdict = await policy.rcpt(f"nobody{n}@example.org")
        assert (verdict.action, verdict.code, verdict.enhanced_code, verdict.text) == (
            pb.ACTION_REJECT, 550, "5.1.1", f"<nobody{n}@example.org>... Unknown user"
        )
        assert not verdict.ip_blocked
    fourth = await policy.rcpt("nobody3@example.org")
    assert_closed(fourth)
    assert fourth.ip_blocked
    await wait_for(lambda: len(events) == 1)
    assert events[0].client_ip == UNTRUSTED_IP
    assert events[0].reason == "R-IPS-3 unknown recipients"
    # The block holds at the next connection, on any replica.
    assert_closed(await policy.check(pb.STAGE_CONNECT))


async def test_r_ips_3_relay_denials_block_ip(policy: Policy) -> None:
    for _ in range(5):
        verdict = await policy.rcpt("victim@remote.example")
        assert verdict.code == 550 and not verdict.ip_blocked
    sixth = await policy.rcpt("victim@remote.example")
    assert_closed(sixth)
    assert sixth.ip_blocked
    assert [b.reason for b in await intrusion.list_blocks(policy.redis)] == ["R-IPS-3 relay denials"]


async def test_r_ips_3_rset_commands_block_ip(policy: Policy) -> None:
    for _ in range(5):
        verdict = await policy.check(pb.STAGE_RSET, command="RSET")
        assert verdict.action == pb.ACTION_ACCEPT
    assert_closed(await policy.check(pb.STAGE_RSET, command="RSET"))


async def test_r_ips_3_spam_score_blocks_ip(policy: Policy) -> None:
    await policy.settings({"ips": {"spam_score_threshold": 5.0}})
    low = await policy.check(pb.STAGE_DATA, spam_score=4.9, spam_score_present=True, message_size=100)
    assert (low.action, low.code) == (pb.ACTION_ACCEPT, 250)
    high = await policy.check(pb.STAGE_DATA, spam_score=9.0, spam_score_present=True, message_size=100)
    assert_closed(high)
    assert high.ip_blocked


async def test_r_ips_3_message_size_mb_blocks_ip(policy: Policy) -> None:
    await policy.settings({"ips": {"max_message_size_mb": 1}})
    verdict = await policy.check(pb.STAGE_DATA, message_size=2 * 1024 * 1024)
    assert_closed(verdict)
    assert [b.reason for b in await intrusion.list_blocks(policy.redis)] == ["R-IPS-3 message size"]


async def test_r_ips_3_without_closing_the_connection(policy: Policy) -> None:
    await policy.settings({"ips": {"close_blocked_connection": False}})
    for n in range(3):
        await policy.rcpt(f"nobody{n}@example.org")
    fourth = await policy.rcpt("nobody3@example.org")
    assert (fourth.action, fourth.code, fourth.text) == (pb.ACTION_REJECT, 550, "<nobody3@example.org>... Unknown user")
    assert fourth.ip_blocked


async def test_r_ips_2_connections_per_minute_block_ip(policy: Policy) -> None:
    for _ in range(5):
        verdict = await policy.check(pb.STAGE_CONNECT)
        assert (verdict.action, verdict.code) == (pb.ACTION_ACCEPT, 220)
    sixth = await policy.check(pb.STAGE_CONNECT)
    assert_closed(sixth)
    assert sixth.ip_blocked


async def test_r_ips_2_failed_logins_block_ip(policy: Policy) -> None:
    for _ in range(10):
        verdict = await policy.check(pb.STAGE_AUTH, auth_success=False, auth_login="bob")
        assert verdict.action == pb.ACTION_ACCEPT
    eleventh = await policy.check(pb.STAGE_AUTH, auth_success=False, auth_login="bob")
    assert_closed(eleventh)
    assert eleventh.ip_blocked


async def test_r_ips_1_imap_pop_counted_only_when_enabled(policy: Policy) -> None:
    await policy.settings({"ips": {"imap_pop": False}})
    for _ in range(12):
        verdict = await policy.check(pb.STAGE_AUTH, auth_success=False, protocol=pb.PROTOCOL_IMAP)
        assert verdict.action == pb.ACTION_ACCEPT
    assert await intrusion.list_blocks(policy.redis) == []
    await policy.settings({"ips": {"imap_pop": True}})
    for _ in range(10):
        await policy.check(pb.STAGE_AUTH, auth_success=False, protocol=pb.PROTOCOL_POP3)
    assert_closed(await policy.check(pb.STAGE_AUTH, auth_success=False, protocol=pb.PROTOCOL_POP3))


async def test_r_ips_4_blocked_ip_refused_at_connect(policy: Policy) -> None:
    for n in range(4):
        await policy.rcpt(f"nobody{n}@example.org")
    refused = await policy.check(pb.STAGE_CONNECT, protocol=pb.PROTOCOL_SUBMISSION)
    assert_closed(refused)
    assert not refused.ip_blocked  # refused, not newly blocked
    assert (await policy.check(pb.STAGE_CONNECT, ip="198.51.100.1")).code == 220
    # The block has the configured duration.
    ttl = await policy.redis.ttl("rp:ips:block:" + UNTRUSTED_IP)
    assert 1439 * 60 < ttl <= 1440 * 60
    await policy.settings({"ips": {"refuse_blocked": False}})
    assert (await policy.check(pb.STAGE_CONNECT)).code == 220


async def test_r_ips_4_ipv6_spellings_share_one_block(policy: Policy) -> None:
    for n in range(4):
        await policy.rcpt(f"nobody{n}@example.org", ip="2001:db8:0:0::1")
    assert_closed(await policy.check(pb.STAGE_CONNECT, ip="2001:0db8::0001"), ip="2001:db8::1")


async def test_r_ips_5_whitelist_never_blocked(policy: Policy) -> None:
    await policy.settings({"ips": {"whitelist": ["203.0.113.0/24"]}})
    for n in range(10):
        verdict = await policy.rcpt(f"nobody{n}@example.org")
        assert (verdict.code, verdict.text) == (550, f"<nobody{n}@example.org>... Unknown user")
        assert not verdict.ip_blocked
    for _ in range(10):
        assert (await policy.check(pb.STAGE_CONNECT)).code == 220
    # Trusted hosts too.
    for n in range(10):
        assert not (await policy.rcpt(f"nobody{n}@example.org", ip=TRUSTED_IP)).ip_blocked
    assert await intrusion.list_blocks(policy.redis) == []


async def test_r_ips_5_list_and_unblock(policy: Policy) -> None:
    for n in range(4):
        await policy.rcpt(f"nobody{n}@example.org", session_id="sess-42")
    blocks = await intrusion.list_blocks(policy.redis)
    assert [(b.ip, b.reason, b.protocol, b.session_id) for b in blocks] == [
        (UNTRUSTED_IP, "R-IPS-3 unknown recipients", "PROTOCOL_SMTP", "sess-42")
    ]
    assert blocks[0].expires_at - blocks[0].blocked_at == 1440 * 60
    assert await intrusion.unblock(policy.redis, UNTRUSTED_IP)
    assert not await intrusion.unblock(policy.redis, UNTRUSTED_IP)
    assert await intrusion.list_blocks(policy.redis) == []
    assert (await policy.check(pb.STAGE_CONNECT)).code == 220
    # Counters were reset with the block: one more unknown recipient does not re-block.
    assert not (await policy.rcpt("nobody9@example.org")).ip_blocked


async def test_r_ips_1_counting_per_session_when_not_across_sessions(policy: Policy) -> None:
    await policy.settings({"ips": {"across_sessions": False}})
    for n in range(6):  # three per session: nobody over the limit of 3, though 6 from the IP
        verdict = await policy.rcpt(f"nobody{n}@example.org", session_id=f"s{n % 2}")
        assert not verdict.ip_blocked
    assert_closed(await policy.rcpt("nobody9@example.org", session_id="s0"))


async def test_counters_survive_a_script_cache_flush(policy: Policy) -> None:
    await policy.rcpt("nobody0@example.org")
    await policy.redis.script_flush()
    for n in range(1, 3):
        assert (await policy.rcpt(f"nobody{n}@example.org")).code == 550
    assert_closed(await policy.rcpt("nobody3@example.org"))


# R-IPS-6: real users behind one NAT, IPv6 per prefix ----------------------------------------
async def log_in(policy: Policy, ip: str, protocol: int = pb.PROTOCOL_IMAP) -> None:
    """What an edge reports after the auth service said OK (rempart.common.edgelogin)."""
    verdict = await policy.check(pb.STAGE_AUTH, ip=ip, protocol=protocol, account="bob@example.org",
                                 auth_success=True, auth_login="bob@example.org")
    assert verdict.action == pb.ACTION_ACCEPT


async def connect_codes(policy: Policy, ip: str, times: int, protocol: int = pb.PROTOCOL_IMAP) -> list[int]:
    return [(await policy.check(pb.STAGE_CONNECT, ip=ip, protocol=protocol, session_id=f"c{n}")).code
            for n in range(times)]


async def test_r_ips_6_known_ip_connections_do_not_count(policy: Policy) -> None:
    household, stranger = "198.51.100.20", "198.51.100.21"
    assert await connect_codes(policy, household, 1) == [220]
    await log_in(policy, household)
    # Thunderbird's five cached connections, a phone's, and their reconnects: 20 in a minute.
    assert await connect_codes(policy, household, 20) == [220] * 20
    assert await connect_codes(policy, household, 2, pb.PROTOCOL_SUBMISSION) == [220] * 2  # any protocol
    # The known-IP window is R-LOG-1's (30 days by default), renewed by each login.
    ttl = await policy.redis.ttl(keys.ips_known(household))
    assert 30 * 86400 - 60 < ttl <= 30 * 86400
    # A fresh IP doing the same is blocked at its sixth connection, as R-IPS-2 says.
    assert await connect_codes(policy, stranger, 6) == [220] * 5 + [421]
    assert [b.ip for b in await intrusion.list_blocks(policy.redis)] == [stranger]


async def test_r_ips_6_failed_logins_from_a_known_ip_still_block(policy: Policy) -> None:
    ip = "198.51.100.22"
    await log_in(policy, ip, pb.PROTOCOL_SUBMISSION)
    for _ in range(10):
        verdict = await policy.check(pb.STAGE_AUTH, ip=ip, protocol=pb.PROTOCOL_IMAP, auth_success=False,
                                     auth_login="bob@example.org")
        assert verdict.action == pb.ACTION_ACCEPT
    eleventh = await policy.check(pb.STAGE_AUTH, ip=ip, protocol=pb.PROTOCOL_IMAP, auth_success=False,
                                  auth_login="bob@example.org")
    assert_closed(eleventh, ip)
    assert eleventh.ip_blocked
    # Known or not, a blocked IP is refused at connect.
    assert_closed(await policy.check(pb.STAGE_CONNECT, ip=ip, protocol=pb.PROTOCOL_IMAP), ip)
    assert [b.reason for b in await intrusion.list_blocks(policy.redis)] == ["R-IPS-2 failed logins"]


async def test_r_ips_6_known_ip_exemption_can_be_turned_off(policy: Policy) -> None:
    ip = "198.51.100.23"
    await log_in(policy, ip)
    await policy.settings({"ips": {"known_ip_exempt_from_connection_rate": False}})
    assert await connect_codes(policy, ip, 6) == [220] * 5 + [421]
    # A login outside the window (R-LOG-1's known_ip_days) is forgotten: the key expires with it.
    await policy.settings({"login": {"known_ip_days": 2}})
    await log_in(policy, "198.51.100.24")
    assert 86400 < await policy.redis.ttl(keys.ips_known("198.51.100.24")) <= 2 * 86400


async def test_r_ips_6_ipv6_counted_and_blocked_per_64(policy: Policy, nats_conn: NATS) -> None:
    events = await collect_blocks(nats_conn)
    first, second, elsewhere = "2001:db8:1:2::10", "2001:db8:1:2:a:b:c:d", "2001:db8:1:3::10"
    # Two addresses of one /64 share one counter: 3 + 2 connections are within the limit of 5,
    # the sixth, from either, blocks the prefix.
    assert await connect_codes(policy, first, 3) == [220] * 3
    assert await connect_codes(policy, second, 2) == [220] * 2
    sixth = await policy.check(pb.STAGE_CONNECT, ip=second, protocol=pb.PROTOCOL_IMAP)
    assert_closed(sixth, second)
    assert sixth.ip_blocked
    # One block refuses every address in the prefix, and only there.
    assert_closed(await policy.check(pb.STAGE_CONNECT, ip=first), first)
    assert_closed(await policy.check(pb.STAGE_CONNECT, ip="2001:db8:1:2:ffff::1"), "2001:db8:1:2:ffff::1")
    assert await connect_codes(policy, elsewhere, 5) == [220] * 5
    # R-IPS-5: the list shows what was blocked, the prefix, named by its network address.
    blocks = await intrusion.list_blocks(policy.redis)
    assert [(b.ip, b.prefix, b.client_ip, b.reason) for b in blocks] == [
        ("2001:db8:1:2::", "2001:db8:1:2::/64", second, "R-IPS-2 connections per minute")
    ]
    await wait_for(lambda: len(events) == 1)
    assert (events[0].client_ip, events[0].attributes["prefix"]) == (second, "2001:db8:1:2::/64")
    assert await intrusion.unblock(policy.redis, "2001:db8:1:2::")
    assert await connect_codes(policy, first, 1) == [220]


async def test_r_ips_6_ipv6_other_triggers_and_known_logins_per_prefix(policy: Policy) -> None:
    a, b = "2001:db8:5:6::1", "2001:db8:5:6::2"
    # Unknown recipients from two addresses of one /64 add up (R-IPS-3 counts the prefix too).
    for n in range(3):
        assert not (await policy.rcpt(f"nobody{n}@example.org", ip=a if n % 2 else b)).ip_blocked
    assert (await policy.rcpt("nobody3@example.org", ip=a)).ip_blocked
    assert await intrusion.unblock(policy.redis, "2001:db8:5:6::")
    # A login from one address makes the prefix known: temporary addresses keep working.
    await log_in(policy, a)
    assert await connect_codes(policy, b, 10) == [220] * 10


async def test_r_ips_6_prefix_length_is_a_setting(policy: Policy) -> None:
    await policy.settings({"ips": {"ipv6_prefix_length": 128}})
    assert await connect_codes(policy, "2001:db8:9::1", 5) == [220] * 5
    assert await connect_codes(policy, "2001:db8:9::2", 5) == [220] * 5  # counted alone
    await policy.settings({"ips": {"ipv6_prefix_length": 48}})
    assert await connect_codes(policy, "2001:db8:7:1::1", 3) == [220] * 3
    assert await connect_codes(policy, "2001:db8:7:2::1", 3) == [220] * 2 + [421]
    assert [(b.ip, b.prefix) for b in await intrusion.list_blocks(policy.redis)] == [("2001:db8:7::", "2001:db8:7::/48")]


async def test_r_ips_6_ipv4_mapped_address_is_its_ipv4_address(policy: Policy) -> None:
    # Not the ::ffff:0:0/96 prefix, which every mapped client would share.
    assert await connect_codes(policy, "::ffff:198.51.100.30", 5) == [220] * 5
    assert (await connect_codes(policy, "198.51.100.30", 1)) == [421]
    assert await connect_codes(policy, "::ffff:198.51.100.31", 1) == [220]
