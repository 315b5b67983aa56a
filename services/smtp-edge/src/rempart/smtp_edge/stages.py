"""The SMTP edge's handler: aiosmtpd's hooks, one per stage. Each stage asks the policy service
and applies its verdict exactly (reply, delay, close, headers, recipient rewrite); AUTH goes to
authentication.py, an accepted message to delivery.py, open connections live in registry.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiosmtpd.proxy_protocol import ProxyData
from aiosmtpd.smtp import AuthResult, Envelope, Session
from prometheus_client import Counter, Histogram

from rempart.common import metrics, sasl
from rempart.common.clients import AuthClient, PolicyClient, PolicySession
from rempart.common.config import SettingsCache
from rempart.common.events import EventBus
from rempart.common.mailbox import Mailboxes
from rempart.common.netmatch import ip_in_networks
from rempart.common.pb.policy.v1 import policy_pb2
from rempart.common.stats import TEMPORARY_FAILURE, StatsRecorder
from rempart.smtp_edge import replies
from rempart.smtp_edge.authentication import SmtpLogins
from rempart.smtp_edge.delivery import Delivery
from rempart.smtp_edge.rdns import ReverseNames
from rempart.smtp_edge.received import count_hops, has_bare_line_ending, normalize_line_endings
from rempart.smtp_edge.registry import ConnectionRegistry
from rempart.smtp_edge.session import EdgeSMTP, strip_brackets

log = logging.getLogger(__name__)

REPLIES = Counter("rempart_smtp_replies_total", "SMTP replies by listener and code class", ["listener", "class"])
POLICY_SECONDS = Histogram("rempart_smtp_policy_seconds", "Policy call latency seen by the edge", ["stage"])
POLICY_SKIPPED = Counter("rempart_smtp_policy_skipped_total",
                         "Stages decided without a policy call because an earlier verdict covered them",
                         ["stage"])
# The rules of the verdicts the policy client makes up when policy does not answer (clients.py).
POLICY_FAILURE_RULES = ("policy-unavailable", "policy-empty-verdict")
UNCOUNTED_STAGES = frozenset({policy_pb2.STAGE_RSET, policy_pb2.STAGE_DISCONNECT})
# DATA within the bounds every accepted recipient's verdict gave: policy already said yes (issue 11).
DATA_WITHIN_BOUNDS = policy_pb2.Verdict(action=policy_pb2.ACTION_ACCEPT, code=250, enhanced_code="2.0.0",
                                        rule="data-bounds")
# Extensions aiosmtpd does not list: PIPELINING (RFC 2920), ENHANCEDSTATUSCODES (RFC 2034), DSN (RFC 3461).
EXTRA_EHLO_LINES = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250-DSN"]


class EdgeHandler:
    """aiosmtpd handler hooks; one instance per listener set, shared by every session."""

    def __init__(
        self,
        *,
        hostname: str,
        policy: PolicyClient,
        auth: AuthClient,
        mailboxes: Mailboxes,
        events: EventBus,
        config: SettingsCache,
        instance: str,
        proxy_cidrs: list[str],
        max_sessions: int = 2000,
        rdns: ReverseNames | None = None,
        stats: StatsRecorder | None = None,
    ) -> None:
        self.rdns = rdns
        self.max_sessions = max_sessions
        self.hostname = hostname
        self.policy = policy
        self.config = config
        self.instance = instance
        self.proxy_cidrs = proxy_cidrs
        self.connections = ConnectionRegistry()
        self.logins = SmtpLogins(auth, config)
        self.delivery = Delivery(hostname=hostname, mailboxes=mailboxes, events=events, config=config, stats=stats)
        self.stats = stats  # the edge's own refusals (policy counts its verdicts), GET /v1/stats
        self._background: set[asyncio.Task[None]] = set()
        self.draining = False

    # The session's hooks (session.SessionHooks) -----------------------------------------------
    def opened(self, server: EdgeSMTP) -> None:
        self.connections.register(server)
        self.logins.update_auth_policy(server)

    async def greeting(self, server: EdgeSMTP) -> str | None:
        refusal = await self._on_connect(server)
        if refusal is None and server.talked_early() and self.config.server.relay.pregreet_drop:
            # Pre-greeting traffic (R-REL-6, beyond): a zombie or a spam engine that does not
            # wait for the banner. Postfix's postscreen drops these the same way.
            refusal = replies.PREGREET
        return refusal

    def count_reply(self, server: EdgeSMTP, reply: str) -> bool:
        if reply[:1].isdigit():
            metrics.child(REPLIES, server.listener.name, reply[:1] + "xx").inc()
        if reply[:1] != "5":
            return False
        server.state.errors += 1
        return server.state.errors >= self.config.server.smtp.error_budget

    def refused_here(self, reason: str) -> None:
        if self.stats is not None:
            self.stats.refusal(reason)

    def closed(self, server: EdgeSMTP) -> None:
        self.connections.unregister(server)
        if server.greeted:
            # STAGE_DISCONNECT, without holding up the close (simultaneous-connection counts).
            task = asyncio.get_running_loop().create_task(self._disconnect(server))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        else:
            server.end_trace()

    async def settle(self, timeout: float) -> None:
        """At shutdown, after the sessions were told to close: wait (at most ``timeout`` s) until
        they are gone and their DISCONNECT reports have reached the policy service."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self._background:
            await asyncio.wait(set(self._background), timeout=max(deadline - loop.time(), 0.01))

    # Policy calls ---------------------------------------------------------------------------
    def _facts(self, server: EdgeSMTP) -> policy_pb2.SessionFacts:
        version, cipher = server.tls_info()
        return policy_pb2.SessionFacts(
            session_id=server.state.session_id,
            client_ip=server.state.client_ip,
            client_port=server.state.client_port,
            protocol=server.listener.protocol,
            helo_name=(server.session.host_name or "") if server.session is not None else "",
            tls=bool(version),
            tls_version=version,
            tls_cipher=cipher,
            authenticated_account=server.state.authenticated_account,
            edge_instance=self.instance,
        )

    def _policy(self, server: EdgeSMTP) -> PolicySession:
        if server.state.policy is None:
            server.state.policy = self.policy.session()
        return server.state.policy

    async def _check(self, server: EdgeSMTP, stage: policy_pb2.Stage.ValueType,
                     facts: policy_pb2.SessionFacts | None = None, **fields: Any) -> policy_pb2.Verdict:
        request = policy_pb2.CheckRequest(stage=stage, session=facts or self._facts(server), **fields)
        with metrics.timed(metrics.child(POLICY_SECONDS, policy_pb2.Stage.Name(stage))):
            verdict = await self._policy(server).check(request)
        if verdict.rule.startswith(POLICY_FAILURE_RULES) and stage not in UNCOUNTED_STAGES:
            self.refused_here(TEMPORARY_FAILURE)  # policy never decided: the edge's own 451
        if verdict.delay_ms:
            await asyncio.sleep(min(verdict.delay_ms, 60_000) / 1000)
        return verdict

    async def _disconnect(self, server: EdgeSMTP) -> None:
        async def check(stage: policy_pb2.Stage.ValueType) -> None:
            await self._check(server, stage)

        try:
            await server.traced("DISCONNECT", check, policy_pb2.STAGE_DISCONNECT)
        finally:
            if server.state.policy is not None:
                await server.state.policy.close()
            server.end_trace()

    async def _on_connect(self, server: EdgeSMTP) -> str | None:
        if self.draining:
            return replies.SHUTTING_DOWN
        if len(self.connections) > self.max_sessions:
            return replies.TOO_BUSY
        tls = self.config.server.tls
        if self.rdns is not None and tls.received_add_rdns and not tls.received_hide_client_ip:
            server.state.rdns = asyncio.get_running_loop().create_task(self.rdns.lookup(server.state.client_ip))
        verdict = await self._check(server, policy_pb2.STAGE_CONNECT)
        if verdict.action == policy_pb2.ACTION_ACCEPT:
            return None
        log.info("connection refused", extra={"session": server.state.session_id,
                                               "client_ip": server.state.client_ip,
                                               "reply": replies.of_verdict(verdict)})
        return replies.of_verdict(verdict)

    # aiosmtpd's hooks -------------------------------------------------------------------------
    async def handle_PROXY(self, server: EdgeSMTP, session: Session, envelope: Envelope,
                           proxy_data: ProxyData) -> bool:
        """R-OPS-2: PROXY headers only from the configured load balancers; then the client
        address in the header is the one every rule and log line sees."""
        if not ip_in_networks(server.state.client_ip, self.proxy_cidrs):
            log.warning("PROXY header from an untrusted peer", extra={"peer": server.state.client_ip})
            return False
        if not proxy_data.valid:
            return False
        if proxy_data.src_addr is not None:
            self.connections.moved(server, str(proxy_data.src_addr), int(proxy_data.src_port or 0))
            self.logins.update_auth_policy(server)
        tlv = proxy_data.tlv
        if tlv is not None and int(tlv.get("SSL_CLIENT", 0) or 0) & 0x01:
            # haproxy "send-proxy-v2-ssl": the client spoke TLS to the balancer (465 terminated
            # there).
            server.trust_proxied_tls(_text(tlv.get("SSL_VERSION")) or "TLS", _text(tlv.get("SSL_CIPHER")))
        return True

    async def handle_EHLO(self, server: EdgeSMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        verdict = await self._check(server, policy_pb2.STAGE_HELO)
        refusal = await server.apply_verdict("helo", verdict)
        if refusal is not None or server.transport is None:
            session.host_name = None
            return [refusal] if refusal else []
        out = []
        for line in responses:
            if line.startswith("250 HELP"):
                out += [*EXTRA_EHLO_LINES, line]
            else:
                out.append(line)
        return out

    async def handle_HELO(self, server: EdgeSMTP, session: Session, envelope: Envelope, hostname: str) -> str:
        session.host_name = hostname
        verdict = await self._check(server, policy_pb2.STAGE_HELO)
        refusal = await server.apply_verdict("helo", verdict)
        if refusal is not None:
            session.host_name = None
            return refusal
        return replies.HELO_OK.format(hostname=self.hostname)

    async def handle_MAIL(self, server: EdgeSMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        if self.draining and server.state.transactions:
            # The next transaction of a session kept for message after message, on a draining
            # edge (R-OPS-7): 421 and close; the client sends it again through another replica,
            # instead of the edge waiting out its grace period for a session that never ends by
            # itself (and then cutting whatever is in flight). A session's first transaction
            # goes on.
            server.close_after_reply()
            return replies.SHUTTING_DOWN
        server.state.transactions += 1
        if server.listener.require_starttls and not server.state.authenticated_account:
            # Submission (R-TLS-1): mail only from authenticated clients.
            return replies.AUTH_REQUIRED
        size = 0
        for option in mail_options:
            if option.startswith("SIZE="):
                size = int(option[5:]) if option[5:].isdigit() else 0
        server.state.reset_transaction()
        server.state.dsn = dict(server.state.pending_dsn)
        sender, facts, now = strip_brackets(address), self._facts(server), asyncio.get_running_loop().time()
        verdict = server.state.reusable_mail_verdict(sender, size, facts, self.config.version, now)
        if verdict is None:
            verdict = await self._check(server, policy_pb2.STAGE_MAIL, facts, mail_from=sender, message_size=size)
            server.state.keep_mail_verdict(sender, facts, self.config.version, now, verdict)
        else:
            metrics.child(POLICY_SKIPPED, "MAIL").inc()
        refusal = await server.apply_verdict("mail", verdict)
        if refusal is not None:
            return refusal
        if server.transport is None:
            return replies.STORE_TEMPFAIL
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        server.state.add_headers.extend((h.name, h.value) for h in verdict.add_headers)
        return replies.MAIL_OK

    async def handle_RCPT(self, server: EdgeSMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        verdict = await self._check(
            server,
            policy_pb2.STAGE_RCPT,
            mail_from=strip_brackets(envelope.mail_from or ""),
            recipient=address,
            accepted_recipients=list(envelope.rcpt_tos),
        )
        refusal = await server.apply_verdict("rcpt", verdict)
        if refusal is not None:
            return refusal
        if server.transport is None:
            return replies.STORE_TEMPFAIL
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        for key, value in server.state.pending_dsn.items():
            server.state.dsn[f"{key}:{address}"] = value
        server.state.narrow_data_bounds(verdict)
        if verdict.action == policy_pb2.ACTION_DISCARD:
            server.state.discarded += 1
        server.state.local_mailboxes.extend(verdict.local_mailboxes)
        server.state.remote_recipients.extend(verdict.remote_recipients)
        if verdict.rewritten_sender:
            # R-DNS-6: forwarded copies leave with the SRS-rewritten envelope sender.
            for recipient in verdict.remote_recipients:
                server.state.remote_senders[recipient] = verdict.rewritten_sender
        return replies.RCPT_OK

    async def handle_RSET(self, server: EdgeSMTP, session: Session, envelope: Envelope) -> str:
        server.state.reset_transaction()
        verdict = await self._check(server, policy_pb2.STAGE_RSET, command="RSET")
        refusal = await server.apply_verdict("rset", verdict)
        return refusal or replies.RSET_OK

    async def handle_DATA(self, server: EdgeSMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        state = server.state
        if has_bare_line_ending(data):
            # SMTP smuggling (CVE-2023-51766 class): only <CRLF>.<CRLF> may end DATA, and a
            # bare CR or LF is where other servers disagree about where a message ends.
            if self.config.server.smtp.bare_line_endings == "reject":
                state.reset_transaction()
                self.refused_here("bad_syntax")
                return replies.BARE_LINE_ENDING
            data = normalize_line_endings(data)
        hops = count_hops(data)
        if state.data_within_bounds(len(data), hops):
            # The recipients' verdicts said DATA accepts this message: no call of its own.
            verdict = DATA_WITHIN_BOUNDS
            metrics.child(POLICY_SKIPPED, "DATA").inc()
        else:
            verdict = await self._check(
                server,
                policy_pb2.STAGE_DATA,
                mail_from=strip_brackets(envelope.mail_from or ""),
                accepted_recipients=list(envelope.rcpt_tos),
                message_size=len(data),
                hop_count=hops,
            )
            refusal = await server.apply_verdict("data", verdict)
            if refusal is not None:
                state.reset_transaction()
                return refusal
        if server.transport is None:
            return replies.STORE_TEMPFAIL
        return await self.delivery.deliver(server, session, envelope, data, verdict)

    async def handle_exception(self, error: Exception) -> str:
        log.exception("session error: %s", type(error).__name__)
        return replies.INTERNAL_ERROR  # the session closes after it (EdgeSMTP.handle_exception)

    # AUTH (RFC 4954); aiosmtpd finds the mechanisms by these names on the handler.
    async def auth_PLAIN(self, server: EdgeSMTP, args: list[str]) -> AuthResult:
        return await self._sasl(server, sasl.PLAIN, args)

    async def auth_LOGIN(self, server: EdgeSMTP, args: list[str]) -> AuthResult:
        return await self._sasl(server, sasl.LOGIN, args)

    async def auth_SCRAM__SHA__256(self, server: EdgeSMTP, args: list[str]) -> AuthResult:
        """RFC 7677 through the auth service (aiosmtpd maps the name to SCRAM-SHA-256)."""
        return await self._sasl(server, sasl.SCRAM_SHA_256, args)

    async def _sasl(self, server: EdgeSMTP, mechanism: str, args: list[str]) -> AuthResult:
        return await self.logins.sasl(server, mechanism, args, self._policy(server), self._facts(server))


def _text(value: object) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("ascii", "replace")
    return str(value) if value else ""
