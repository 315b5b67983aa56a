"""The service as a whole: concurrency, replicas sharing Redis, failing closed, health, events."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from policy_testkit import UNTRUSTED_IP, Policy, make_directory, started_policy
from prometheus_client import REGISTRY

from rempart.common.clients import PolicyClient
from rempart.common.pb.events.v1 import events_pb2
from rempart.common.pb.policy.v1 import policy_pb2 as pb
from rempart.common.redisconn import connect_redis
from rempart.common.testing.localstack import child_env, free_port, start_redis, wait_for_port
from rempart.policy import intrusion, replies


async def collect(nats_conn: NATS, subject: str) -> list[events_pb2.Event]:
    seen: list[events_pb2.Event] = []

    async def on_msg(msg: Msg) -> None:
        event = events_pb2.Event()
        event.ParseFromString(msg.data)
        seen.append(event)

    await nats_conn.subscribe(subject, cb=on_msg)
    await nats_conn.flush()
    return seen


async def settle(events: list[events_pb2.Event], expected: int, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while len(events) < expected and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)  # and nothing more arrives


async def test_r_ips_3_concurrent_unknown_recipients_block_exactly_once_per_ip(policy: Policy, nats_conn: NATS) -> None:
    events = await collect(nats_conn, "rempart.events.ips.blocked")
    ips = [f"198.51.100.{n}" for n in range(1, 51)]  # 50 IPs, 4 unknown recipients each
    calls = [policy.rcpt(f"nobody{k}@example.org", ip=ip, session_id=f"{ip}-{k}") for ip in ips for k in range(4)]
    verdicts = await asyncio.gather(*calls)
    assert len(verdicts) == 200
    assert sum(v.ip_blocked for v in verdicts) == 50
    assert sum(v.action == pb.ACTION_CLOSE for v in verdicts) == 50
    assert sum(v.code == 550 for v in verdicts) == 150
    assert sorted(b.ip for b in await intrusion.list_blocks(policy.redis)) == sorted(ips)
    await settle(events, 50)
    assert sorted(e.client_ip for e in events) == sorted(ips)


async def test_r_ips_1_two_replicas_share_counters(
    policy: Policy, redis_url: str, nats_url: str, redis: object
) -> None:
    async with started_policy(redis_url, nats_url, policy.redis) as second:
        for n, replica in enumerate((policy, second, policy)):
            verdict = await replica.rcpt(f"nobody{n}@example.org")
            assert (verdict.code, verdict.ip_blocked) == (550, False)
        fourth = await second.rcpt("nobody3@example.org")
        assert (fourth.action, fourth.code, fourth.ip_blocked) == (pb.ACTION_CLOSE, 421, True)
        # The block made on one replica refuses at the other.
        refused = await policy.check(pb.STAGE_CONNECT)
        assert (refused.code, refused.text) == (421, replies.intrusion_prevention_active(UNTRUSTED_IP))


async def test_r_ops_3_redis_down_fails_closed(tmp_path: Path, nats_url: str) -> None:
    server = start_redis(tmp_path / "redis")
    try:
        client = connect_redis(server.url)
        await make_directory(client)
        async with started_policy(server.url, nats_url, client) as policy:
            assert (await policy.rcpt("bob@example.org")).action == pb.ACTION_ACCEPT
            server.stop()
            for stage, fields in (
                (pb.STAGE_CONNECT, {}),
                (pb.STAGE_RCPT, {"recipient": "bob@example.org", "mail_from": "x@remote.example"}),
                (pb.STAGE_RCPT, {"recipient": "victim@remote.example", "mail_from": "x@remote.example"}),
                (pb.STAGE_AUTH, {"auth_success": False}),
                (pb.STAGE_RSET, {}),
            ):
                verdict = await policy.check(stage, **fields)
                assert (verdict.action, verdict.code, verdict.enhanced_code, verdict.text) == (
                    pb.ACTION_TEMPFAIL, 451, "4.3.0", replies.TEMPORARY_PROBLEM
                ), stage
        await client.aclose()
    finally:
        server.stop()


async def test_bad_client_ip_fails_closed(policy: Policy) -> None:
    verdict = await policy.check(pb.STAGE_CONNECT, ip="not-an-ip")
    assert (verdict.action, verdict.code, verdict.enhanced_code) == (pb.ACTION_TEMPFAIL, 451, "4.3.0")
    oversized = await policy.rcpt("a" * 2000 + "@example.org")
    assert (oversized.action, oversized.code) == (pb.ACTION_TEMPFAIL, 451)


async def test_health_serving_then_not_serving_on_drain(policy: Policy) -> None:
    health = health_pb2_grpc.HealthStub(policy.channel)
    for service in ("", "rempart.policy.v1.PolicyService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    drain = asyncio.create_task(policy.running.stop(1.0))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()
    await drain


async def test_r_ops_7_a_draining_replica_ends_idle_session_streams_and_sessions_go_on_elsewhere(
    policy: Policy, redis_url: str, nats_url: str
) -> None:
    # Edges hold one stream per SMTP session (issue 11). A replica that drains ends the streams
    # waiting between two stages, so it stops in seconds, not after its grace period, and each
    # session's next stage is decided by the other replica, never answered 451.
    async with started_policy(redis_url, nats_url, policy.redis) as second:
        client = PolicyClient(f"ipv4:127.0.0.1:{policy.running.port},127.0.0.1:{second.running.port}")
        try:
            sessions = [client.session() for _ in range(8)]

            def noop(n: int) -> pb.CheckRequest:
                return pb.CheckRequest(stage=pb.STAGE_COMMAND, command="NOOP", session=pb.SessionFacts(
                    session_id=f"drain-{n}", client_ip=UNTRUSTED_IP, protocol=pb.PROTOCOL_SMTP))

            first = [await session.check(noop(n)) for n, session in enumerate(sessions)]
            assert {v.action for v in first} == {pb.ACTION_ACCEPT}, first
            loop = asyncio.get_running_loop()
            started = loop.time()
            await asyncio.wait_for(policy.running.stop(30.0), 10.0)
            assert loop.time() - started < 10.0
            second_round = [await session.check(noop(n)) for n, session in enumerate(sessions)]
            assert [(v.action, v.rule) for v in second_round] == [(pb.ACTION_ACCEPT, "")] * len(sessions)
            for session in sessions:
                await session.close()
        finally:
            await client.close()


def test_runs_as_a_module_and_drains_on_sigterm(redis_url: str, nats_url: str, tmp_path: Path) -> None:
    grpc_port, ops_port = free_port(), free_port()
    env = child_env(
        REMPART_REDIS_URL=redis_url, REMPART_NATS_URL=nats_url, REMPART_GRPC_PORT=str(grpc_port),
        REMPART_OPS_PORT=str(ops_port), REMPART_GRPC_HOST="127.0.0.1", REMPART_OPS_HOST="127.0.0.1",
        REMPART_SHUTDOWN_GRACE_SECONDS="2",
    )
    log = (tmp_path / "policy.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "rempart.policy"], env=env, stdout=log, stderr=log)
    try:
        wait_for_port("127.0.0.1", grpc_port, timeout=20, proc=proc)
        wait_for_port("127.0.0.1", ops_port, timeout=20, proc=proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/readyz", timeout=5) as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, (tmp_path / "policy.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


async def test_r_ops_4_events_and_metrics(policy: Policy, nats_conn: NATS) -> None:
    relay = await collect(nats_conn, "rempart.events.relay.denied")
    exceeded = await collect(nats_conn, "rempart.events.limits.exceeded")
    await policy.rcpt("victim@remote.example", mail_from="spam@remote.example")
    await policy.settings({"limits": {"max_messages_per_day": 1}}, scope="account:bob@example.org")
    bob = "bob@example.org"
    await policy.rcpt("a@one.example", mail_from=bob, account=bob)
    await policy.rcpt("a@two.example", mail_from=bob, account=bob)
    await settle(relay, 1)
    await settle(exceeded, 1)
    assert [(e.client_ip, e.reason, e.attributes["recipient"]) for e in relay] == [
        (UNTRUSTED_IP, "R-REL-1", "victim@remote.example")
    ]
    assert [(e.account, e.attributes["limit"]) for e in exceeded] == [(bob, "account")]
    rejected = REGISTRY.get_sample_value(
        "rempart_policy_checks_total", {"stage": "STAGE_RCPT", "action": "ACTION_REJECT"}
    )
    assert rejected is not None and rejected >= 1
    assert (REGISTRY.get_sample_value("rempart_policy_check_seconds_count") or 0) >= 3
