"""One SMTP connection: aiosmtpd's protocol plus what Rempart tracks about the session."""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP

from rempart.common.clients import PolicySession
from rempart.common.pb.policy.v1 import policy_pb2
from rempart.smtp_edge import replies

if TYPE_CHECKING:
    from rempart.smtp_edge.handler import EdgeHandler


MAIL_DSN_PARAMS = {"RET", "ENVID"}
RCPT_DSN_PARAMS = {"NOTIFY", "ORCPT"}
NOTIFY_VALUES = {"NEVER", "SUCCESS", "FAILURE", "DELAY"}


def take_dsn_params(arg: str, names: set[str]) -> tuple[str, dict[str, str], str]:
    """Split the RFC 3461 parameters ``names`` out of a MAIL/RCPT argument.

    Returns (the argument without them, the parameters, an error reply or "").
    """
    end = arg.rfind(">")
    if end < 0:
        return arg, {}, ""
    kept: list[str] = []
    found: dict[str, str] = {}
    for token in arg[end + 1:].split():
        key, sep, value = token.partition("=")
        if key.upper() not in names:
            kept.append(token)
            continue
        key = key.upper()
        if not sep or not value or len(value) > 500 or key in found:
            return arg, {}, f"501 5.5.4 Invalid {key} parameter"
        if key == "RET" and value.upper() not in ("FULL", "HDRS"):
            return arg, {}, "501 5.5.4 Invalid RET parameter"
        if key == "NOTIFY":
            values = set(value.upper().split(","))
            if not values <= NOTIFY_VALUES or ("NEVER" in values and len(values) > 1):
                return arg, {}, "501 5.5.4 Invalid NOTIFY parameter"
            value = value.upper()
        if key == "ORCPT" and ";" not in value:
            return arg, {}, "501 5.5.4 Invalid ORCPT parameter"
        found[key] = value
    return " ".join([arg[: end + 1], *kept]), found, ""


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
    # DSN (RFC 3461): the transaction's RET/ENVID and per-recipient NOTIFY/ORCPT.
    dsn: dict[str, str] = field(default_factory=dict)
    pending_dsn: dict[str, str] = field(default_factory=dict)
    errors: int = 0
    # TLS ended at a trusted load balancer (PROXY v2 PP2_TYPE_SSL): (version, cipher).
    proxied_tls: tuple[str, str] | None = None
    remote_senders: dict[str, str] = field(default_factory=dict)
    rdns: asyncio.Task[str] | None = None
    # The session's conversation with policy (one stream, issue 11), opened at CONNECT.
    policy: PolicySession | None = None

    def reset_transaction(self) -> None:
        self.local_mailboxes = []
        self.remote_recipients = []
        self.discarded = 0
        self.add_headers = []
        self.dsn = {}
        self.remote_senders = {}


class EdgeSMTP(SMTP):
    """aiosmtpd's SMTP with a policy check before the greeting and the session's state."""

    def __init__(self, handler: EdgeHandler, listener: Listener, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.listener = listener
        self.state = SessionState()
        self._greeted = False
        self._in_ehlo = False
        self._last_received = time.monotonic()
        self.closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            peer = transport.get_extra_info("peername") or ("", 0)
            self.state.client_ip, self.state.client_port = str(peer[0]), int(peer[1])
            handler: EdgeHandler = self.event_handler
            handler.register(self)
            handler.update_auth_policy(self)

    def eof_received(self) -> bool | None:
        # aiosmtpd cancels the session on EOF and may keep the socket half-open; when the
        # client hung up before the greeting (a load balancer's health check, a scanner) that
        # leaked the connection for good. Returning False lets asyncio close it, so
        # connection_lost runs and the session leaves the registry.
        super().eof_received()
        return False

    def connection_lost(self, error: Exception | None) -> None:
        handler: EdgeHandler = self.event_handler
        handler.unregister(self)
        if self._greeted:
            handler.on_disconnect(self)
        self.closed.set()
        super().connection_lost(error)

    async def push(self, status: Any) -> None:
        handler: EdgeHandler = self.event_handler
        if not self._greeted and isinstance(status, str) and status.startswith("220 "):
            # The greeting: decide on the connection first (R-IPS-4, R-REL-6), so that a blocked
            # client never gets a 220 and nothing it sent early is read as a command.
            self._greeted = True
            refusal = await handler.on_connect(self)
            if refusal is None and self.talked_early() and handler.config.server.relay.pregreet_drop:
                # Pre-greeting traffic (R-REL-6, beyond): a zombie or a spam engine that does not
                # wait for the banner. Postfix's postscreen drops these the same way.
                refusal = replies.PREGREET
            if refusal is not None:
                handler.count_reply(self, refusal)
                await super().push(refusal)
                self.close_now()
                return
        if isinstance(status, str):
            if not self._in_ehlo:
                status = replies.with_enhanced_code(status)
            handler.count_reply(self, status)
            if status[:1] == "5":
                self.state.errors += 1
                if self.state.errors >= handler.config.server.smtp.error_budget:
                    # An error budget: a client that keeps failing is probing, not sending mail.
                    await super().push(status)
                    await super().push(replies.TOO_MANY_ERRORS)
                    self.close_now()
                    return
        await super().push(status)

    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_ehlo = True  # EHLO answers carry no enhanced codes (RFC 2034)
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_ehlo = False

    def data_received(self, data: bytes) -> None:
        self._last_received = time.monotonic()
        super().data_received(data)

    async def smtp_DATA(self, arg: str) -> None:
        # aiosmtpd's idle timer only restarts between commands, so a large message on a slow
        # but steady link would be cut after the command timeout. While bytes keep arriving the
        # timer restarts; a client that goes silent mid-DATA is still cut (slow-loris).
        keeper = asyncio.get_running_loop().create_task(self._keep_alive_while_receiving())
        try:
            await super().smtp_DATA(arg)
        finally:
            keeper.cancel()

    async def _keep_alive_while_receiving(self) -> None:
        step = max(0.05, min(10.0, self._timeout_duration / 4))
        while True:
            await asyncio.sleep(step)
            if time.monotonic() - self._last_received < step:
                self._reset_timeout()

    def talked_early(self) -> bool:
        return bool(getattr(self._reader, "_buffer", b""))

    # DSN parameters (RFC 3461) that aiosmtpd does not know: take them out of the command,
    # validate them, keep them for the delivery record, and let aiosmtpd parse the rest.
    async def smtp_MAIL(self, arg: str | None) -> None:
        if arg:
            arg, params, error = take_dsn_params(arg, MAIL_DSN_PARAMS)
            if error:
                await self.push(error)
                return
            self.state.pending_dsn = params
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if arg:
            arg, params, error = take_dsn_params(arg, RCPT_DSN_PARAMS)
            if error:
                await self.push(error)
                return
            self.state.pending_dsn = params
        await super().smtp_RCPT(arg)

    def close_now(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def tls_info(self) -> tuple[str, str]:
        """(version, cipher) of the session's TLS, or ("", "")."""
        if self.state.proxied_tls is not None:
            return self.state.proxied_tls
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
