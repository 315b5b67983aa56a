"""The listeners: plain IMAP and POP3 (with STARTTLS/STLS) and their implicit-TLS twins, the
PROXY protocol from trusted balancers, the session budget, closing every session of a freshly
blocked IP (R-IPS-4), and draining on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from functools import partial

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from rempart.common.events import IPS_BLOCKED
from rempart.common.ipblocks import BlockedScope, read_block_event
from rempart.common.netmatch import ip_in_networks
from rempart.imap_pop import replies as R
from rempart.imap_pop.imap import ImapSession
from rempart.imap_pop.pop3 import Pop3Session
from rempart.imap_pop.proxy import ProxyError, read_proxy_header
from rempart.imap_pop.session import IMAP_SESSIONS, POP3_SESSIONS, Backend, Session
from rempart.imap_pop.stream import Stream

log = logging.getLogger(__name__)


class ImapPopServer:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.ports: dict[str, int] = {}
        self._servers: list[asyncio.Server] = []
        self._sessions: dict[Session, asyncio.Task[None] | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ips_subscription: Subscription | None = None

    async def start(self) -> None:
        settings = self.backend.settings
        # Every replica listens, so a block decided anywhere closes the IP's sessions here too.
        self._ips_subscription = await self.backend.nc.subscribe(IPS_BLOCKED, cb=self._on_ip_blocked)
        listeners = [
            ("imap", settings.imap_port, "imap", False),
            ("pop3", settings.pop3_port, "pop3", False),
            ("imaps", settings.imaps_port, "imap", True),
            ("pop3s", settings.pop3s_port, "pop3", True),
        ]
        for name, port, protocol, implicit in listeners:
            if port < 0:
                continue
            if implicit and self.backend.tls is None:
                log.warning("no TLS certificate: %s listener off", name)
                continue
            # Implicit TLS is the listener's own when no balancer may send a PROXY header first:
            # the handshake then starts with the client's first byte. Upgrading in the session
            # instead races the client: a hello that arrives before the session task runs lands
            # in the plaintext buffer, is dropped there, and the handshake stalls.
            tls_here = implicit and self.backend.tls is not None and not settings.proxy_cidrs()
            server = await asyncio.start_server(
                partial(self._handle, protocol, implicit), settings.listen_host, port, limit=R.MAX_LINE * 2,
                ssl=self.backend.tls.context() if tls_here and self.backend.tls is not None else None,
                ssl_handshake_timeout=settings.tls_handshake_timeout_seconds if tls_here else None,
            )
            self._servers.append(server)
            self.ports[name] = int(server.sockets[0].getsockname()[1])
        log.info("listening", extra={"ports": self.ports})

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    async def _on_ip_blocked(self, msg: Msg) -> None:
        """R-IPS-4: when the setting says so, close every open session the block covers."""
        if not self.backend.config.server.ips.close_all_connections:
            return
        scope = read_block_event(msg.data)
        if scope is not None:
            closed = self.close_ip(scope, scope.refusal)
            if closed:
                log.info("closed sessions of a blocked IP", extra={"client_ip": scope.ip, "closed": closed})

    def close_ip(self, scope: BlockedScope | str, text: str) -> int:
        """Say ``text`` and close every session of ``scope`` (an IP, or a block's scope) now."""
        if isinstance(scope, str):
            scope = BlockedScope(ip=scope, prefix="")
        closed = 0
        for session, task in list(self._sessions.items()):
            if not scope.covers(session.client_ip) or session.closed_reason:
                continue
            session.closed_reason = text
            with contextlib.suppress(Exception):
                session.stream.write(session.goodbye(text))
                session.stream.close_now()  # sends the goodbye, then closes
            if task is not None:
                task.cancel()
            closed += 1
        return closed

    async def _handle(self, protocol: str, implicit: bool, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        stream = Stream(reader, writer)
        peer = writer.get_extra_info("peername") or ("", 0)
        client_ip, client_port = str(peer[0]), int(peer[1])
        session: Session | None = None
        settings = self.backend.settings
        try:
            if ip_in_networks(client_ip, settings.proxy_cidrs()):
                async with asyncio.timeout(settings.proxy_header_timeout_seconds):
                    address = await read_proxy_header(stream)
                if address.client_ip is not None:
                    client_ip, client_port = address.client_ip, address.client_port or 0
            if implicit and self.backend.tls is not None and not stream.tls:
                await stream.start_tls(self.backend.tls.context(), settings.tls_handshake_timeout_seconds)
            if len(self._sessions) >= settings.max_sessions or self.backend.draining:
                refusal = R.IMAP_BYE_TOO_MANY_SESSIONS if protocol == "imap" else R.POP3_TOO_MANY_SESSIONS
                await stream.send(refusal.encode() + b"\r\n")
                return
            cls = ImapSession if protocol == "imap" else Pop3Session
            session = cls(self.backend, stream, client_ip, client_port, protocol, implicit_tls=implicit)
            (IMAP_SESSIONS if protocol == "imap" else POP3_SESSIONS).inc()
            self._sessions[session] = task
            await session.run()
        except ProxyError as exc:
            log.warning("bad PROXY header: %s", exc, extra={"client_ip": client_ip})
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError, asyncio.IncompleteReadError) as exc:
            log.debug("session ended: %r", exc, extra={"client_ip": client_ip})
        except asyncio.CancelledError:
            if session is not None and session.closed_reason:
                log.info("session closed: %s", session.closed_reason,
                         extra={"client_ip": client_ip, "session": session.session_id})
            else:
                log.info("session cancelled at shutdown", extra={"client_ip": client_ip})
        except Exception:
            log.exception("session failed", extra={"client_ip": client_ip})
        finally:
            if session is not None:
                self._sessions.pop(session, None)
                if session.connected:
                    self.backend.spawn(session.report_disconnect(), name="policy-disconnect")
            await stream.close()
            if task is not None:
                self._tasks.discard(task)

    async def drain(self, grace: float) -> None:
        """Stop accepting; idle sessions get BYE now, busy ones after their command."""
        self.backend.draining = True
        if self._ips_subscription is not None:
            with contextlib.suppress(Exception):
                await self._ips_subscription.unsubscribe()
            self._ips_subscription = None
        for server in self._servers:
            server.close()
        for session in list(self._sessions):
            if session.waiting_for_command:
                bye = R.IMAP_BYE_SHUTDOWN if session.protocol == "imap" else R.POP3_SHUTDOWN
                with contextlib.suppress(Exception):
                    session.stream.write(bye.encode() + b"\r\n")
                    session.stream.close_now()
        tasks = set(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2.0)
        # The last disconnect reports reach policy, or give up with the grace period.
        if self.backend.background:
            await asyncio.wait(set(self.backend.background), timeout=max(grace, 0.1))
        # Space still being reclaimed: finished if it can be (what is left stays stored).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.backend.mailboxes.settle(), timeout=max(grace, 0.1))
        log.info("drained", extra={"left": len(self._sessions)})
