"""The service as a whole: events on NATS, fail-closed on Redis loss, health and draining, metrics."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from rempart.auth.app import serve
from rempart.auth.settings import AuthSettings
from rempart.common.directory import Directory
from rempart.common.pb.auth.v1 import auth_pb2, auth_pb2_grpc
from rempart.common.redisconn import connect_redis
from rempart.common.testing.localstack import free_port, start_redis

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from conftest import AuthHarness, EventTap

GOOD = "Blue-Heron-42-Quiet"
BOB = "bob@example.org"


async def test_r_ops_4_login_events_name_the_reason_and_never_the_password(
    auth_events: EventTap, auth: AuthHarness
) -> None:
    # auth_events is subscribed before the fixture sets bob's password: that event is seen too.
    assert (
        await auth.login("nobody@example.org", "Secret-Guess-1", protocol="pop3")
    ).status == auth_pb2.AUTH_STATUS_INVALID
    assert (await auth.login(BOB, "Secret-Guess-2", protocol="smtp")).status == auth_pb2.AUTH_STATUS_INVALID
    assert (await auth.login(BOB, GOOD, client_ip="203.0.113.9")).status == auth_pb2.AUTH_STATUS_OK
    unknown, bad = await auth_events.wait_for("login_failed", 2)
    assert (unknown.reason, unknown.account, unknown.attributes["login"], unknown.protocol) == (
        "unknown_user",
        "",
        "nobody@example.org",
        "pop3",
    )
    assert (bad.reason, bad.account, bad.protocol, bad.client_ip) == ("bad_password", BOB, "smtp", "192.0.2.10")
    (ok,) = await auth_events.wait_for("login_ok")
    assert ok.account == BOB and ok.client_ip == "203.0.113.9"
    await auth_events.wait_for("password_changed")
    for raw in auth_events.raw:
        for secret in (GOOD, "Secret-Guess-1", "Secret-Guess-2"):
            assert secret.encode() not in raw


async def test_r_ops_4_attempt_metrics(auth: AuthHarness) -> None:
    def sample(result: str, protocol: str = "imap") -> float:
        return REGISTRY.get_sample_value("rempart_auth_attempts_total", {"protocol": protocol, "result": result}) or 0.0

    ok, invalid, other = sample("ok"), sample("invalid"), sample("invalid", "other")
    hashes = REGISTRY.get_sample_value("rempart_auth_hash_seconds_count") or 0.0
    await auth.login(BOB, GOOD)
    await auth.login(BOB, "nope")
    await auth.login(BOB, "nope", protocol="gopher")
    assert (sample("ok"), sample("invalid"), sample("invalid", "other")) == (ok + 1, invalid + 1, other + 1)
    assert (REGISTRY.get_sample_value("rempart_auth_hash_seconds_count") or 0.0) == hashes + 3


async def test_r_ops_3_redis_down_gives_tempfail(
    tmp_path: Path, nats_url: str, make_auth: Callable[..., Awaitable[AuthHarness]]
) -> None:
    own_redis = start_redis(tmp_path / "redis")
    try:
        client = connect_redis(own_redis.url)
        directory = Directory(client)
        await directory.add_domain("example.org")
        await directory.add_account(BOB)
        await client.aclose()
        auth = await make_auth(redis_url=own_redis.url)
        assert (await auth.set_password(BOB, GOOD)).ok
        assert (await auth.login(BOB, GOOD)).status == auth_pb2.AUTH_STATUS_OK
    finally:
        own_redis.stop()
    for password in (GOOD, "wrong"):
        assert (await auth.login(BOB, password)).status == auth_pb2.AUTH_STATUS_TEMPFAIL
    try:
        await auth.set_password(BOB, GOOD)
        raise AssertionError("SetPassword succeeded without Redis")
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_serving_then_drains_on_sigterm(build_settings: Callable[..., AuthSettings]) -> None:
    port = free_port()
    task = asyncio.create_task(serve(build_settings(grpc_port=port)))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(service="rempart.auth.v1.AuthService"), timeout=1)
            break
        except grpc.aio.AioRpcError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    assert (await stub.Authenticate(auth_pb2.AuthenticateRequest(login="x", password="y"), timeout=5)).status == (
        auth_pb2.AUTH_STATUS_INVALID
    )
    os.kill(os.getpid(), signal.SIGTERM)  # the runtime's handler turns it into a drain
    await asyncio.wait_for(task, 10)
    await channel.close()
