"""The SMTP edge's wiring: gRPC clients, message store, three listeners, the IPS close-all
subscription, certificate reload, SIGTERM drain."""

from __future__ import annotations

import asyncio
import logging
import ssl

from nats.aio.msg import Msg

from rempart.common.clients import AuthClient, PolicyClient
from rempart.common.events import IPS_BLOCKED
from rempart.common.grpcutil import channel_check
from rempart.common.ipblocks import read_block_event
from rempart.common.mailbox import Mailboxes, MailboxLog
from rempart.common.mailstore import MailboxIndex, MessageStore
from rempart.common.runtime import ServiceRuntime
from rempart.common.stats import StatsRecorder
from rempart.common.tls import ServerTls
from rempart.smtp_edge import replies
from rempart.smtp_edge.rdns import ReverseNames
from rempart.smtp_edge.session import LISTENERS, EdgeSMTP, Listener
from rempart.smtp_edge.settings import SmtpEdgeSettings
from rempart.smtp_edge.stages import EdgeHandler

log = logging.getLogger(__name__)
# At shutdown, for the closed sessions' last policy reports (within the pod's grace period).
DISCONNECT_REPORT_SECONDS = 2.0
# A draining edge closes a session quiet this long between two transactions (a client that
# paused, a mail client keeping its connection): long enough not to race a command on its way.
DRAIN_IDLE_SECONDS = 1.0

# Per-session budgets against abuse (aiosmtpd answers "421 4.7.0 <CMD> sent too many times").
COMMAND_CALL_LIMITS = {
    # A trusted MTA may keep one session for many messages (Postfix has no per-session cap):
    # the transaction commands get generous budgets, the rest small ones.
    "*": 100, "MAIL": 100000, "RCPT": 1000000, "DATA": 100000, "RSET": 100000, "EHLO": 10, "HELO": 10,
    "STARTTLS": 2, "AUTH": 5, "NOOP": 20, "VRFY": 5, "EXPN": 5, "HELP": 10,
}


class SmtpEdge:
    def __init__(self, runtime: ServiceRuntime, settings: SmtpEdgeSettings) -> None:
        self.runtime = runtime
        self.settings = settings
        self.policy = PolicyClient(settings.policy_target, settings.grpc_timeout_seconds)
        self.auth = AuthClient(settings.auth_target, settings.grpc_timeout_seconds)
        tls = runtime.config.server.tls
        self.tls = ServerTls.for_edge(settings, tls)
        self.handler: EdgeHandler | None = None
        self.servers: dict[str, asyncio.Server] = {}
        self._reload_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        store = await MessageStore.open(self.runtime.js, self.settings.inline_body_max_bytes)
        self.handler = EdgeHandler(
            hostname=self.settings.hostname,
            policy=self.policy,
            auth=self.auth,
            mailboxes=Mailboxes(store, MailboxIndex(self.runtime.redis), MailboxLog(self.runtime.js)),
            events=self.runtime.events,
            config=self.runtime.config,
            instance=self.runtime.instance,
            proxy_cidrs=self.settings.proxy_cidrs(),
            max_sessions=self.settings.max_sessions,
            rdns=ReverseNames(self.settings.nameservers()),
            stats=StatsRecorder(self.runtime.redis),
        )
        self.runtime.ops.add_check("policy", channel_check(self.policy.channel))
        self.runtime.ops.add_check("auth", channel_check(self.auth.channel))
        await self.runtime.nc.subscribe(IPS_BLOCKED, cb=self._on_ip_blocked)
        loop = asyncio.get_running_loop()
        ports = {"smtp": self.settings.smtp_port, "submission": self.settings.submission_port,
                 "smtps": self.settings.smtps_port}
        for name, port in ports.items():
            listener = LISTENERS[name]
            self.servers[name] = await loop.create_server(
                lambda listener=listener: self._protocol(listener),  # type: ignore[misc]
                host=self.settings.listen_host,
                port=port,
                ssl=self.tls.context() if listener.implicit_tls else None,
                ssl_handshake_timeout=30 if listener.implicit_tls else None,
                reuse_address=True,
            )
        self._reload_task = asyncio.create_task(self._reload_certificates())
        log.info("SMTP edge listening", extra={"ports": {n: self.port(n) for n in self.servers}})

    def port(self, name: str) -> int:
        return int(self.servers[name].sockets[0].getsockname()[1])

    def _protocol(self, listener: Listener) -> EdgeSMTP:
        assert self.handler is not None
        limits = self.runtime.config.server.limits
        smtp = EdgeSMTP(
            self.handler,
            listener,
            hostname=self.settings.hostname,
            ident=replies.GREETING_IDENT,
            data_size_limit=limits.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=None if listener.implicit_tls else self.tls.context(),
            require_starttls=listener.require_starttls,
            timeout=self.settings.command_timeout_seconds,
            auth_require_tls=not listener.implicit_tls,
            command_call_limit=COMMAND_CALL_LIMITS,
            proxy_protocol_timeout=(
                self.settings.proxy_protocol_timeout_seconds if self.settings.proxy_cidrs() else None
            ),
        )
        return smtp

    async def _on_ip_blocked(self, msg: Msg) -> None:
        """R-IPS-4: optionally close every other open connection the fresh block covers."""
        if self.handler is None or not self.runtime.config.server.ips.close_all_connections:
            return
        scope = read_block_event(msg.data)
        if scope is None:
            return
        closed = self.handler.connections.close_ip(scope, replies.IP_BLOCKED.format(refusal=scope.refusal))
        if closed:
            log.info("closed connections of a blocked IP", extra={"client_ip": scope.ip, "closed": closed})

    async def _reload_certificates(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tls_reload_seconds)
            tls = self.runtime.config.server.tls
            try:
                self.tls.set_policy(tls.min_version, tls.cipher_preset, tls.honor_server_order)
                self.tls.reload()
            except (OSError, ssl.SSLError) as exc:
                log.error("TLS reload failed: %s", exc)

    async def drain(self, grace: float) -> None:
        """SIGTERM: new connections get "421 4.3.2" while open sessions finish within the grace
        period (the pod is already leaving the load balancer); then every listener closes.

        A session ends at its next transaction: its MAIL is answered 421 (stages.handle_MAIL), and
        a session quiet between transactions for DRAIN_IDLE_SECONDS is told 421 and closed. A
        client that keeps its session for message after message would otherwise hold the pod
        for the whole grace period (20 s of a rolling update, per replica)."""
        if self.handler is not None:
            self.handler.draining = True
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            while len(self.handler.connections) and loop.time() < deadline:
                self.handler.connections.close_idle(replies.SHUTTING_DOWN, DRAIN_IDLE_SECONDS)
                await asyncio.sleep(0.2)
            self.handler.connections.close_all(replies.SHUTTING_DOWN)
            # Their DISCONNECT reports (the policy's simultaneous-connection counts) before the
            # channels close: the rolling-update test saw the last one fail with UsageError.
            await self.handler.settle(DISCONNECT_REPORT_SECONDS)
        for server in self.servers.values():
            server.close()
        if self._reload_task is not None:
            self._reload_task.cancel()
        await self.policy.close()
        await self.auth.close()
        if self.handler is not None and self.handler.stats is not None:
            await self.handler.stats.close()  # the last second's counts (GET /v1/stats)


async def serve(settings: SmtpEdgeSettings) -> None:
    async with ServiceRuntime("smtp-edge", settings) as runtime:
        edge = SmtpEdge(runtime, settings)
        await edge.start()
        await runtime.wait_for_shutdown()
        await edge.drain(settings.shutdown_grace_seconds)
