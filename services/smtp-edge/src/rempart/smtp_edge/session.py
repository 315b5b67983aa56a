"""One SMTP connection: aiosmtpd's protocol plus what Rempart tracks about the session.

The coupling runs one way: the edge's handler (stages.py) drives a session through the small
public API below and never touches aiosmtpd's private attributes; a session knows its handler
only as :class:`SessionHooks`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from aiosmtpd.smtp import SMTP
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind

from rempart.common import metrics, tracing
from rempart.common.clients import PolicySession
from rempart.common.metrics import SMTP_STAGE_SECONDS
from rempart.common.pb.policy.v1 import policy_pb2
from rempart.smtp_edge import replies

log = logging.getLogger(__name__)
MAIL_DSN_PARAMS = {"RET", "ENVID"}
RCPT_DSN_PARAMS = {"NOTIFY", "ORCPT"}
NOTIFY_VALUES = {"NEVER", "SUCCESS", "FAILURE", "DELAY"}
# The mechanism names a span may show (never the rest of the AUTH line: an initial response).
AUTH_MECHANISMS = {"PLAIN", "LOGIN", "SCRAM-SHA-256", "CRAM-MD5", "XOAUTH2", "GSSAPI"}
T = TypeVar("T")


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
            return arg, {}, replies.DSN_PARAMETER_INVALID.format(name=key)
        if key == "RET" and value.upper() not in ("FULL", "HDRS"):
            return arg, {}, replies.DSN_PARAMETER_INVALID.format(name="RET")
        if key == "NOTIFY":
            values = set(value.upper().split(","))
            if not values <= NOTIFY_VALUES or ("NEVER" in values and len(values) > 1):
                return arg, {}, replies.DSN_PARAMETER_INVALID.format(name="NOTIFY")
            value = value.upper()
        if key == "ORCPT" and ";" not in value:
            return arg, {}, replies.DSN_PARAMETER_INVALID.format(name="ORCPT")
        found[key] = value
    return " ".join([arg[: end + 1], *kept]), found, ""


def strip_brackets(address: str) -> str:
    """A MAIL/RCPT path without its angle brackets; the null path ``<>`` is ""."""
    return "" if address == "<>" else address.strip("<>")


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


@dataclass(frozen=True)
class ReusableVerdict:
    """An accepted MAIL verdict that the policy let the session give again (Verdict.reuse,
    issue 11): to the same sender, with the same session facts and settings, until ``until``
    (event-loop time), for a SIZE= up to ``max_size``."""

    sender: str
    facts: policy_pb2.SessionFacts
    settings_version: int
    until: float
    max_size: int
    verdict: policy_pb2.Verdict


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
    # Transactions begun (MAIL commands): a draining edge lets a session do its first one.
    transactions: int = 0
    # The transaction's DATA bounds (max size, max hops): the tightest of its accepted
    # recipients' verdicts; (-1, -1) when one came without any (policy asks at DATA then).
    data_bounds: tuple[int, int] | None = None
    # The last MAIL verdict, when the policy said the session may reuse it.
    mail_verdict: ReusableVerdict | None = None

    def keep_mail_verdict(self, sender: str, facts: policy_pb2.SessionFacts, settings_version: int,
                          now: float, verdict: policy_pb2.Verdict) -> None:
        self.mail_verdict = None
        if verdict.HasField("reuse") and verdict.action == policy_pb2.ACTION_ACCEPT and not verdict.delay_ms:
            self.mail_verdict = ReusableVerdict(sender, facts, settings_version, now + verdict.reuse.seconds,
                                                verdict.reuse.max_size, verdict)

    def reusable_mail_verdict(self, sender: str, size: int, facts: policy_pb2.SessionFacts,
                              settings_version: int, now: float) -> policy_pb2.Verdict | None:
        """The kept MAIL verdict if it holds for this MAIL FROM (else the policy is asked)."""
        kept = self.mail_verdict
        if (kept is None or kept.sender != sender or size > kept.max_size or now >= kept.until
                or kept.settings_version != settings_version or kept.facts != facts):
            return None
        return kept.verdict

    def narrow_data_bounds(self, verdict: policy_pb2.Verdict) -> None:
        """An accepted recipient's verdict: what the DATA stage lets through (issue 11)."""
        if not verdict.HasField("data_bounds"):
            self.data_bounds = (-1, -1)
            return
        size, hops = verdict.data_bounds.max_size, verdict.data_bounds.max_hops
        if self.data_bounds is not None:
            size, hops = min(size, self.data_bounds[0]), min(hops, self.data_bounds[1])
        self.data_bounds = (size, hops)

    def data_within_bounds(self, size: int, hops: int) -> bool:
        """Whether the policy already said that DATA accepts this message (no call needed)."""
        bounds = self.data_bounds
        return bounds is not None and size <= bounds[0] and hops <= bounds[1]

    def reset_transaction(self) -> None:
        self.data_bounds = None
        self.local_mailboxes = []
        self.remote_recipients = []
        self.discarded = 0
        self.add_headers = []
        self.dsn = {}
        self.remote_senders = {}


class SessionHooks(Protocol):
    """What a session tells the handler about its own life (the handler's aiosmtpd hooks aside)."""

    def opened(self, server: EdgeSMTP) -> None:
        """The TCP connection is up (before the greeting)."""

    async def greeting(self, server: EdgeSMTP) -> str | None:
        """The refusal to send instead of the 220 greeting, or None to greet."""

    def count_reply(self, server: EdgeSMTP, reply: str) -> bool:
        """Count a reply; True when it spends the session's error budget."""

    def refused_here(self, reason: str) -> None:
        """The edge refused something itself, without a policy verdict (for the statistics)."""

    def closed(self, server: EdgeSMTP) -> None:
        """The connection is gone."""


# The usual MAIL/RCPT argument, ``<dot-atom@domain>`` and perhaps parameters after a space: read
# without aiosmtpd's RFC 5322 parser (email._header_value_parser, a large share of the edge's CPU
# per recipient). Anything else (quoted local parts, source routes, literals, comments, odd
# spacing) still goes through aiosmtpd, which gives the same answer for these simple forms.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(?: +(.*))?", re.ASCII)


class EdgeSMTP(SMTP):
    """aiosmtpd's SMTP with a policy check before the greeting and the session's state."""

    def __init__(self, hooks: SessionHooks, listener: Listener, **kwargs: Any) -> None:
        super().__init__(hooks, **kwargs)
        self.hooks = hooks
        self.listener = listener
        self.state = SessionState()
        self._greeted = False
        self._close_after_reply = False
        self._in_ehlo = False
        self._in_stage = False  # a command (and its policy call) is being answered
        self._last_received = time.monotonic()
        self.closed = asyncio.Event()
        # Tracing (on only with an exporter): the session's span, the parent of one span per
        # stage, and the stage span in flight, which records the reply code.
        self._trace: Span | None = None
        self._trace_context: Context | None = None
        self._stage_span: Span | None = None


    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parsing, with a fast path for ``<local@domain>`` (see _SIMPLE_PATH)."""
        simple = _SIMPLE_PATH.fullmatch(arg)
        if simple is None:
            return super()._getaddr(arg)
        address = simple.group(1)
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, simple.group(2) or ""
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            peer = transport.get_extra_info("peername") or ("", 0)
            self.state.client_ip, self.state.client_port = str(peer[0]), int(peer[1])
            if tracing.enabled():
                self._trace = tracing.start_span("SMTP session", kind=SpanKind.SERVER, parent=tracing.NEW_TRACE,
                                                 attributes={
                                                     "network.transport": "tcp", "network.protocol.name": "smtp",
                                                     "client.address": self.state.client_ip,
                                                     "client.port": self.state.client_port,
                                                     "rempart.smtp.listener": self.listener.name,
                                                     "rempart.session.id": self.state.session_id,
                                                 })
                self._trace_context = tracing.context_with(self._trace)
            self.hooks.opened(self)

    def eof_received(self) -> bool | None:
        # aiosmtpd cancels the session on EOF and may keep the socket half-open; when the
        # client hung up before the greeting (a load balancer's health check, a scanner) that
        # leaked the connection for good. Returning False lets asyncio close it, so
        # connection_lost runs and the session leaves the registry.
        super().eof_received()
        return False

    def connection_lost(self, error: Exception | None) -> None:
        self.hooks.closed(self)
        self.closed.set()
        super().connection_lost(error)

    @property
    def greeted(self) -> bool:
        return self._greeted

    async def push(self, status: Any) -> None:
        if not self._greeted and isinstance(status, str) and status.startswith("220 "):
            self._greeted = True
            await self.traced("CONNECT", self._greet, status)
            return
        await self._reply(status)

    async def _greet(self, greeting: str) -> None:
        """Decide on the connection before the greeting (R-IPS-4, R-REL-6), so that a blocked
        client never gets a 220 and nothing it sent early is read as a command."""
        if self._trace is not None:  # the client's own address now, after a PROXY header (R-OPS-2)
            self._trace.set_attributes({"client.address": self.state.client_ip, "client.port": self.state.client_port})
        refusal = await self.hooks.greeting(self)
        if refusal is not None:
            self.hooks.count_reply(self, refusal)
            await self._send(refusal)
            self.close_now()
            return
        await self._reply(greeting)

    async def _reply(self, status: Any) -> None:
        if isinstance(status, str):
            if status in replies.REWORDED:  # aiosmtpd's own size refusal (R-LIM-7), policy not asked
                self.hooks.refused_here("message_too_big")
            if not self._in_ehlo:
                status = replies.with_enhanced_code(status)
            if self.hooks.count_reply(self, status):
                # An error budget: a client that keeps failing is probing, not sending mail.
                await self._send(status)
                await self._send(replies.TOO_MANY_ERRORS)
                self.close_now()
                return
        await self._send(status)
        if self._close_after_reply:
            self.close_now()

    async def _send(self, status: Any) -> None:
        stage = self._stage_span
        if stage is not None and isinstance(status, str) and status[:3].isdigit():
            # The code only: a reply's text may quote the client (and a 334 carries SASL data).
            stage.set_attribute("rempart.smtp.reply_code", int(status[:3]))
            enhanced = status[4:].split(" ", 1)[0]
            if enhanced[:1].isdigit() and enhanced.count(".") == 2 and len(enhanced) <= 11:
                stage.set_attribute("rempart.smtp.enhanced_code", enhanced)
        await super().push(status)

    # Tracing -----------------------------------------------------------------------------------
    async def traced(self, stage: str, step: Callable[[T], Awaitable[None]], arg: T) -> None:
        """Run one stage of the session (its command and reply) in a span of the session's
        trace; without tracing, just run it."""
        latency = metrics.child(SMTP_STAGE_SECONDS, stage)
        self._in_stage = True
        try:
            if self._trace is None:
                with metrics.timed(latency):
                    await step(arg)
                return
            with tracing.span(f"SMTP {stage}", parent=self._trace_context, attributes={
                "rempart.smtp.stage": stage, "client.address": self.state.client_ip,
                "rempart.session.id": self.state.session_id,
            }) as span:
                self._stage_span = span
                try:
                    # Inside the stage's span: the observation's exemplar is this trace.
                    with metrics.timed(latency):
                        await step(arg)
                finally:
                    self._stage_span = None
        finally:
            self._in_stage = False

    def end_trace(self) -> None:
        """The session is over (after its DISCONNECT stage): its span ends."""
        if self._trace is not None:
            self._trace.end()
            self._trace = None

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd sends the handler's reply and reads on; a 421 promises the client that the
        # channel closes (RFC 5321 3.8), and a session in an unknown state should not go on.
        reply = await super().handle_exception(error)
        self._close_after_reply = reply.startswith("421")
        return reply

    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_ehlo = True  # EHLO answers carry no enhanced codes (RFC 2034)
        try:
            await self.traced("EHLO", super().smtp_EHLO, hostname)
        finally:
            self._in_ehlo = False

    async def smtp_HELO(self, hostname: str) -> None:
        await self.traced("HELO", super().smtp_HELO, hostname)

    async def smtp_AUTH(self, arg: str) -> None:
        await self.traced("AUTH", self._auth, arg)

    async def _auth(self, arg: str) -> None:
        if self._stage_span is not None:
            mechanism = (arg or "").split(" ", 1)[0].upper()
            self._stage_span.set_attribute("rempart.auth.mechanism",
                                           mechanism if mechanism in AUTH_MECHANISMS else "other")
        await super().smtp_AUTH(arg)

    async def smtp_RSET(self, arg: str) -> None:
        await self.traced("RSET", super().smtp_RSET, arg)

    def data_received(self, data: bytes) -> None:
        self._last_received = time.monotonic()
        super().data_received(data)

    async def smtp_DATA(self, arg: str) -> None:
        # aiosmtpd's idle timer only restarts between commands, so a large message on a slow
        # but steady link would be cut after the command timeout. While bytes keep arriving the
        # timer restarts; a client that goes silent mid-DATA is still cut (slow-loris).
        keeper = asyncio.get_running_loop().create_task(self._keep_alive_while_receiving())
        try:
            await self.traced("DATA", super().smtp_DATA, arg)
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
        await self.traced("MAIL", self._mail, arg)

    async def _mail(self, arg: str | None) -> None:
        if arg:
            arg, params, error = take_dsn_params(arg, MAIL_DSN_PARAMS)
            if error:
                await self.push(error)
                return
            self.state.pending_dsn = params
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        await self.traced("RCPT", self._rcpt, arg)

    async def _rcpt(self, arg: str | None) -> None:
        if arg:
            arg, params, error = take_dsn_params(arg, RCPT_DSN_PARAMS)
            if error:
                await self.push(error)
                return
            self.state.pending_dsn = params
        await super().smtp_RCPT(arg)

    # The handler's API ---------------------------------------------------------------------
    def close_after_reply(self) -> None:
        """Close the connection once the reply to the command being answered is sent."""
        self._close_after_reply = True

    def between_transactions(self, idle_seconds: float) -> bool:
        """A transaction done and the next not begun, no command being answered, nothing heard
        for ``idle_seconds``: a draining edge may say 421 and close, cutting nothing short."""
        in_transaction = self.envelope is not None and bool(self.envelope.mail_from)
        return (self.state.transactions > 0 and not self._in_stage and not in_transaction
                and time.monotonic() - self._last_received >= idle_seconds)

    def close_now(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def close_with(self, reply: str) -> bool:
        """Say ``reply`` and close, outside the command loop (a block decided elsewhere, a
        drain); False when the connection was already gone."""
        if self.transport is None:
            return False
        self._writer.write(reply.encode() + b"\r\n")
        self.close_now()
        return True

    def require_tls_for_auth(self, required: bool) -> None:
        """R-TLS-2: whether AUTH waits for TLS in this session."""
        self._auth_require_tls = required

    def trust_proxied_tls(self, version: str, cipher: str) -> None:
        """The client spoke TLS to a trusted load balancer (PROXY v2 SSL TLV): the session is as
        good as implicit TLS, so no STARTTLS, and AUTH is allowed."""
        self.state.proxied_tls = (version, cipher)
        self.tls_context = None
        self.require_starttls = False
        self._auth_require_tls = False

    async def apply_verdict(self, stage: str, verdict: policy_pb2.Verdict) -> str | None:
        """The reply for a refusal; a close verdict is said and the connection closed here.
        None means accepted (or closed)."""
        if verdict.action in (policy_pb2.ACTION_ACCEPT, policy_pb2.ACTION_DISCARD):
            return None
        reply = replies.of_verdict(verdict)
        log.info("refused", extra={"session": self.state.session_id, "client_ip": self.state.client_ip,
                                    "stage": stage, "reply": reply, "rule": verdict.rule})
        if verdict.action == policy_pb2.ACTION_CLOSE:
            await self.push(reply)
            self.close_now()
            return None
        return reply

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

