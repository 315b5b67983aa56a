"""R-DOM, R-REL and R-LIM decisions, asserted through real gRPC calls with exact reply texts."""

from __future__ import annotations

from policy_testkit import TRUSTED_IP, Policy

from rempart.common.pb.policy.v1 import policy_pb2 as pb
from rempart.policy import limits, replies

BOB = "bob@example.org"


def reply(verdict: pb.Verdict) -> tuple[int, int, str, str]:
    return verdict.action, verdict.code, verdict.enhanced_code, verdict.text


# R-DOM ----------------------------------------------------------------------------------------
async def test_r_dom_1_reject_unknown_user(policy: Policy) -> None:
    verdict = await policy.rcpt("Nobody@Example.org")
    assert reply(verdict) == (pb.ACTION_REJECT, 550, "5.1.1", "<nobody@example.org>... Unknown user")
    assert verdict.rule == "R-DOM-1"


async def test_r_dom_1_catch_all(policy: Policy) -> None:
    await policy.settings(
        {"recipients": {"unknown_recipient_action": "catch_all", "catch_all_address": "alice@example.org"}},
        scope="domain:example.org",
    )
    verdict = await policy.rcpt("nobody@example.org")
    assert (verdict.action, verdict.code) == (pb.ACTION_ACCEPT, 250)
    assert list(verdict.local_mailboxes) == ["alice@example.org"]
    # Known users still get their own mail.
    assert list((await policy.rcpt(BOB)).local_mailboxes) == [BOB]


async def test_r_dom_1_discard(policy: Policy) -> None:
    await policy.settings({"recipients": {"unknown_recipient_action": "discard"}}, scope="domain:example.org")
    verdict = await policy.rcpt("nobody@example.org")
    assert (verdict.action, verdict.code, verdict.text) == (pb.ACTION_DISCARD, 250, replies.OK)
    assert list(verdict.local_mailboxes) == []


async def test_r_dom_1_unknown_recipients_count_in_every_mode(policy: Policy) -> None:
    await policy.settings({"recipients": {"unknown_recipient_action": "discard"}}, scope="domain:example.org")
    for n in range(3):
        assert (await policy.rcpt(f"nobody{n}@example.org")).action == pb.ACTION_DISCARD
    fourth = await policy.rcpt("nobody3@example.org")
    assert (fourth.action, fourth.code, fourth.ip_blocked) == (pb.ACTION_CLOSE, 421, True)


async def test_r_dom_2_alias_and_domain_alias(policy: Policy) -> None:
    alias = await policy.rcpt("robert@example.org")
    assert (alias.action, list(alias.local_mailboxes)) == (pb.ACTION_ACCEPT, [BOB])
    domain_alias = await policy.rcpt("bob@example.net")
    assert list(domain_alias.local_mailboxes) == [BOB]
    # An alias forwarding off-site is relaying the domain allowed, even for an untrusted client.
    forward = await policy.rcpt("sales@example.org")
    assert (forward.action, list(forward.local_mailboxes), list(forward.remote_recipients)) == (
        pb.ACTION_ACCEPT, [BOB], ["partner@remote.example"]
    )


# R-REL ----------------------------------------------------------------------------------------
async def test_r_rel_1_unauthenticated_relay_denied(policy: Policy, nats_conn: object) -> None:
    verdict = await policy.rcpt("victim@remote.example", mail_from="spammer@remote.example")
    assert reply(verdict) == (
        pb.ACTION_REJECT, 550, "5.7.1", "<spammer@remote.example>... we do not relay <victim@remote.example>"
    )
    assert verdict.rule == "R-REL-1"


async def test_r_rel_1_null_sender_relay_denied(policy: Policy) -> None:
    verdict = await policy.rcpt("victim@remote.example", mail_from="")
    assert reply(verdict) == (pb.ACTION_REJECT, 550, "5.7.1", "<>... we do not relay <victim@remote.example>")


async def test_r_rel_1_authenticated_relay_allowed(policy: Policy) -> None:
    verdict = await policy.rcpt("friend@remote.example", mail_from=BOB, account=BOB)
    assert (verdict.action, verdict.code, list(verdict.remote_recipients)) == (
        pb.ACTION_ACCEPT, 250, ["friend@remote.example"]
    )


async def test_r_rel_1_trusted_host_cidr(policy: Policy) -> None:
    await policy.settings({"relay": {"trusted_hosts": ["127.0.0.1", "::1", "10.1.0.0/16"]}})
    verdict = await policy.rcpt("friend@remote.example", mail_from=BOB, ip="10.1.2.3")
    assert (verdict.action, list(verdict.remote_recipients)) == (pb.ACTION_ACCEPT, ["friend@remote.example"])
    assert (await policy.rcpt("friend@remote.example", mail_from=BOB, ip="10.2.0.1")).code == 550


async def test_r_rel_1_pop_before_smtp(policy: Policy) -> None:
    ip = "198.51.100.20"
    # Off by default: a POP3 login opens nothing.
    await policy.check(pb.STAGE_AUTH, ip=ip, protocol=pb.PROTOCOL_POP3, auth_success=True, auth_login=BOB)
    assert (await policy.rcpt("friend@remote.example", mail_from=BOB, ip=ip)).code == 550
    await policy.settings({"relay": {"pop_before_smtp": True}})
    assert (await policy.rcpt("friend@remote.example", mail_from=BOB, ip=ip)).code == 550
    await policy.check(pb.STAGE_AUTH, ip=ip, protocol=pb.PROTOCOL_POP3, auth_success=True, auth_login=BOB)
    verdict = await policy.rcpt("friend@remote.example", mail_from=BOB, ip=ip)
    assert (verdict.action, list(verdict.remote_recipients)) == (pb.ACTION_ACCEPT, ["friend@remote.example"])
    ttl = await policy.redis.ttl("rp:rel:pbs:" + ip)
    assert 14 * 60 < ttl <= 15 * 60


async def test_r_rel_2_local_sender_unauthorized(policy: Policy) -> None:
    verdict = await policy.rcpt("alice@example.org", mail_from=BOB)
    assert reply(verdict) == (pb.ACTION_REJECT, 550, "5.7.1", "<bob@example.org> Access to <alice@example.org> not allowed")
    assert verdict.rule == "R-REL-2"
    # A domain alias is a local domain too.
    assert (await policy.rcpt("alice@example.org", mail_from="bob@example.net")).rule == "R-REL-2"
    # Authenticated or trusted sessions may use it; and the option can be turned off.
    assert (await policy.rcpt("alice@example.org", mail_from=BOB, account=BOB)).action == pb.ACTION_ACCEPT
    assert (await policy.rcpt("alice@example.org", mail_from=BOB, ip=TRUSTED_IP)).action == pb.ACTION_ACCEPT
    await policy.settings({"relay": {"reject_unauthorized_local_sender": False}})
    assert (await policy.rcpt("alice@example.org", mail_from=BOB)).action == pb.ACTION_ACCEPT


async def test_r_rel_3_auth_sender_mismatch(policy: Policy) -> None:
    mail = pb.STAGE_MAIL
    # Off by default.
    assert (await policy.check(mail, account=BOB, mail_from="alice@example.org")).action == pb.ACTION_ACCEPT
    await policy.settings({"relay": {"reject_auth_sender_mismatch": True}})
    verdict = await policy.check(mail, account=BOB, mail_from="alice@example.org")
    assert reply(verdict) == (pb.ACTION_REJECT, 501, "5.7.1", "<alice@example.org>... Permission denied")
    assert (await policy.check(mail, account=BOB, mail_from="someone@remote.example")).code == 501
    for own in (BOB, "Bob@Example.org", "robert@example.org", "bob@example.net", ""):
        assert (await policy.check(mail, account=BOB, mail_from=own)).action == pb.ACTION_ACCEPT, own


async def test_r_rel_4_trusted_relay_needs_local_sender(policy: Policy) -> None:
    denied = await policy.rcpt("friend@remote.example", mail_from="someone@remote.example", ip=TRUSTED_IP)
    assert reply(denied) == (
        pb.ACTION_REJECT, 550, "5.7.1", "<someone@remote.example>... we do not relay <friend@remote.example>"
    )
    assert denied.rule == "R-REL-4"
    assert (await policy.rcpt("friend@remote.example", mail_from=BOB, ip=TRUSTED_IP)).action == pb.ACTION_ACCEPT
    # Only for unauthenticated sessions.
    authed = await policy.rcpt("friend@remote.example", mail_from="someone@remote.example", account=BOB)
    assert authed.action == pb.ACTION_ACCEPT
    await policy.settings({"relay": {"relay_only_if_sender_local": False}})
    relayed = await policy.rcpt("friend@remote.example", mail_from="someone@remote.example", ip=TRUSTED_IP)
    assert relayed.action == pb.ACTION_ACCEPT


# R-LIM ----------------------------------------------------------------------------------------
async def test_r_lim_4_too_many_recipients(policy: Policy) -> None:
    await policy.settings({"limits": {"max_recipients": 3}})
    accepted = ["alice@example.org", BOB, "robert@example.org"]
    verdict = await policy.rcpt(BOB, mail_from="x@remote.example", accepted_recipients=accepted)
    assert reply(verdict) == (pb.ACTION_TEMPFAIL, 452, "4.5.3", "Too many recipients")
    ok = await policy.rcpt(BOB, mail_from="x@remote.example", accepted_recipients=accepted[:2])
    assert ok.action == pb.ACTION_ACCEPT


async def test_r_lim_4_default_limit(policy: Policy) -> None:
    accepted = [f"u{n}@remote.example" for n in range(32768)]
    verdict = await policy.rcpt(BOB, mail_from="x@remote.example", accepted_recipients=accepted)
    assert (verdict.code, verdict.text) == (452, "Too many recipients")


async def send_external(policy: Policy, recipient: str, accepted: list[str] | None = None) -> pb.Verdict:
    return await policy.rcpt(recipient, mail_from=BOB, account=BOB, accepted_recipients=accepted or [])


async def test_r_lim_1_account_limit(policy: Policy, nats_conn: object) -> None:
    await policy.settings({"limits": {"max_messages_per_day": 2}}, scope="domain:example.org")
    assert (await send_external(policy, "a@one.example")).action == pb.ACTION_ACCEPT
    assert (await send_external(policy, "a@two.example")).action == pb.ACTION_ACCEPT
    third = await send_external(policy, "a@three.example")
    assert reply(third) == (pb.ACTION_TEMPFAIL, 452, "4.5.3", replies.DAILY_LIMIT_EXCEEDED)
    # Local recipients never count (R-LIM-2).
    assert (await policy.rcpt("alice@example.org", mail_from=BOB, account=BOB)).action == pb.ACTION_ACCEPT
    # The account override beats the domain's per-user default.
    await policy.settings({"limits": {"max_messages_per_day": 5}}, scope="account:bob@example.org")
    assert (await send_external(policy, "a@three.example")).action == pb.ACTION_ACCEPT
    assert await limits.sent_today(policy.redis, BOB) == 3


async def test_r_lim_1_domain_total_dominant(policy: Policy) -> None:
    await policy.settings({"limits": {"domain_max_messages_per_day": 2}}, scope="domain:example.org")
    await policy.settings({"limits": {"max_messages_per_day": 100}}, scope="account:bob@example.org")
    assert (await send_external(policy, "a@one.example")).action == pb.ACTION_ACCEPT
    other = await policy.rcpt("a@two.example", mail_from="alice@example.org", account="alice@example.org")
    assert other.action == pb.ACTION_ACCEPT
    third = await send_external(policy, "a@three.example")
    assert reply(third) == (pb.ACTION_TEMPFAIL, 452, "4.5.3", replies.DAILY_LIMIT_EXCEEDED)
    assert await limits.domain_sent_today(policy.redis, "example.org") == 2


async def test_r_lim_2_counts_once_per_domain(policy: Policy) -> None:
    await policy.settings({"limits": {"max_messages_per_day": 2}}, scope="account:bob@example.org")
    # One message to three recipients at one.example and one at two.example counts twice.
    assert (await send_external(policy, "a@one.example")).action == pb.ACTION_ACCEPT
    assert (await send_external(policy, "b@one.example", ["a@one.example"])).action == pb.ACTION_ACCEPT
    assert (await send_external(policy, "c@ONE.example", ["a@one.example", "b@one.example"])).action == pb.ACTION_ACCEPT
    assert (await send_external(policy, "a@two.example", ["a@one.example"])).action == pb.ACTION_ACCEPT
    assert await limits.sent_today(policy.redis, BOB) == 2
    over = await send_external(policy, "a@three.example", ["a@one.example", "a@two.example"])
    assert (over.code, over.enhanced_code) == (452, "4.5.3")


async def test_r_lim_3_counter_day_in_configured_time_zone() -> None:
    from datetime import UTC, datetime

    moment = datetime(2026, 3, 1, 23, 30, tzinfo=UTC)
    assert limits.day_key("UTC", moment) == "2026-03-01"
    assert limits.day_key("Europe/Paris", moment) == "2026-03-02"
    assert limits.day_key("Not/AZone", moment) == "2026-03-01"


async def test_r_lim_5_too_many_hops(policy: Policy) -> None:
    ok = await policy.check(pb.STAGE_DATA, hop_count=20, message_size=1000)
    assert (ok.action, ok.code, ok.text) == (pb.ACTION_ACCEPT, 250, "Ok")
    verdict = await policy.check(pb.STAGE_DATA, hop_count=21, message_size=1000)
    assert reply(verdict) == (pb.ACTION_REJECT, 554, "5.4.6", "Too many hops")


async def test_r_lim_7_size_param_at_mail(policy: Policy) -> None:
    big = 50 * 1024 * 1024 + 1
    verdict = await policy.check(pb.STAGE_MAIL, mail_from="x@remote.example", message_size=big)
    assert reply(verdict) == (pb.ACTION_REJECT, 552, "5.3.4", "Message size exceeds fixed maximum message size")
    assert (await policy.check(pb.STAGE_MAIL, mail_from="x@remote.example", message_size=big - 1)).code == 250
    # The authenticated sender's own (account-scoped) maximum applies.
    await policy.settings({"limits": {"max_message_size": 10_000}}, scope="account:bob@example.org")
    assert (await policy.check(pb.STAGE_MAIL, mail_from=BOB, account=BOB, message_size=10_001)).code == 552
    assert (await policy.check(pb.STAGE_MAIL, mail_from=BOB, account=BOB, message_size=10_000)).code == 250


async def test_r_lim_7_real_size_at_data(policy: Policy) -> None:
    await policy.settings({"limits": {"max_message_size": 2048}})
    verdict = await policy.check(pb.STAGE_DATA, message_size=2049)
    assert reply(verdict) == (pb.ACTION_REJECT, 552, "5.3.4", "Message size exceeds fixed maximum message size")


# R-MBX-5 --------------------------------------------------------------------------------------
async def test_r_mbx_5_full_mailbox_is_452_at_rcpt_for_the_account_and_its_aliases(policy: Policy) -> None:
    from rempart.common import keys

    await policy.settings({"limits": {"mailbox_quota_mb": 1}}, scope=f"account:{BOB}")
    await policy.redis.hset(keys.mailbox_usage(BOB), mapping={"bytes": 1024 * 1024 - 1, "messages": 3})
    assert (await policy.rcpt(BOB)).action == pb.ACTION_ACCEPT  # under the quota: accepted
    await policy.redis.hincrby(keys.mailbox_usage(BOB), "bytes", 1)
    verdict = await policy.rcpt(BOB)
    assert reply(verdict) == (pb.ACTION_TEMPFAIL, 452, "4.2.2", "<bob@example.org>... Mailbox full, try again later")
    assert verdict.rule == "R-MBX-5"
    # An alias reaching the full mailbox waits too, for all its members (no partial delivery).
    assert (await policy.rcpt("sales@example.org")).code == 452
    # Another account has no quota: unaffected.
    assert (await policy.rcpt("alice@example.org")).action == pb.ACTION_ACCEPT
