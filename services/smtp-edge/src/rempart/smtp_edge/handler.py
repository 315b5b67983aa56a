"""The SMTP edge's decisions: each stage asks the policy service and applies its verdict
exactly (reply, delay, close, headers, recipient rewrite); AUTH asks the auth service; an
accepted message is stored durably before the 250 (DESIGN.md "Durability", R-OPS-3).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiosmtpd.proxy_protocol import ProxyData
from aiosmtpd.smtp import MISSING, AuthResult, Envelope, Session
from prometheus_client import Counter, Histogram

from rempart.common import sasl
from rempart.common.clients import AuthClient, PolicyClient, PolicySession
from rempart.common.config import SettingsCache
from rempart.common.edgelogin import LoginAttempt, LoginDecision, LoginOutcome
from rempart.common.events import EventBus, mailbox_changed_subject
from rempart.common.ipblocks import BlockedScope
from rempart.common.mailstore import MailboxIndex, MessageStore, new_transaction_id
from rempart.common.mime import summarize
from rempart.common.netmatch import ip_in_networks
from rempart.common.pb.policy.v1 import policy_pb2
from rempart.smtp_edge import replies
from rempart.smtp_edge.rdns import ReverseNames
from rempart.smtp_edge.received import count_hops, has_bare_line_ending, normalize_line_endings, received_header
from rempart.smtp_edge.session import EdgeSMTP

log = logging.getLogger(__name__)

SESSIONS = Counter("rempart_smtp_sessions_total", "SMTP sessions opened", ["listener"])
REPLIES = Counter("rempart_smtp_replies_total", "SMTP replies by listener and code class", ["listener", "class"])
POLICY_SECONDS = Histogram("rempart_smtp_policy_seconds", "Policy call latency seen by the edge", ["stage"])
ACCEPTED_BYTES = Counter("rempart_smtp_accepted_bytes_total", "Bytes of accepted messages", ["listener"])
STORE_SECONDS = Histogram("rempart_smtp_store_seconds", "Time to store a message durably")
# Well inside the client's patience (RFC 5321 4.5.3.2.6: 10 minutes for the final reply), short
# enough that a stalled JetStream becomes a prompt 451 instead of a hung session.
STORE_TIMEOUT_SECONDS = 15.0


def reply_of(verdict: policy_pb2.Verdict) -> str:
    enhanced = f" {verdict.enhanced_code}" if verdict.enhanced_code else ""
    return f"{verdict.code}{enhanced} {verdict.text}".rstrip()


def strip_brackets(address: str) -> str:
    return "" if address == "<>" else address.strip("<>")


class EdgeHandler:
    """aiosmtpd handler hooks; one instance per listener set, shared by every session."""

    def __init__(
        self,
        *,
        hostname: str,
        policy: PolicyClient,
        auth: AuthClient,
        store: MessageStore,
        index: MailboxIndex,
        events: EventBus,
        config: SettingsCache,
        instance: str,
        proxy_cidrs: list[str],
        max_sessions: int = 2000,
        rdns: ReverseNames | None = None,
    ) -> None:
        self.rdns = rdns
        self.max_sessions = max_sessions
        self.hostname = hostname
        self.policy = policy
        self.auth = auth
        self.store = store
        self.index = index
        self.events = events
        self.config = config
        self.instance = instance
        self.proxy_cidrs = proxy_cidrs
        self.sessions: dict[str, set[EdgeSMTP]] = {}
        self._background: set[asyncio.Task[policy_pb2.Verdict]] = set()
        self.draining = False

    # Connection registry: lets a block decided anywhere close this IP's sessions here (R-IPS-4).
    def register(self, server: EdgeSMTP) -> None:
        SESSIONS.labels(server.listener.name).inc()
        self.sessions.setdefault(server.state.client_ip, set()).add(server)

    def unregister(self, server: EdgeSMTP) -> None:
        peers = self.sessions.get(server.state.client_ip)
        if peers is not None:
            peers.discard(server)
            if not peers:
                del self.sessions[server.state.client_ip]

    def close_ip(self, scope: BlockedScope | str, reply: str) -> int:
        """Send ``reply`` and close every connection of ``scope`` (an IP, or a block's scope)."""
        if isinstance(scope, str):
            scope = BlockedScope(ip=scope, prefix="")
        closed = 0
        for ip in [ip for ip in self.sessions if scope.covers(ip)]:
            for server in list(self.sessions.get(ip, ())):
                if server.transport is not None:
                    server._writer.write(reply.encode() + b"\r\n")
                    server.close_now()
                    closed += 1
        return closed

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

    async def _check(self, server: EdgeSMTP, stage: policy_pb2.Stage.ValueType, **fields: Any) -> policy_pb2.Verdict:
        request = policy_pb2.CheckRequest(stage=stage, session=self._facts(server), **fields)
        with POLICY_SECONDS.labels(policy_pb2.Stage.Name(stage)).time():
            verdict = await self._policy(server).check(request)
        if verdict.delay_ms:
            await asyncio.sleep(min(verdict.delay_ms, 60_000) / 1000)
        return verdict

    def count_reply(self, server: EdgeSMTP, reply: str) -> None:
        if reply[:1].isdigit():
            REPLIES.labels(server.listener.name, reply[:1] + "xx").inc()

    def on_disconnect(self, server: EdgeSMTP) -> None:
        """STAGE_DISCONNECT, without holding up the close (simultaneous-connection counts)."""
        task = asyncio.get_running_loop().create_task(self._disconnect(server))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _disconnect(self, server: EdgeSMTP) -> policy_pb2.Verdict:
        try:
            return await self._check(server, policy_pb2.STAGE_DISCONNECT)
        finally:
            if server.state.policy is not None:
                await server.state.policy.close()

    def update_auth_policy(self, server: EdgeSMTP) -> None:
        """R-TLS-2: plaintext AUTH before TLS only for trusted clients, when so configured."""
        if server.listener.implicit_tls or server.listener.require_starttls:
            return  # TLS already, or TLS required before anything (submission)
        settings = self.config.server
        allowed = not settings.tls.plaintext_auth_requires_tls or ip_in_networks(
            server.state.client_ip, settings.relay.trusted_hosts)
        server._auth_require_tls = not allowed

    async def _apply(self, server: EdgeSMTP, stage: str, verdict: policy_pb2.Verdict) -> str | None:
        """The reply to send for a refusal, closing after it when asked; None means accepted."""
        if verdict.action in (policy_pb2.ACTION_ACCEPT, policy_pb2.ACTION_DISCARD):
            return None
        reply = reply_of(verdict)
        log.info("refused", extra={"session": server.state.session_id, "client_ip": server.state.client_ip,
                                    "stage": stage, "reply": reply, "rule": verdict.rule})
        if verdict.action == policy_pb2.ACTION_CLOSE:
            await server.push(reply)
            server.close_now()
            return None
        return reply

    # Hooks ----------------------------------------------------------------------------------
    async def on_connect(self, server: EdgeSMTP) -> str | None:
        if self.draining:
            return replies.SHUTTING_DOWN
        if sum(len(s) for s in self.sessions.values()) > self.max_sessions:
            return replies.TOO_BUSY
        tls = self.config.server.tls
        if self.rdns is not None and tls.received_add_rdns and not tls.received_hide_client_ip:
            server.state.rdns = asyncio.get_running_loop().create_task(self.rdns.lookup(server.state.client_ip))
        verdict = await self._check(server, policy_pb2.STAGE_CONNECT)
        if verdict.action == policy_pb2.ACTION_ACCEPT:
            return None
        log.info("connection refused", extra={"session": server.state.session_id,
                                               "client_ip": server.state.client_ip, "reply": reply_of(verdict)})
        return reply_of(verdict)

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
            self.unregister(server)
            server.state.client_ip = str(proxy_data.src_addr)
            server.state.client_port = int(proxy_data.src_port or 0)
            self.register(server)
            self.update_auth_policy(server)
        tlv = proxy_data.tlv
        if tlv is not None and int(tlv.get("SSL_CLIENT", 0) or 0) & 0x01:
            # haproxy "send-proxy-v2-ssl": the client spoke TLS to the balancer (465 terminated
            # there). The session is then as good as implicit TLS: no STARTTLS, AUTH allowed.
            server.state.proxied_tls = (_text(tlv.get("SSL_VERSION")) or "TLS", _text(tlv.get("SSL_CIPHER")))
            server.tls_context = None
            server.require_starttls = False
            server._auth_require_tls = False
        return True

    async def handle_EHLO(self, server: EdgeSMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        verdict = await self._check(server, policy_pb2.STAGE_HELO)
        refusal = await self._apply(server, "helo", verdict)
        if refusal is not None or server.transport is None:
            session.host_name = None
            return [refusal] if refusal else []
        out = []
        for line in responses:
            # Extensions aiosmtpd does not list: PIPELINING (RFC 2920), ENHANCEDSTATUSCODES (RFC 2034).
            if line.startswith("250 HELP"):
                out += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250-DSN", "250 HELP"]
            else:
                out.append(line)
        return out

    async def handle_HELO(self, server: EdgeSMTP, session: Session, envelope: Envelope, hostname: str) -> str:
        session.host_name = hostname
        verdict = await self._check(server, policy_pb2.STAGE_HELO)
        refusal = await self._apply(server, "helo", verdict)
        if refusal is not None:
            session.host_name = None
            return refusal
        return f"250 {self.hostname}"

    async def handle_MAIL(self, server: EdgeSMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        if server.listener.require_starttls and not server.state.authenticated_account:
            # Submission (R-TLS-1): mail only from authenticated clients.
            return "530 5.7.0 Authentication required"
        size = 0
        for option in mail_options:
            if option.startswith("SIZE="):
                size = int(option[5:]) if option[5:].isdigit() else 0
        server.state.reset_transaction()
        server.state.dsn = {f"{k}": v for k, v in server.state.pending_dsn.items()}
        verdict = await self._check(server, policy_pb2.STAGE_MAIL, mail_from=strip_brackets(address),
                                    message_size=size)
        refusal = await self._apply(server, "mail", verdict)
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
        refusal = await self._apply(server, "rcpt", verdict)
        if refusal is not None:
            return refusal
        if server.transport is None:
            return replies.STORE_TEMPFAIL
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        for key, value in server.state.pending_dsn.items():
            server.state.dsn[f"{key}:{address}"] = value
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
        refusal = await self._apply(server, "rset", verdict)
        return refusal or replies.RSET_OK

    async def handle_DATA(self, server: EdgeSMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        state = server.state
        if has_bare_line_ending(data):
            # SMTP smuggling (CVE-2023-51766 class): only <CRLF>.<CRLF> may end DATA, and a
            # bare CR or LF is where other servers disagree about where a message ends.
            if self.config.server.smtp.bare_line_endings == "reject":
                state.reset_transaction()
                return replies.BARE_LINE_ENDING
            data = normalize_line_endings(data)
        verdict = await self._check(
            server,
            policy_pb2.STAGE_DATA,
            mail_from=strip_brackets(envelope.mail_from or ""),
            accepted_recipients=list(envelope.rcpt_tos),
            message_size=len(data),
            hop_count=count_hops(data),
        )
        refusal = await self._apply(server, "data", verdict)
        if refusal is not None:
            state.reset_transaction()
            return refusal
        if server.transport is None:
            return replies.STORE_TEMPFAIL
        queue_id = new_transaction_id()
        if not state.local_mailboxes and not state.remote_recipients:
            # Every recipient was discarded (R-DOM-1 discard): accept and drop, no bounce.
            state.reset_transaction()
            return replies.QUEUED.format(queue_id=queue_id)
        message = await self._trace_headers(server, session, envelope, queue_id, verdict) + data
        started = time.monotonic()
        try:
            record, seq = await asyncio.wait_for(self.store.accept(
                message,
                mail_from=strip_brackets(envelope.mail_from or ""),
                local_mailboxes=state.local_mailboxes,
                remote_recipients=state.remote_recipients,
                client_ip=state.client_ip,
                authenticated_account=state.authenticated_account,
                dsn=state.dsn,
                remote_senders=state.remote_senders,
                transaction_id=queue_id,
            ), STORE_TIMEOUT_SECONDS)
        except Exception as exc:  # noqa: BLE001 - any store failure must become a 451, never a 250
            log.error("durable store failed: %s", exc, extra={"session": state.session_id})
            state.reset_transaction()
            return replies.STORE_TEMPFAIL
        STORE_SECONDS.observe(time.monotonic() - started)
        ACCEPTED_BYTES.labels(server.listener.name).inc(len(message))
        try:
            # The summary is computed once here, so IMAP header syncs read no blob (R-MBX-2).
            await self.index.apply(record, summarize(message), seq=seq)
            for mailbox in record.local_mailboxes:
                # Wakes IMAP IDLE on every imap-pop replica (payload: the folder).
                await self.events.connection.publish(mailbox_changed_subject(mailbox), b"INBOX")
        except Exception as exc:  # noqa: BLE001 - the catch-up indexer will index it
            log.warning("inline indexing failed, left to the indexer: %s", exc)
        await self.events.publish(
            "mail", "accepted", client_ip=state.client_ip, account=state.authenticated_account,
            session_id=state.session_id, protocol=server.listener.name, queue_id=record.transaction_id,
            size=str(record.size), recipients=str(len(envelope.rcpt_tos)),
        )
        log.info("accepted", extra={"session": state.session_id, "client_ip": state.client_ip,
                                     "queue_id": record.transaction_id, "size": record.size,
                                     "local": len(record.local_mailboxes),
                                     "remote": len(record.remote_recipients)})
        state.reset_transaction()
        reply = replies.QUEUED.format(queue_id=record.transaction_id)
        return reply

    async def _trace_headers(self, server: EdgeSMTP, session: Session, envelope: Envelope, queue_id: str,
                       verdict: policy_pb2.Verdict) -> bytes:
        tls = self.config.server.tls
        version, cipher = server.tls_info()
        authed = bool(server.state.authenticated_account)
        with_kw = "ESMTP" if session.extended_smtp else "SMTP"
        if version:
            with_kw += "S"
        if authed:
            with_kw += "A"
        out = b""
        if server.state.local_mailboxes:
            # R-TLS-5: Return-Path at final delivery (the relay removes it before sending on).
            out += f"Return-Path: <{strip_brackets(envelope.mail_from or '')}>\r\n".encode(
                "utf-8", "surrogateescape")
        for name, value in [*server.state.add_headers, *((h.name, h.value) for h in verdict.add_headers)]:
            out += f"{name}: {value}\r\n".encode("utf-8", "surrogateescape")
        out += received_header(
            helo=session.host_name or "",
            client_ip=server.state.client_ip,
            client_rdns=await _rdns_of(server),
            hostname=self.hostname,
            protocol=with_kw,
            queue_id=queue_id,
            recipient=envelope.rcpt_tos[0] if len(envelope.rcpt_tos) == 1 else None,
            tls_version=version,
            tls_cipher=cipher,
            auth_account=server.state.authenticated_account if tls.received_show_auth_user else "",
            hide_client_ip=tls.received_hide_client_ip,
            add_rdns=tls.received_add_rdns,
        )
        return out

    async def handle_exception(self, error: Exception) -> str:
        log.exception("session error: %s", type(error).__name__)
        return "421 4.3.0 Internal error, closing connection"

    # AUTH (RFC 4954): the mechanisms are the edge kit's (rempart.common.sasl), asynchronous here
    async def auth_PLAIN(self, server: EdgeSMTP, args: list[str]) -> AuthResult:
        return await self._sasl(server, sasl.PLAIN, args)

    async def auth_LOGIN(self, server: EdgeSMTP, args: list[str]) -> AuthResult:
        return await self._sasl(server, sasl.LOGIN, args)

    async def auth_SCRAM__SHA__256(self, server: EdgeSMTP, args: list[str]) -> AuthResult:
        """RFC 7677 through the auth service (aiosmtpd maps the name to SCRAM-SHA-256)."""
        return await self._sasl(server, sasl.SCRAM_SHA_256, args)

    async def _sasl(self, server: EdgeSMTP, mechanism: str, args: list[str]) -> AuthResult:
        async def challenge(data: bytes) -> bytes:
            answer = await server.challenge_auth(data)
            if answer is MISSING:
                raise _Answered  # aiosmtpd has answered "*" (501 5.7.0) or bad base64 (501 5.5.2)
            assert isinstance(answer, bytes)
            return answer

        attempt = LoginAttempt(self.auth, self._policy(server), self.config.server.login, self._facts(server), "smtp")
        try:
            initial = sasl.decode_response(args[1], initial=True) if len(args) > 1 else None
            decision = await attempt.sasl(mechanism, initial, challenge)
        except _Answered:
            return AuthResult(success=False, handled=True)
        except sasl.SaslCancelled:
            await server.push(replies.AUTH_ABORTED)
            return AuthResult(success=False, handled=True)
        except sasl.SaslMalformed as exc:
            await server.push(f"501 5.5.2 {exc}")
            return AuthResult(success=False, handled=True)
        return await self._login_result(server, decision)

    async def _login_result(self, server: EdgeSMTP, decision: LoginDecision) -> AuthResult:
        """The kit's reading of auth and policy, in SMTP's words; budgets are SMTP's own."""
        if decision.close and decision.verdict is not None:
            await self._apply(server, "auth", decision.verdict)
            return AuthResult(success=False, handled=True)
        if decision.outcome is LoginOutcome.TEMPFAIL:
            return AuthResult(success=False, handled=False, message=replies.AUTH_TEMPFAIL)
        if decision.outcome is LoginOutcome.FAILED:
            server.state.auth_failures += 1
            if server.state.auth_failures >= self.config.server.smtp.auth_failure_budget:
                await server.push(replies.TOO_MANY_AUTH_FAILURES)
                server.close_now()
                return AuthResult(success=False, handled=True)
            # R-LOG-4: the same reply whatever the reason (unknown, locked, restricted).
            return AuthResult(success=False, handled=False, message=replies.AUTH_INVALID)
        server.state.authenticated_account = decision.account
        return AuthResult(success=True, auth_data=decision.account, message=replies.AUTH_OK)


class _Answered(Exception):
    """The client cancelled or garbled a response and aiosmtpd has already replied."""


def _text(value: object) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("ascii", "replace")
    return str(value) if value else ""


async def _rdns_of(server: EdgeSMTP) -> str:
    task = server.state.rdns
    if task is None:
        return ""
    try:
        # The lookup started at connect; a slow resolver never delays the 250 by more than this.
        return await asyncio.wait_for(asyncio.shield(task), 0.5)
    except TimeoutError:
        return ""
