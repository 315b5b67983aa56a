"""Test helpers: the policy service and a real gRPC client for it (imported by the tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import redis.asyncio as aioredis

from rempart.common.config import SettingsStore
from rempart.common.directory import Directory
from rempart.common.pb.policy.v1 import policy_pb2, policy_pb2_grpc
from rempart.policy.app import RunningPolicy, running_policy
from rempart.policy.settings import PolicySettings

UNTRUSTED_IP = "203.0.113.7"
TRUSTED_IP = "127.0.0.1"


# What every test's DNS server serves: the remote sender domains the tests use exist.
BASE_ZONE: dict[str, dict[str, list[str]]] = {
    "remote.example": {"A": ["192.0.2.1"]},
    "one.example": {"MX": ["10 mx.one.example."]},
    "two.example": {"MX": ["10 mx.two.example."]},
}


def policy_settings(redis_url: str, nats_url: str, nameservers: str = "") -> PolicySettings:
    return PolicySettings(
        redis_url=redis_url,
        nats_url=nats_url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        ops_host="127.0.0.1",
        ops_port=0,
        log_format="text",
        log_level="WARNING",
        shutdown_grace_seconds=1.0,
        dns_nameservers=nameservers,
        hostname="mx.rempart.test",
    )


class Policy:
    """A running policy service and a real gRPC client for it."""

    def __init__(self, running: RunningPolicy, channel: grpc.aio.Channel, redis: aioredis.Redis) -> None:
        self.running = running
        self.channel = channel
        self.stub = policy_pb2_grpc.PolicyServiceStub(channel)
        self.redis = redis

    async def settings(self, doc: dict[str, Any], scope: str = "server") -> None:
        await SettingsStore(self.redis).put_doc(scope, doc)
        await self.running.runtime.config.refresh()

    async def check(
        self,
        stage: int,
        *,
        ip: str = UNTRUSTED_IP,
        protocol: int = policy_pb2.PROTOCOL_SMTP,
        account: str = "",
        session_id: str = "s1",
        helo: str = "",
        **fields: Any,
    ) -> policy_pb2.Verdict:
        request = policy_pb2.CheckRequest(
            stage=stage,  # type: ignore[arg-type]
            session=policy_pb2.SessionFacts(
                session_id=session_id, client_ip=ip, protocol=protocol,  # type: ignore[arg-type]
                authenticated_account=account, helo_name=helo,
            ),
            **fields,
        )
        verdict: policy_pb2.Verdict = await self.stub.Check(request, timeout=5)
        return verdict

    async def rcpt(self, recipient: str, mail_from: str = "someone@remote.example", **kw: Any) -> policy_pb2.Verdict:
        return await self.check(policy_pb2.STAGE_RCPT, mail_from=mail_from, recipient=recipient, **kw)


async def make_directory(redis: aioredis.Redis) -> Directory:
    directory = Directory(redis)
    await directory.add_domain("example.org")
    await directory.add_domain_alias("example.net", "example.org")
    await directory.add_account("bob@example.org")
    await directory.add_account("alice@example.org")
    await directory.add_alias("sales@example.org", ["bob@example.org", "partner@remote.example"])
    await directory.add_alias("robert@example.org", ["bob@example.org"])
    return directory


@asynccontextmanager
async def started_policy(
    redis_url: str, nats_url: str, redis: aioredis.Redis, nameservers: str = ""
) -> AsyncIterator[Policy]:
    async with running_policy(policy_settings(redis_url, nats_url, nameservers)) as running:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        try:
            yield Policy(running, channel, redis)
        finally:
            await channel.close()
