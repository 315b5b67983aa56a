"""The imap-pop service in-process against real Redis and NATS, with small real gRPC auth and
policy services, on free ports; clients are the standard library's imaplib and poplib.
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from rempart.common.clients import AuthClient, PolicyClient
from rempart.common.config import SettingsCache
from rempart.common.mailbox import Mailboxes, MailboxLog
from rempart.common.mailstore import INBOX, MailboxIndex, MessageStore
from rempart.common.pb.auth.v1 import auth_pb2_grpc
from rempart.common.pb.policy.v1 import policy_pb2_grpc
from rempart.common.testing.localstack import free_port
from rempart.imap_pop.app import build_tls
from rempart.imap_pop.listeners import ImapPopServer
from rempart.imap_pop.session import Backend
from rempart.imap_pop.settings import ImapPopSettings

# Test modules import the shared helpers below as ``imappop_helpers``.
sys.path.insert(0, str(Path(__file__).parent))

from imappop_helpers import BOB, AuthServicer, PolicyServicer


@dataclass
class Harness:
    server: ImapPopServer
    backend: Backend
    auth: AuthServicer
    policy: PolicyServicer
    cert_file: str
    ports: dict[str, int] = field(default_factory=dict)

    def client_tls(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.cert_file)
        return ctx

    async def deliver(self, data: bytes, account: str = BOB, folder: str = "", publish: bool = True) -> int:
        record, seq = await self.backend.store.accept(
            data, mail_from="alice@example.net", local_mailboxes=[account], remote_recipients=[], folder=folder
        )
        # As in service: the edge indexes inline, the catch-up indexer files it in the change log.
        await self.backend.mailboxes.place(record, None, seq)
        [places] = await self.backend.mailboxes.file([(record, seq)])
        if publish:
            await self.backend.publish_changed(account, folder or INBOX)
        return places[account].uid


StartService = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def start_service(
    redis: aioredis.Redis, nats_conn: NATS, tls_files: tuple[str, str]
) -> AsyncIterator[StartService]:
    started: list[tuple[ImapPopServer, grpc.aio.Server, PolicyClient, AuthClient]] = []

    async def start(auth_up: bool = True, proxy_cidrs: str = "", **overrides: Any) -> Harness:
        grpc_server = grpc.aio.server()
        auth_servicer, policy_servicer = AuthServicer(), PolicyServicer()
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(policy_servicer, grpc_server)
        if auth_up:
            auth_pb2_grpc.add_AuthServiceServicer_to_server(auth_servicer, grpc_server)
        grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
        await grpc_server.start()
        auth_target = f"127.0.0.1:{grpc_port}" if auth_up else f"127.0.0.1:{free_port()}"
        values: dict[str, Any] = dict(
            imap_port=0, imaps_port=0, pop3_port=0, pop3s_port=0, listen_host="127.0.0.1", ops_port=0,
            idle_poll_seconds=0.5, grpc_timeout_seconds=2.0, proxy_protocol_cidrs=proxy_cidrs,
            tls_cert_file=tls_files[0], tls_key_file=tls_files[1], policy_target=f"127.0.0.1:{grpc_port}",
            auth_target=auth_target,
        )
        values.update(overrides)
        settings = ImapPopSettings(**values)
        config = SettingsCache(redis)
        await config.refresh(force=True)
        policy = PolicyClient(settings.policy_target, settings.grpc_timeout_seconds)
        auth = AuthClient(settings.auth_target, settings.grpc_timeout_seconds)
        js = nats_conn.jetstream()
        backend = Backend(
            settings=settings, redis=redis, nc=nats_conn,
            mailboxes=Mailboxes(await MessageStore.open(js), MailboxIndex(redis), MailboxLog(js)), config=config, policy=policy, auth=auth,
            tls=build_tls(settings, config), instance="test",  # as the service builds it (SNI dir too)
        )
        server = ImapPopServer(backend)
        await server.start()
        started.append((server, grpc_server, policy, auth))
        return Harness(server, backend, auth_servicer, policy_servicer, tls_files[0], server.ports)

    yield start
    for server, grpc_server, policy, auth in started:
        await server.drain(1.0)
        await policy.close()
        await auth.close()
        await grpc_server.stop(None)


@pytest.fixture
async def service(start_service: StartService) -> Harness:
    return await start_service()
