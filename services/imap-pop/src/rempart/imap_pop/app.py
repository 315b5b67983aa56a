"""The imap-pop service's wiring: gRPC clients, message store, TLS and its reload, the listeners,
the mailbox indexer and the change log's compactor, SIGTERM drain."""

from __future__ import annotations

import asyncio
import logging

from rempart.common.clients import AuthClient, PolicyClient
from rempart.common.config import SettingsCache
from rempart.common.grpcutil import channel_check
from rempart.common.mailbox import Mailboxes, MailboxLog, run_indexer
from rempart.common.mailbox_snapshot import run_compactor
from rempart.common.mailstore import MailboxIndex, MessageStore
from rempart.common.redisconn import connect_redis
from rempart.common.runtime import ServiceRuntime
from rempart.common.tls import ServerTls
from rempart.imap_pop.listeners import ImapPopServer
from rempart.imap_pop.session import Backend
from rempart.imap_pop.settings import ImapPopSettings

log = logging.getLogger(__name__)
TLS_RELOAD_SECONDS = 60.0


def build_tls(settings: ImapPopSettings, config: SettingsCache) -> ServerTls | None:
    if not settings.tls_cert_file or not settings.tls_key_file:
        if settings.environment == "prod":
            raise ValueError("REMPART_TLS_CERT_FILE and REMPART_TLS_KEY_FILE are required in prod")
        log.warning("no TLS certificate configured: STARTTLS, IMAPS and POP3S are off")
        return None
    tls = config.server.tls
    return ServerTls.for_edge(settings, tls)  # the SNI directory too (R-TLS-3), as on the SMTP edge


async def _reload_tls(tls: ServerTls) -> None:
    # Certificates renewed on disk (a Kubernetes Secret update) are served without a restart.
    while True:
        await asyncio.sleep(TLS_RELOAD_SECONDS)
        tls.reload()


async def serve(settings: ImapPopSettings) -> None:
    async with ServiceRuntime("imap-pop", settings) as rt:
        tls = build_tls(settings, rt.config)
        policy = PolicyClient(settings.policy_target, settings.grpc_timeout_seconds)
        auth = AuthClient(settings.auth_target, settings.grpc_timeout_seconds)
        rt.ops.add_check("policy", channel_check(policy.channel))
        rt.ops.add_check("auth", channel_check(auth.channel))
        index = MailboxIndex(rt.redis)
        store = await MessageStore.open(rt.js, settings.inline_body_max_bytes)
        mailboxes = Mailboxes(store, index, MailboxLog(rt.js))
        backend = Backend(settings=settings, redis=rt.redis, nc=rt.nc, mailboxes=mailboxes, config=rt.config,
                          policy=policy, auth=auth, tls=tls,
                          instance=rt.instance)
        if tls is not None:
            tls_policy = tls

            async def apply_tls_policy() -> None:
                current = rt.config.server.tls
                tls_policy.set_policy(current.min_version, current.cipher_preset, current.honor_server_order)

            rt.config.on_change(apply_tls_policy)
        server = ImapPopServer(backend)
        await server.start()
        background: list[asyncio.Task[None]] = []
        if settings.run_indexer:
            # Waiting for replicas (WAIT) needs the writes and the WAIT on one connection.
            indexer_mailboxes = Mailboxes(
                store, MailboxIndex(connect_redis(settings.redis_url, max_connections=1)), mailboxes.log
            ) if settings.redis_wait_replicas else mailboxes
            indexer = run_indexer(rt.js, indexer_mailboxes, wait_replicas=settings.redis_wait_replicas, nc=rt.nc)
            background.append(asyncio.create_task(indexer, name="indexer"))
        if settings.mailbox_compact_records:
            # Keeps replay short (a rebuild after a Redis loss): one account at a time.
            compactor = run_compactor(rt.js, mailboxes, settings.mailbox_compact_records,
                                      settings.mailbox_compact_every_seconds)
            background.append(asyncio.create_task(compactor, name="compactor"))
        if tls is not None:
            background.append(asyncio.create_task(_reload_tls(tls), name="tls-reload"))
        await rt.wait_for_shutdown()
        await server.drain(settings.shutdown_grace_seconds)
        for task in background:
            task.cancel()
        if background:
            # Bounded: a task that swallows its cancellation must not keep the pod alive.
            await asyncio.wait(background, timeout=5)
        await policy.close()
        await auth.close()
