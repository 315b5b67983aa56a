"""One SMTP connection: aiosmtpd's protocol plus what Rempart tracks about the session."""

from __future__ import annotations

import asyncio
import os
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP

from rempart.common.pb.policy.v1 import policy_pb2

if TYPE_CHECKING:
    from rempart.smtp_edge.handler import EdgeHandler


@dataclass(frozen=True)
class Listener:
    name: str  # "smtp", "submission", "smtps"
    protocol: policy_pb2.Protocol.ValueType
    implicit_tls: bool = False
    require_starttls: bool = False


LISTENERS = {
    "smtp": Listener("smtp", policy_pb2.PROTOCOL_SMTP),
    "submission": Listener("submission", policy_pb2.PROTOCOL_SUBMISSION, require_starttls=True),
    "smtps": Listener("smtps", policy_pb2.PROTOCOL_SMTPS, implicit_tls=True),
}


@dataclass
class SessionState:
    session_id: str = field(default_factory=lambda: os.urandom(6).hex())
    client_ip: str = ""
    client_port: int = 0
    authenticated_account: str = ""
    auth_failures: int = 0
    # Per transaction: recipient -> (local mailboxes, remote recipients), and added headers.
    local_mailboxes: list[str] = field(default_factory=list)
    remote_recipients: list[str] = field(default_factory=list)
    discarded: int = 0
    add_headers: list[tuple[str, str]] = field(default_factory=list)

    def reset_transaction(self) -> None:
        self.local_mailboxes = []
        self.remote_recipients = []
        self.discarded = 0
        self.add_headers = []


class EdgeSMTP(SMTP):
    """aiosmtpd's SMTP with a policy check before the greeting and the session's state."""

    def __init__(self, handler: EdgeHandler, listener: Listener, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.listener = listener
        self.state = SessionState()
        self._greeted = False
        self.closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            peer = transport.get_extra_info("peername") or ("", 0)
            self.state.client_ip, self.state.client_port = str(peer[0]), int(peer[1])
            handler: EdgeHandler = self.event_handler
            handler.register(self)

    def connection_lost(self, error: Exception | None) -> None:
        handler: EdgeHandler = self.event_handler
        handler.unregister(self)
        self.closed.set()
        super().connection_lost(error)

    async def push(self, status: Any) -> None:
        if not self._greeted and isinstance(status, str) and status.startswith("220 "):
            # The greeting: decide on the connection first (R-IPS-4, R-REL-6), so that a blocked
            # client never gets a 220 and nothing it sent early is read as a command.
            self._greeted = True
            handler: EdgeHandler = self.event_handler
            refusal = await handler.on_connect(self)
            if refusal is not None:
                await super().push(refusal)
                self.close_now()
                return
        await super().push(status)

    def close_now(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def tls_info(self) -> tuple[str, str]:
        """(version, cipher) of the session's TLS, or ("", "")."""
        transport = self.transport
        ssl_object: ssl.SSLObject | None = None
        if transport is not None:
            ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return "", ""
        cipher = ssl_object.cipher()
        return str(ssl_object.version() or ""), str(cipher[0]) if cipher else ""

    @property
    def using_tls(self) -> bool:
        return bool(self.tls_info()[0])
