"""The auth service started in-process against the real Redis and NATS of the root fixtures,
with cheap Argon2 parameters, reached through a real gRPC channel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from rempart.auth.app import RunningAuth, running
from rempart.auth.settings import AuthSettings
from rempart.common.config import SettingsStore
from rempart.common.directory import Directory
from rempart.common.pb.auth.v1 import auth_pb2, auth_pb2_grpc
from rempart.common.pb.events.v1 import events_pb2

GOOD_PASSWORD = "Blue-Heron-42-Quiet"
BOB = "bob@example.org"


def auth_settings(**overrides: Any) -> AuthSettings:
    values: dict[str, Any] = {
        "environment": "test",
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "ops_host": "127.0.0.1",
        "ops_port": 0,
        "argon2_time_cost": 1,
        "argon2_memory_kib": 1024,
        "slow_down_step_ms": 150,
        "shutdown_grace_seconds": 1.0,
        "log_format": "text",
    }
    values.update(overrides)
    return AuthSettings(**values)


@pytest.fixture
def build_settings(redis_url: str, nats_url: str) -> Callable[..., AuthSettings]:
    def build(**overrides: Any) -> AuthSettings:
        return auth_settings(**{"redis_url": redis_url, "nats_url": nats_url, **overrides})

    return build


@dataclass
class AuthHarness:
    service: RunningAuth
    stub: auth_pb2_grpc.AuthServiceAsyncStub
    channel: grpc.aio.Channel
    redis: aioredis.Redis
    directory: Directory
    store: SettingsStore

    async def login(
        self, login: str, password: str, client_ip: str = "192.0.2.10", protocol: str = "imap"
    ) -> auth_pb2.AuthenticateResponse:
        reply: auth_pb2.AuthenticateResponse = await self.stub.Authenticate(
            auth_pb2.AuthenticateRequest(
                login=login,
                password=password,
                client_ip=client_ip,
                protocol=protocol,
                mechanism="PLAIN",
                session_id="test-session",
            ),
            timeout=20,
        )
        return reply

    async def set_password(
        self, account: str, password: str, skip_policy: bool = False
    ) -> auth_pb2.SetPasswordResponse:
        reply: auth_pb2.SetPasswordResponse = await self.stub.SetPassword(
            auth_pb2.SetPasswordRequest(account=account, password=password, skip_policy=skip_policy), timeout=10
        )
        return reply

    async def server_settings(self, doc: dict[str, Any]) -> None:
        """Write the server-scope settings and make the running service reload them now."""
        await self.store.put_doc("server", doc)
        await self.service.runtime.config.refresh()


@pytest.fixture
async def make_auth(
    redis_url: str, nats_url: str, redis: aioredis.Redis
) -> AsyncIterator[Callable[..., Awaitable[AuthHarness]]]:
    stack: list[tuple[Any, grpc.aio.Channel]] = []

    async def start(**overrides: Any) -> AuthHarness:
        settings = {"redis_url": redis_url, "nats_url": nats_url, **overrides}
        context = running(auth_settings(**settings))
        service = await context.__aenter__()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}")
        stack.append((context, channel))
        return AuthHarness(
            service, auth_pb2_grpc.AuthServiceStub(channel), channel, redis, Directory(redis), SettingsStore(redis)
        )

    yield start
    for context, channel in reversed(stack):
        await channel.close()
        await context.__aexit__(None, None, None)


@pytest.fixture
async def auth(make_auth: Callable[..., Awaitable[AuthHarness]]) -> AuthHarness:
    """A running service with example.org, bob@example.org (password set through gRPC) and no
    failure delay, so that tests about counting run fast; delay tests set it back."""
    harness = await make_auth()
    await harness.server_settings({"login": {"failure_delay_ms": 0}})
    await harness.directory.add_domain("example.org")
    await harness.directory.add_account(BOB)
    reply = await harness.set_password(BOB, GOOD_PASSWORD)
    assert reply.ok, list(reply.violations)
    return harness


class EventTap:
    def __init__(self) -> None:
        self.events: list[events_pb2.Event] = []
        self.raw: list[bytes] = []

    async def handler(self, msg: Msg) -> None:
        self.raw.append(msg.data)
        self.events.append(events_pb2.Event.FromString(msg.data))

    def named(self, what: str) -> list[events_pb2.Event]:
        return [e for e in self.events if e.what == what]

    async def wait_for(self, what: str, count: int = 1, timeout: float = 5.0) -> list[events_pb2.Event]:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.named(what)) < count:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no {what} event after {timeout}s; got {[e.what for e in self.events]}")
            await asyncio.sleep(0.02)
        return self.named(what)


@pytest.fixture
async def auth_events(nats_conn: NATS) -> EventTap:
    tap = EventTap()
    await nats_conn.subscribe("rempart.events.auth.>", cb=tap.handler)
    await nats_conn.flush()
    return tap
