"""R-IPS-4, R-IPS-5, R-IPS-6, R-ADM-5: an IP blocked by hand through the API is refused by the
real policy service at the next connection, and by a real SMTP edge (its open connection closed
with a 421, a new one refused before the greeting); an unblock also clears its counters, so the
next connection is not blocked again; paged block lists; every block and unblock audited."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from rempart.common import keys
from rempart.common.pb.events.v1 import events_pb2
from rempart.common.pb.policy.v1 import policy_pb2 as pb
from rempart.common.runtime import ServiceRuntime
from rempart.smtp_edge.app import SmtpEdge
from rempart.smtp_edge.settings import SmtpEdgeSettings

from .conftest import ADMIN, Harness

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "policy" / "tests"))
from policy_testkit import UNTRUSTED_IP, Policy, started_policy

from rempart.policy import intrusion


@pytest.fixture
async def policy(redis_url: str, nats_url: str, redis: aioredis.Redis) -> AsyncIterator[Policy]:
    """The real policy service on the harness's Redis and NATS (its connect screen needs no directory)."""
    async with started_policy(redis_url, nats_url, redis) as running:
        yield running


async def test_r_ips_5_block_by_hand_refused_by_the_policy_and_unblock_clears_counters(
    harness: Harness, admin_headers: dict[str, str], policy: Policy, nats_conn: NATS
) -> None:
    http = harness.http
    # Five connections: the most a minute allows (max_connections_per_minute = 5).
    for _ in range(5):
        assert (await policy.check(pb.STAGE_CONNECT)).code == 220
    announced: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()

    async def on_block(msg: Msg) -> None:
        if not announced.done():
            announced.set_result(msg)

    sub = await nats_conn.subscribe("rempart.events.ips.blocked", cb=on_block)
    await nats_conn.flush()
    created = await http.post("/v1/ips/blocks", json={"ip": UNTRUSTED_IP, "reason": "abuse report #42",
                                                      "duration_minutes": 30}, headers=admin_headers)
    assert created.status_code == 201, created.text
    block = created.json()
    assert (block["ip"], block["reason"], block["blocked_by"]) == (UNTRUSTED_IP, "abuse report #42", ADMIN)
    assert 29 * 60 < block["expires_in_seconds"] <= 30 * 60
    # The edges hear of it as of the policy's own blocks (they close the IP's connections).
    event = events_pb2.Event.FromString((await asyncio.wait_for(announced, 5)).data)
    assert (event.client_ip, event.reason) == (UNTRUSTED_IP, "abuse report #42")
    await sub.unsubscribe()
    refused = await policy.check(pb.STAGE_CONNECT)
    assert (refused.action, refused.code, refused.enhanced_code) == (pb.ACTION_CLOSE, 421, "4.0.0")
    assert (await policy.check(pb.STAGE_CONNECT, ip="198.51.100.1")).code == 220
    assert [b.reason for b in await intrusion.list_blocks(policy.redis)] == ["abuse report #42"]
    listed = (await http.get("/v1/ips/blocks", headers=admin_headers)).json()
    assert [b["ip"] for b in listed["blocks"]] == [UNTRUSTED_IP] and listed["next_cursor"] is None
    counted = keys.ips_counter("*", UNTRUSTED_IP)  # whatever the policy counts for the address
    assert await policy.redis.keys(counted)
    # Unblocked: the sixth connection of the minute is accepted, not blocked again.
    assert (await http.delete(f"/v1/ips/blocks/{UNTRUSTED_IP}", headers=admin_headers)).status_code == 204
    assert await policy.redis.keys(counted) == []  # every counter the policy keeps for it is gone
    sixth = await policy.check(pb.STAGE_CONNECT)
    assert (sixth.code, sixth.ip_blocked) == (220, False)
    assert await intrusion.list_blocks(policy.redis) == []
    audit = (await http.get("/v1/audit", params={"kind": "ip_block"}, headers=admin_headers)).json()["events"]
    assert [(e["action"], e["object"]["id"]) for e in audit] == [("ip_unblocked", UNTRUSTED_IP),
                                                                 ("ip_blocked", UNTRUSTED_IP)]
    assert audit[1]["before"] is None and audit[1]["after"]["reason"] == "abuse report #42"
    assert audit[0]["before"]["reason"] == "abuse report #42" and audit[0]["after"] is None


async def test_r_ips_6_an_ipv6_block_covers_the_clients_prefix(
    harness: Harness, admin_headers: dict[str, str], policy: Policy
) -> None:
    created = await harness.http.post("/v1/ips/blocks", json={"ip": "2001:db8:1:2::10", "reason": "spam run"},
                                      headers=admin_headers)
    assert created.status_code == 201
    assert (created.json()["ip"], created.json()["prefix"]) == ("2001:db8:1:2::", "2001:db8:1:2::/64")
    other = await policy.check(pb.STAGE_CONNECT, ip="2001:db8:1:2:abcd::1")
    assert (other.action, other.code) == (pb.ACTION_CLOSE, 421)
    assert (await policy.check(pb.STAGE_CONNECT, ip="2001:db8:1:3::10")).code == 220
    assert 1439 * 60 < created.json()["expires_in_seconds"] <= 1440 * 60  # the default: one day


async def test_r_ips_5_blocks_refused_where_they_would_not_be_enforced(
    harness: Harness, admin_headers: dict[str, str]
) -> None:
    http = harness.http
    for ip, why in (("192.0.2.0/24", "not enforced"), ("2001:db8::/48", "/64"), ("nonsense", "not an IP")):
        reply = await http.post("/v1/ips/blocks", json={"ip": ip, "reason": "x"}, headers=admin_headers)
        assert reply.status_code == 422 and reply.headers["content-type"] == "application/problem+json"
        assert reply.json()["errors"][0]["field"] == "ip" and why in reply.json()["errors"][0]["detail"]
    too_long = await http.post("/v1/ips/blocks", json={"ip": "192.0.2.1", "reason": "x", "duration_minutes": 10**9},
                               headers=admin_headers)
    assert too_long.status_code == 422 and too_long.json()["errors"][0]["field"] == "duration_minutes"
    # An IPv4-mapped address is the IPv4 client, as the policy counts it.
    mapped = await http.post("/v1/ips/blocks", json={"ip": "::ffff:192.0.2.9", "reason": "x"}, headers=admin_headers)
    assert mapped.status_code == 201 and mapped.json()["ip"] == "192.0.2.9"
    await harness.add_account("boss@example.org", "Corr3ct-Horse-Battery!", "domain_admin")
    boss = await harness.login("boss@example.org", "Corr3ct-Horse-Battery!")
    assert (await http.post("/v1/ips/blocks", json={"ip": "192.0.2.1", "reason": "x"}, headers=boss)).status_code == 403


async def test_r_ips_6_an_ipv6_block_is_read_and_lifted_by_the_address_it_was_made_for(
    harness: Harness, admin_headers: dict[str, str], policy: Policy
) -> None:
    """Blocking 2001:db8::5 stores the block under its /64's network address; GET and DELETE of
    2001:db8::5 find it (before: 404, and the block stayed)."""
    http = harness.http
    assert (await http.post("/v1/ips/blocks", json={"ip": "2001:db8::5", "reason": "spam run"},
                            headers=admin_headers)).status_code == 201
    for name in ("2001:db8::5", "2001:db8::", "2001:db8:0:0:ffff::1"):  # any address of the /64, or as listed
        shown = await http.get(f"/v1/ips/blocks/{name}", headers=admin_headers)
        assert shown.status_code == 200, (name, shown.text)
        assert (shown.json()["ip"], shown.json()["prefix"]) == ("2001:db8::", "2001:db8::/64")
    assert (await http.get("/v1/ips/blocks/2001:db8:0:1::5", headers=admin_headers)).status_code == 404
    assert (await policy.check(pb.STAGE_CONNECT, ip="2001:db8::77")).code == 421
    assert (await http.delete("/v1/ips/blocks/2001:db8::5", headers=admin_headers)).status_code == 204
    assert (await policy.check(pb.STAGE_CONNECT, ip="2001:db8::77")).code == 220
    assert (await http.delete("/v1/ips/blocks/2001:db8::5", headers=admin_headers)).status_code == 404
    audit = (await http.get("/v1/audit", params={"kind": "ip_block"}, headers=admin_headers)).json()["events"]
    assert [(e["action"], e["object"]["id"]) for e in audit] == [("ip_unblocked", "2001:db8::"),
                                                                 ("ip_blocked", "2001:db8::")]


async def test_r_ips_5_an_ipv4_mapped_block_is_read_and_lifted_by_either_spelling(
    harness: Harness, admin_headers: dict[str, str]
) -> None:
    http = harness.http
    assert (await http.post("/v1/ips/blocks", json={"ip": "::ffff:192.0.2.9", "reason": "x"},
                            headers=admin_headers)).status_code == 201
    shown = await http.get("/v1/ips/blocks/::ffff:192.0.2.9", headers=admin_headers)
    assert shown.status_code == 200 and shown.json()["ip"] == "192.0.2.9"
    assert (await http.delete("/v1/ips/blocks/::ffff:192.0.2.9", headers=admin_headers)).status_code == 204
    assert (await http.get("/v1/ips/blocks/192.0.2.9", headers=admin_headers)).status_code == 404
    wide = await http.post("/v1/ips/blocks", json={"ip": "::ffff:192.0.2.0/120", "reason": "x"}, headers=admin_headers)
    assert wide.status_code == 422 and wide.json()["errors"][0]["field"] == "ip"


async def test_r_ips_5_a_whitelisted_or_trusted_address_is_not_blocked_by_hand(
    harness: Harness, admin_headers: dict[str, str]
) -> None:
    """The policy never refuses these (its ips_applies is False): a block would be shown and not
    enforced (before: 201)."""
    http = harness.http
    patched = await http.patch("/v1/settings", json={"ips": {"whitelist": ["198.51.100.0/24", "2001:db8:9::/48"]}},
                               headers=admin_headers)
    assert patched.status_code == 200, patched.text
    for ip in ("198.51.100.7", "::ffff:198.51.100.7", "2001:db8:9:1::1", "127.0.0.1"):  # 127.0.0.1: trusted
        reply = await http.post("/v1/ips/blocks", json={"ip": ip, "reason": "x"}, headers=admin_headers)
        assert reply.status_code == 422, (ip, reply.text)
        assert reply.json()["errors"][0]["field"] == "ip" and "never blocks" in reply.json()["errors"][0]["detail"]
    assert (await http.get("/v1/ips/blocks", headers=admin_headers)).json()["blocks"] == []

async def test_r_ips_5_block_list_pages_and_filters(harness: Harness, admin_headers: dict[str, str]) -> None:
    http = harness.http
    for n in range(5):
        reply = await http.post("/v1/ips/blocks", json={"ip": f"192.0.2.{n + 1}", "reason": f"case {n % 2}",
                                                        "duration_minutes": 10 + n}, headers=admin_headers)
        assert reply.status_code == 201
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, object] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await http.get("/v1/ips/blocks", params=params, headers=admin_headers)).json()
        seen += [b["ip"] for b in page["blocks"]]
        assert page["truncated"] is (page["next_cursor"] is not None)
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"192.0.2.{n + 1}" for n in range(5)]  # soonest expiry first
    odd = (await http.get("/v1/ips/blocks", params={"reason": "CASE 1"}, headers=admin_headers)).json()
    assert [b["ip"] for b in odd["blocks"]] == ["192.0.2.2", "192.0.2.4"]
    assert (await http.get("/v1/ips/blocks", params={"cursor": "bad"}, headers=admin_headers)).status_code == 422


@contextlib.asynccontextmanager
async def smtp_edge(redis_url: str, nats_url: str, tls_files: tuple[str, str], policy: Policy,
                    auth_port: int) -> AsyncIterator[tuple[SmtpEdge, ServiceRuntime]]:
    """The real SMTP edge on loopback, asking the real policy service, and taking the client's
    address from a PROXY header (so that a test speaks as 203.0.113.7 from 127.0.0.1)."""
    settings = SmtpEdgeSettings(
        redis_url=redis_url, nats_url=nats_url, smtp_port=0, submission_port=0, smtps_port=0, ops_port=0,
        ops_host="127.0.0.1", listen_host="127.0.0.1", policy_target=f"127.0.0.1:{policy.running.port}",
        auth_target=f"127.0.0.1:{auth_port}", tls_cert_file=tls_files[0], tls_key_file=tls_files[1],
        hostname="mx.test", log_format="text", environment="test", proxy_protocol_cidrs="127.0.0.1/32",
    )
    async with ServiceRuntime("smtp-edge", settings) as runtime:
        edge = SmtpEdge(runtime, settings)
        await edge.start()
        try:
            yield edge, runtime
        finally:
            await edge.drain(1)


def _connect_as(port: int, client_ip: str) -> tuple[socket.socket, BinaryIO, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), 10)
    sock.sendall(f"PROXY TCP4 {client_ip} 192.0.2.1 40000 25\r\n".encode())
    reader = sock.makefile("rb")
    return sock, reader, reader.readline().strip()


async def test_r_ips_4_a_block_by_hand_closes_and_refuses_real_smtp_connections(
    harness: Harness, admin_headers: dict[str, str], policy: Policy, redis_url: str, nats_url: str,
    tls_files: tuple[str, str], auth_server: tuple[object, int],
) -> None:
    http = harness.http
    patched = await http.patch("/v1/settings", json={"ips": {"close_all_connections": True}}, headers=admin_headers)
    assert patched.status_code == 200
    async with smtp_edge(redis_url, nats_url, tls_files, policy, auth_server[1]) as (edge, runtime):
        await runtime.config.refresh()
        await policy.running.runtime.config.refresh()
        port = edge.port("smtp")
        sock, reader, greeting = await asyncio.to_thread(_connect_as, port, UNTRUSTED_IP)
        assert greeting.startswith(b"220 ")
        created = await http.post("/v1/ips/blocks", json={"ip": UNTRUSTED_IP, "reason": "abuse report"},
                                  headers=admin_headers)
        assert created.status_code == 201
        # The open connection is closed with the 421, as for the policy's own blocks...
        last = await asyncio.to_thread(lambda: (reader.readline().strip(), reader.readline()))
        assert last == (f"421 4.0.0 Intrusion prevention active for [{UNTRUSTED_IP}]".encode(), b"")
        sock.close()
        # ... and a new one is refused before any greeting.
        sock, reader, refused = await asyncio.to_thread(_connect_as, port, UNTRUSTED_IP)
        assert refused == f"421 4.0.0 Intrusion prevention active for [{UNTRUSTED_IP}]".encode()
        sock.close()
        other, _, hello = await asyncio.to_thread(_connect_as, port, "198.51.100.20")
        assert hello.startswith(b"220 ")
        other.close()
        assert (await http.delete(f"/v1/ips/blocks/{UNTRUSTED_IP}", headers=admin_headers)).status_code == 204
        sock, reader, again = await asyncio.to_thread(_connect_as, port, UNTRUSTED_IP)
        assert again.startswith(b"220 ")
        sock.close()
