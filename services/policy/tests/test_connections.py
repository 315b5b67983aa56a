"""Connection-level rules: HELO filter (R-REL-5), tarpit (R-REL-6), simultaneous connections
(R-IPS-3), and settings reaching every replica within 2 s (R-OPS-1)."""

from __future__ import annotations

import asyncio
import time

from policy_testkit import TRUSTED_IP, UNTRUSTED_IP, Policy, started_policy

from rempart.common import keys
from rempart.common.config import SettingsStore
from rempart.common.events import EventBus, connect_nats
from rempart.common.pb.policy.v1 import policy_pb2 as pb
from rempart.common.testing.dnsserver import LoopbackDnsServer
from rempart.policy import intrusion

HELO_RULES = [
    {"match": "exact", "pattern": "good.dynamic.example", "action": "accept"},
    {"match": "wildcard", "pattern": "*.dynamic.example", "action": "reject"},
    {"match": "regex", "pattern": r"^\d+-\d+-\d+-\d+\.", "action": "reject"},
    {"match": "regex", "pattern": "(unclosed", "action": "reject"},  # skipped, never fatal
    {"match": "exact", "pattern": "localhost", "action": "reject"},
]


def reply(verdict: pb.Verdict) -> tuple[int, int, str, str]:
    return verdict.action, verdict.code, verdict.enhanced_code, verdict.text


async def test_r_rel_5_helo_filter_rules_and_bypass(policy: Policy) -> None:
    async def helo(name: str, ip: str = UNTRUSTED_IP) -> pb.Verdict:
        return await policy.check(pb.STAGE_HELO, helo=name, ip=ip)

    await policy.settings({"relay": {"helo_rules": HELO_RULES}})
    assert (await helo("host1.dynamic.example")).action == pb.ACTION_ACCEPT  # off by default
    await policy.settings({"relay": {"helo_filter_enabled": True, "helo_rules": HELO_RULES,
                                     "helo_bypass": ["198.51.100.0/24"]}})
    for name in ("host1.dynamic.example", "HOST2.Dynamic.Example.", "1-2-3-4.isp.example", "localhost"):
        verdict = await helo(name)
        assert reply(verdict) == (pb.ACTION_REJECT, 550, "5.7.1", f"<{name}>... HELO rejected"), name
        assert verdict.rule == "R-REL-5"
    for name in ("good.dynamic.example", "mail.example.com", "dynamic.example", "x1-2-3-4.isp.example"):
        assert (await helo(name)).action == pb.ACTION_ACCEPT, name
    assert (await helo("host1.dynamic.example", ip="198.51.100.7")).action == pb.ACTION_ACCEPT
    assert (await helo("host1.dynamic.example", ip=TRUSTED_IP)).action == pb.ACTION_ACCEPT
    # An absurdly long HELO is matched on its first 255 characters only, quickly.
    started = time.monotonic()
    assert (await helo("a" * 1000 + ".dynamic.example")).action == pb.ACTION_ACCEPT
    assert time.monotonic() - started < 1


async def test_r_rel_6_connect_delay_tarpit(policy: Policy) -> None:
    assert (await policy.check(pb.STAGE_CONNECT)).delay_ms == 0  # default 0
    await policy.settings({"relay": {"connect_delay_seconds": 1.5}})
    verdict = await policy.check(pb.STAGE_CONNECT)
    assert (verdict.action, verdict.code, verdict.delay_ms) == (pb.ACTION_ACCEPT, 220, 1500)
    assert (await policy.check(pb.STAGE_CONNECT, ip=TRUSTED_IP)).delay_ms == 0
    # Only the greeting waits.
    assert (await policy.check(pb.STAGE_HELO, helo="mail.example.com")).delay_ms == 0


async def test_r_ips_3_simultaneous_connections(policy: Policy) -> None:
    await policy.settings({"ips": {"max_simultaneous_connections": 2, "max_connections_per_minute": 0,
                                   "simultaneous_exceptions": ["198.51.100.0/24"]}})

    async def connect(session: str, ip: str = UNTRUSTED_IP) -> pb.Verdict:
        return await policy.check(pb.STAGE_CONNECT, ip=ip, session_id=session)

    assert (await connect("a1")).action == pb.ACTION_ACCEPT
    assert (await connect("a2")).action == pb.ACTION_ACCEPT
    third = await connect("a3")
    assert reply(third) == (pb.ACTION_CLOSE, 421, "4.7.0", "Too many connections from [203.0.113.7]")
    assert third.ip_blocked and third.rule == "R-IPS-3"
    assert [b.reason for b in await intrusion.list_blocks(policy.redis)] == ["R-IPS-3 simultaneous connections"]
    # DISCONNECT frees a place.
    other = "203.0.113.8"
    assert (await connect("b1", other)).action == pb.ACTION_ACCEPT
    assert (await connect("b2", other)).action == pb.ACTION_ACCEPT
    assert (await policy.check(pb.STAGE_DISCONNECT, ip=other, session_id="b1")).action == pb.ACTION_ACCEPT
    assert (await connect("b3", other)).action == pb.ACTION_ACCEPT
    # Self-healing: a session an edge never closed (it crashed) stops counting when it expires.
    key = keys.ips_connections(other)
    await policy.redis.zadd(key, {"|b2": time.time() - 1})  # b2 is past its expiry
    assert (await connect("b4", other)).action == pb.ACTION_ACCEPT
    ttl = await policy.redis.ttl(key)
    assert 1700 < ttl <= 1800
    # Exceptions and trusted hosts are never counted.
    for n in range(5):
        assert (await connect(f"c{n}", "198.51.100.9")).action == pb.ACTION_ACCEPT
        assert (await connect(f"t{n}", TRUSTED_IP)).action == pb.ACTION_ACCEPT


async def _wait_applied(replica: Policy, relays: bool, deadline: float) -> None:
    """Poll until the replica relays (or refuses) for 192.0.2.77, as the changed setting says."""
    while True:
        verdict = await replica.rcpt("friend@remote.example", mail_from="bob@example.org",
                                     ip="192.0.2.77", session_id="reload")
        if (verdict.action == pb.ACTION_ACCEPT) == relays:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"setting not applied within 2 s: {verdict.code} {verdict.text}")
        await asyncio.sleep(0.05)


async def test_r_ops_1_settings_reach_every_replica_within_2s(
    policy: Policy, redis_url: str, nats_url: str, dns_server: LoopbackDnsServer
) -> None:
    await policy.settings({"ips": {"max_relay_denials": 0}})
    async with started_policy(redis_url, nats_url, policy.redis, dns_server.address) as second:
        replicas = (policy, second)
        for replica in replicas:
            await _wait_applied(replica, False, time.monotonic() + 2)
        store = SettingsStore(policy.redis)
        nc = await connect_nats(nats_url, "admin-test")
        try:
            # With the change event, as the admin API does it.
            version = await store.put_doc("server", {"ips": {"max_relay_denials": 0},
                                                     "relay": {"trusted_hosts": ["192.0.2.77"]}})
            await EventBus(nc, "admin-api").config_changed("server", version)
            deadline = time.monotonic() + 2
            await asyncio.gather(*(_wait_applied(r, True, deadline) for r in replicas))
        finally:
            await nc.close()
        # Without the event (lost): polling the version is the fallback.
        await store.put_doc("server", {"ips": {"max_relay_denials": 0}})
        deadline = time.monotonic() + 2
        await asyncio.gather(*(_wait_applied(r, False, deadline) for r in replicas))
