"""R-DNS: DNS-based checks, through gRPC, against a real DNS server on loopback."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import srslib
from policy_testkit import TRUSTED_IP, Policy

from rempart.common.directory import Directory
from rempart.common.pb.policy.v1 import policy_pb2 as pb
from rempart.common.testing.dnsserver import LoopbackDnsServer
from rempart.policy import intrusion
from rempart.policy.srs import HASH_LENGTH

BOB = "bob@example.org"
REV = "7.113.0.203"  # UNTRUSTED_IP's reversed octets
TEMPFAIL = (pb.ACTION_TEMPFAIL, 451, "4.4.3", "Temporary DNS failure, try again later")


def reply(verdict: pb.Verdict) -> tuple[int, int, str, str]:
    return verdict.action, verdict.code, verdict.enhanced_code, verdict.text


def headers(verdict: pb.Verdict) -> dict[str, str]:
    return {h.name: h.value for h in verdict.add_headers}


async def mail(policy: Policy, sender: str = "someone@remote.example", **kw: object) -> pb.Verdict:
    return await policy.check(pb.STAGE_MAIL, mail_from=sender, **kw)  # type: ignore[arg-type]


async def test_r_dns_1_dnsbl_listed_is_refused(policy: Policy, dns_server: LoopbackDnsServer) -> None:
    await policy.settings({"dns": {"dnsbl_zones": ["bl.test", "zen.test"]}})
    dns_server.set(f"{REV}.zen.test", "A", "127.0.0.2")
    verdict = await mail(policy)
    assert reply(verdict) == (
        pb.ACTION_CLOSE, 554, "5.7.1", "Service unavailable; client [203.0.113.7] blocked using zen.test"
    )
    assert verdict.ip_blocked and verdict.rule == "R-DNS-1"
    assert [b.reason for b in await intrusion.list_blocks(policy.redis)] == ["R-IPS-3 listed on a DNSBL"]
    assert (await policy.check(pb.STAGE_CONNECT)).code == 421
    # IPv6: the nibble form (RFC 5782 2.4); without the R-IPS option, refused but not blocked.
    await policy.settings({"dns": {"dnsbl_zones": ["zen.test"]}, "ips": {"block_dnsbl_listed": False}})
    nibbles = "7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
    dns_server.set(f"{nibbles}.zen.test", "A", "127.0.0.4")
    v6 = await mail(policy, ip="2001:db8::7")
    assert reply(v6) == (pb.ACTION_REJECT, 554, "5.7.1", "Service unavailable; client [2001:db8::7] blocked using zen.test")
    assert not v6.ip_blocked
    # 127.0.0.1 and 127.255.255.x are not listings (RFC 5782; "query refused" codes).
    dns_server.set("9.113.0.203.zen.test", "A", "127.255.255.254")
    dns_server.set("8.113.0.203.zen.test", "A", "127.0.0.1")
    for ip in ("203.0.113.9", "203.0.113.8", "203.0.113.10"):
        assert (await mail(policy, ip=ip)).action == pb.ACTION_ACCEPT, ip


async def test_r_dns_2_ip_reputation(
    policy: Policy, dns_server: LoopbackDnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rempart.policy.dnschecks")
    await policy.settings({"dns": {"reputation_zone": "rep.test"}})
    dns_server.set("1.113.0.203.rep.test", "A", "127.0.0.2")
    dns_server.set("2.113.0.203.rep.test", "A", "127.0.0.3")
    assert reply(await mail(policy, ip="203.0.113.1")) == (
        pb.ACTION_REJECT, 554, "5.7.1", "Service unavailable; client [203.0.113.1] has a bad IP reputation at rep.test"
    )
    assert reply(await mail(policy, ip="203.0.113.2")) == (
        pb.ACTION_TEMPFAIL, 451, "4.7.1", "Client [203.0.113.2] greylisted by IP reputation, try again later"
    )
    accepted = await mail(policy, ip="203.0.113.3")
    assert accepted.action == pb.ACTION_ACCEPT
    assert headers(accepted)["X-Rempart-IP-Reputation"] == "Accepted"
    logged = [(r.client_ip, r.reputation) for r in caplog.records if r.getMessage() == "ip reputation"]  # type: ignore[attr-defined]
    assert logged == [("203.0.113.1", "Blacklisted"), ("203.0.113.2", "Greylisted"), ("203.0.113.3", "Accepted")]


async def test_r_dns_3_sender_ip_must_resolve(policy: Policy, dns_server: LoopbackDnsServer) -> None:
    await policy.settings({"dns": {"require_rdns": True}})
    dns_server.set("1.113.0.203.in-addr.arpa", "PTR", "mail.good.example.")
    dns_server.set("mail.good.example", "A", "203.0.113.1")
    dns_server.set("2.113.0.203.in-addr.arpa", "PTR", "liar.example.")
    dns_server.set("liar.example", "A", "192.0.2.99")
    assert (await mail(policy, ip="203.0.113.1")).action == pb.ACTION_ACCEPT
    refused = (pb.ACTION_REJECT, 501, "5.7.1", "<someone@remote.example>... Sender IP must resolve")
    assert reply(await mail(policy, ip="203.0.113.2")) == refused  # PTR does not resolve back
    assert reply(await mail(policy, ip="203.0.113.3")) == refused  # no PTR at all
    # The bypass list: networks, and sender domains.
    await policy.settings({"dns": {"require_rdns": True, "rdns_bypass": ["203.0.113.3/32", "partner.example"]}})
    dns_server.set("partner.example", "A", "192.0.2.5")
    assert (await mail(policy, ip="203.0.113.3")).action == pb.ACTION_ACCEPT
    assert (await mail(policy, "x@partner.example", ip="203.0.113.4")).action == pb.ACTION_ACCEPT


async def test_r_dns_4_sender_domain_must_exist(policy: Policy, dns_server: LoopbackDnsServer) -> None:
    dns_server.set("a-only.example", "A", "192.0.2.7")
    dns_server.set("v6-only.example", "AAAA", "2001:db8::25")
    dns_server.set("nullmx.example", "MX", "0 .")
    dns_server.set("empty.example", "TXT", '"exists but no mail records"')
    for ok in ("x@one.example", "x@a-only.example", "x@v6-only.example", "", BOB):
        verdict = await mail(policy, ok) if ok != BOB else await mail(policy, BOB, account=BOB)
        assert verdict.action == pb.ACTION_ACCEPT, ok
    for bad in ("x@nowhere.example", "x@nullmx.example", "x@empty.example"):
        assert reply(await mail(policy, bad)) == (pb.ACTION_REJECT, 501, "5.7.1", f"<{bad}>... Sender domain must exist")
    await policy.settings({"dns": {"require_sender_domain": False}})
    assert (await mail(policy, "x@nowhere.example")).action == pb.ACTION_ACCEPT


async def test_r_dns_5_spf_result_header_and_action(policy: Policy, dns_server: LoopbackDnsServer) -> None:
    for domain, record in (
        ("spf-pass.example", "v=spf1 ip4:203.0.113.0/24 -all"),
        ("spf-fail.example", "v=spf1 ip4:192.0.2.0/24 -all"),
        ("spf-soft.example", "v=spf1 ~all"),
        ("helo-fail.example", "v=spf1 -all"),
    ):
        dns_server.set(domain, "A", "192.0.2.1")
        dns_server.set(domain, "TXT", f'"{record}"')
    passed = await mail(policy, "alice@spf-pass.example", helo="mta.spf-pass.example")
    assert passed.action == pb.ACTION_ACCEPT
    spf_header = headers(passed)["Received-SPF"]
    assert spf_header.startswith("Pass (mx.rempart.test: domain of spf-pass.example designates 203.0.113.7 as permitted")
    assert 'client-ip=203.0.113.7; envelope-from="alice@spf-pass.example"; helo=mta.spf-pass.example;' in spf_header
    assert spf_header.endswith("identity=mailfrom")
    assert reply(await mail(policy, "eve@spf-fail.example")) == (
        pb.ACTION_REJECT, 550, "5.7.23", "<eve@spf-fail.example>... SPF validation failed"
    )
    soft = await mail(policy, "eve@spf-soft.example")
    assert soft.action == pb.ACTION_ACCEPT and headers(soft)["Received-SPF"].startswith("SoftFail")
    none = await mail(policy, "x@remote.example")
    assert headers(none)["Received-SPF"].startswith("None")
    # The null sender: the HELO identity is checked (RFC 7208 2.3).
    bounce = await mail(policy, "", helo="helo-fail.example")
    assert reply(bounce) == (pb.ACTION_REJECT, 550, "5.7.23", "<postmaster@helo-fail.example>... SPF validation failed")
    # The action per result is a setting.
    await policy.settings({"dns": {"spf_fail_action": "accept", "spf_softfail_action": "tempfail"}})
    failed = await mail(policy, "eve@spf-fail.example")
    assert failed.action == pb.ACTION_ACCEPT and headers(failed)["Received-SPF"].startswith("Fail")
    assert reply(await mail(policy, "eve@spf-soft.example")) == (
        pb.ACTION_TEMPFAIL, 451, "4.7.23", "<eve@spf-soft.example>... SPF validation failed"
    )


async def test_r_dns_6_srs_rewrite_reverse_and_key_rotation(policy: Policy) -> None:
    await Directory(policy.redis).add_alias("fwd@example.org", ["friend@dest.example"])
    await policy.settings({"dns": {"srs_enabled": True, "srs_secrets": ["key-one"]}})
    forwarded = await policy.rcpt("fwd@example.org", mail_from="someone@remote.example")
    assert forwarded.action == pb.ACTION_ACCEPT and list(forwarded.remote_recipients) == ["friend@dest.example"]
    srs_address = forwarded.rewritten_sender
    assert srs_address.startswith("SRS0=") and srs_address.endswith("=remote.example=someone@example.org")
    # A bounce to it goes back to the original sender, as a remote recipient.
    back = await policy.rcpt(srs_address, mail_from="")
    assert (back.action, list(back.remote_recipients), back.rule) == (
        pb.ACTION_ACCEPT, ["someone@remote.example"], "R-DNS-6"
    )
    # Rotation: a new key signs, the old one still verifies until it is dropped.
    await policy.settings({"dns": {"srs_enabled": True, "srs_secrets": ["key-two", "key-one"]}})
    assert (await policy.rcpt(srs_address, mail_from="")).action == pb.ACTION_ACCEPT
    newer = (await policy.rcpt("fwd@example.org", mail_from="someone@remote.example")).rewritten_sender
    assert newer != srs_address
    await policy.settings({"dns": {"srs_enabled": True, "srs_secrets": ["key-two"]}})
    unknown = (pb.ACTION_REJECT, 550, "5.1.1", f"<{srs_address.lower()}>... Unknown user")
    assert reply(await policy.rcpt(srs_address, mail_from="")) == unknown
    assert (await policy.rcpt(newer, mail_from="")).action == pb.ACTION_ACCEPT
    # Forged (short hash) and expired addresses are unknown users.
    forged = "SRS0=a=AA=remote.example=someone@example.org"
    assert reply(await policy.rcpt(forged, mail_from="", ip="203.0.113.50"))[1:3] == (550, "5.1.1")
    old = srslib.SRS("key-two", hash_length=HASH_LENGTH)
    old._time_fn = lambda: time.time() - 30 * 86400
    expired = old.forward("someone@remote.example", "example.org")
    assert reply(await policy.rcpt(expired, mail_from="", ip="203.0.113.50"))[1:3] == (550, "5.1.1")
    # Bypassed destinations, bounces and local senders are not rewritten.
    await policy.settings({"dns": {"srs_enabled": True, "srs_secrets": ["key-two"], "srs_bypass": ["dest.example"]}})
    assert (await policy.rcpt("fwd@example.org", mail_from="someone@remote.example")).rewritten_sender == ""
    await policy.settings({"dns": {"srs_enabled": True, "srs_secrets": ["key-two"]}})
    assert (await policy.rcpt("fwd@example.org", mail_from="")).rewritten_sender == ""
    assert (await policy.rcpt("fwd@example.org", mail_from=BOB, account=BOB)).rewritten_sender == ""


async def test_r_dns_7_timeout_is_4xx_never_5xx(policy: Policy, dns_server: LoopbackDnsServer) -> None:
    await policy.settings({"dns": {"timeout_seconds": 0.3, "dnsbl_zones": ["zen.test"], "require_rdns": True}})
    for mode in ("silent", "servfail"):
        dns_server.mode = mode  # type: ignore[assignment]
        started = time.monotonic()
        verdict = await mail(policy, f"x@{mode}.example")
        assert reply(verdict) == TEMPFAIL, mode
        assert verdict.rule == "R-DNS-7"
        assert time.monotonic() - started < 2
    # SPF's own lookups failing (an include: whose server fails) is a temperror: 4xx too.
    dns_server.mode = "answer"
    await policy.settings({"dns": {"timeout_seconds": 0.3}})
    dns_server.set("flaky.example", "A", "192.0.2.1")
    dns_server.set("flaky.example", "TXT", '"v=spf1 include:broken.example -all"')
    dns_server.servfail_names.add("broken.example")
    assert reply(await mail(policy, "x@flaky.example")) == TEMPFAIL
    assert dns_server.asked("broken.example", "TXT") >= 1


async def test_r_dns_7_answers_cached_with_their_ttl(policy: Policy, dns_server: LoopbackDnsServer) -> None:
    dns_server.set("short.example", "A", "192.0.2.1", ttl=1)
    await policy.settings({"dns": {"spf_enabled": False}})
    for _ in range(3):
        assert (await mail(policy, "x@one.example")).action == pb.ACTION_ACCEPT
        assert (await mail(policy, "x@nowhere.example")).code == 501
        assert (await mail(policy, "x@short.example")).action == pb.ACTION_ACCEPT
    assert dns_server.asked("one.example", "MX") == 1  # positive, TTL 300
    assert dns_server.asked("nowhere.example", "MX") == 1  # negative, SOA minimum 60
    assert dns_server.asked("short.example", "A") == 1
    # A cached answer survives a DNS outage; an expired one does not.
    dns_server.mode = "silent"
    await policy.settings({"dns": {"spf_enabled": False, "timeout_seconds": 0.3}})
    assert (await mail(policy, "x@one.example")).action == pb.ACTION_ACCEPT
    await asyncio.sleep(1.1)
    assert reply(await mail(policy, "x@short.example")) == TEMPFAIL


async def test_r_dns_checks_skip_authenticated_and_trusted_sessions(
    policy: Policy, dns_server: LoopbackDnsServer
) -> None:
    await policy.settings({"dns": {"timeout_seconds": 0.3, "dnsbl_zones": ["zen.test"], "require_rdns": True,
                                   "reputation_zone": "rep.test"}})
    dns_server.mode = "silent"
    assert (await mail(policy, "x@unknown.example", account=BOB)).action == pb.ACTION_ACCEPT
    assert (await mail(policy, "x@unknown.example", ip=TRUSTED_IP)).action == pb.ACTION_ACCEPT
    assert reply(await mail(policy, "x@unknown.example")) == TEMPFAIL
    assert dns_server.queries  # the untrusted one did ask
    asked = len(dns_server.queries)
    await mail(policy, "x@unknown.example", account=BOB)
    assert len(dns_server.queries) == asked


async def test_r_rel_1_trusted_host_by_name(policy: Policy, dns_server: LoopbackDnsServer) -> None:
    dns_server.set("relay.partner.example", "A", "198.51.100.20")
    await policy.settings({"relay": {"trusted_hosts": ["127.0.0.1", "relay.partner.example"]}})
    allowed = await policy.rcpt("friend@remote.example", mail_from=BOB, ip="198.51.100.20")
    assert allowed.action == pb.ACTION_ACCEPT
    denied = await policy.rcpt("friend@remote.example", mail_from=BOB, ip="198.51.100.21")
    assert denied.code == 550
    assert dns_server.asked("relay.partner.example", "A") == 1  # cached after the first call
    # DNS down: no call waits for the timeout again and again.
    await policy.settings({"dns": {"timeout_seconds": 0.3},
                           "relay": {"trusted_hosts": ["relay.partner.example", "down.partner.example"]}})
    dns_server.silent_names.add("down.partner.example")
    await policy.rcpt("friend@remote.example", mail_from=BOB, ip="198.51.100.20")
    started = time.monotonic()
    for _ in range(5):
        assert (await policy.rcpt("friend@remote.example", mail_from=BOB, ip="198.51.100.20")).code == 250
    assert time.monotonic() - started < 0.5
    # A name that does not resolve trusts nobody (the stricter answer), and answers still come.
    dns_server.remove("relay.partner.example")
    await policy.settings({"relay": {"trusted_hosts": ["gone.partner.example"]}})
    assert (await policy.rcpt("friend@remote.example", mail_from=BOB, ip="198.51.100.20")).code == 550
