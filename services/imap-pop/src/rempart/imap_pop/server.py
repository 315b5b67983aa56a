"""The listeners: plain IMAP and POP3 (with STARTTLS/STLS) and their implicit-TLS twins, the
PROXY protocol from trusted balancers, the session budget, and draining on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from functools import partial

from rempart.imap_pop import replies as R
from rempart.imap_pop.imap import ImapSession
from rempart.imap_pop.pop3 import Pop3Session
from rempart.imap_pop.proxy import ProxyError, read_proxy_header
from rempart.imap_pop.session import IMAP_SESSIONS, POP3_SESSIONS, Backend, Session, ip_in
from rempart.imap_pop.stream import Stream

log = logging.getLogger(__name__)


class ImapPopServer:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.ports: dict[str, int] = {}
        self._servers: list[asyncio.Server] = []
        self._sessions: set[Session] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        settings = self.backend.settings
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
            server = await asyncio.start_server(
                partial(self._handle, protocol, implicit), settings.listen_host, port, limit=R.MAX_LINE * 2
            )
            self._servers.append(server)
            self.ports[name] = int(server.sockets[0].getsockname()[1])
        log.info("listening", extra={"ports": self.ports})

    @property
    def session_count(self) -> int:
        return len(self._sessions)

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
            if ip_in(client_ip, settings.proxy_cidrs()):
                async with asyncio.timeout(settings.proxy_header_timeout_seconds):
                    address = await read_proxy_header(stream)
                if address.client_ip is not None:
                    client_ip, client_port = address.client_ip, address.client_port or 0
            if implicit and self.backend.tls is not None:
                await stream.start_tls(self.backend.tls.context(), settings.tls_handshake_timeout_seconds)
            if len(self._sessions) >= settings.max_sessions or self.backend.draining:
                refusal = R.IMAP_BYE_TOO_MANY_SESSIONS if protocol == "imap" else R.POP3_TOO_MANY_SESSIONS
                await stream.send(refusal.encode() + b"\r\n")
                return
            cls = ImapSession if protocol == "imap" else Pop3Session
            session = cls(self.backend, stream, client_ip, client_port, protocol, implicit_tls=implicit)
            (IMAP_SESSIONS if protocol == "imap" else POP3_SESSIONS).inc()
            self._sessions.add(session)
            await session.run()
        except ProxyError as exc:
            log.warning("bad PROXY header: %s", exc, extra={"client_ip": client_ip})
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError, asyncio.IncompleteReadError) as exc:
            log.debug("session ended: %r", exc, extra={"client_ip": client_ip})
        except asyncio.CancelledError:
            log.info("session cancelled at shutdown", extra={"client_ip": client_ip})
        except Exception:
            log.exception("session failed", extra={"client_ip": client_ip})
        finally:
            if session is not None:
                self._sessions.discard(session)
            await stream.close()
            if task is not None:
                self._tasks.discard(task)

    async def stop_accepting(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 0.1)

    async def drain(self, grace: float) -> None:
        """Stop accepting; idle sessions get BYE now, busy ones after their command."""
        self.backend.draining = True
        for server in self._servers:
            server.close()
        for session in list(self._sessions):
            if session.waiting_for_command:
                bye = R.IMAP_BYE_SHUTDOWN if session.protocol == "imap" else R.POP3_SHUTDOWN
                with contextlib.suppress(Exception):
                    session.stream.write(bye.encode() + b"\r\n")
                    session.stream.writer.close()
        tasks = set(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2.0)
        log.info("drained", extra={"left": len(self._sessions)})
