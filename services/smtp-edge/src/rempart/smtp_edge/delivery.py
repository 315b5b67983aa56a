"""Accepting a message: trace headers, then one durable write to the message store before the
250 (DESIGN.md "Durability", R-OPS-3). The indexer (``rempart.common.mailbox.run_indexer``, in
imap-pop) files the record in its mailboxes and wakes IMAP IDLE: each record is indexed once,
there, and the edge's event loop spends nothing on it (issue 11)."""

from __future__ import annotations

import asyncio
import logging
import time

from aiosmtpd.smtp import Envelope, Session
from prometheus_client import Counter, Histogram

from rempart.common import metrics
from rempart.common.config import SettingsCache
from rempart.common.events import EventBus
from rempart.common.mailbox import Mailboxes
from rempart.common.mailstore import new_transaction_id
from rempart.common.pb.policy.v1 import policy_pb2
from rempart.common.stats import TEMPORARY_FAILURE, StatsRecorder
from rempart.smtp_edge import replies
from rempart.smtp_edge.received import received_header
from rempart.smtp_edge.session import EdgeSMTP, strip_brackets

log = logging.getLogger(__name__)

ACCEPTED_BYTES = Counter("rempart_smtp_accepted_bytes_total", "Bytes of accepted messages", ["listener"])
STORE_SECONDS = Histogram("rempart_smtp_store_seconds", "Time to store a message durably")
# Well inside the client's patience (RFC 5321 4.5.3.2.6: 10 minutes for the final reply), short
# enough that a stalled JetStream becomes a prompt 451 instead of a hung session.
STORE_TIMEOUT_SECONDS = 15.0
# A slow resolver never delays the 250 by more than this (the lookup started at connect).
RDNS_WAIT_SECONDS = 0.5


class Delivery:
    def __init__(self, *, hostname: str, mailboxes: Mailboxes, events: EventBus, config: SettingsCache,
                 stats: StatsRecorder | None = None) -> None:
        self.hostname = hostname
        self.stats = stats  # messages accepted and stores failed, for GET /v1/stats
        self.mailboxes = mailboxes
        self.events = events
        self.config = config

    async def deliver(self, server: EdgeSMTP, session: Session, envelope: Envelope, data: bytes,
                      verdict: policy_pb2.Verdict) -> str:
        """The reply to the final dot of an accepted transaction; the transaction is over."""
        state = server.state
        queue_id = new_transaction_id()
        if not state.local_mailboxes and not state.remote_recipients:
            # Every recipient was discarded (R-DOM-1 discard): accept and drop, no bounce.
            state.reset_transaction()
            return replies.QUEUED.format(queue_id=queue_id)
        message = await self._trace_headers(server, session, envelope, queue_id, verdict) + data
        started = time.monotonic()
        try:
            async with asyncio.timeout(STORE_TIMEOUT_SECONDS):
                record, _seq = await self.mailboxes.store.accept(
                    message,
                    mail_from=strip_brackets(envelope.mail_from or ""),
                    local_mailboxes=state.local_mailboxes,
                    remote_recipients=state.remote_recipients,
                    client_ip=state.client_ip,
                    authenticated_account=state.authenticated_account,
                    dsn=state.dsn,
                    remote_senders=state.remote_senders,
                    transaction_id=queue_id,
                )
        except Exception as exc:  # noqa: BLE001 - any store failure must become a 451, never a 250
            log.error("durable store failed: %s", exc, extra={"session": state.session_id})
            state.reset_transaction()
            if self.stats is not None:
                self.stats.refusal(TEMPORARY_FAILURE)
            return replies.STORE_TEMPFAIL
        metrics.observe(STORE_SECONDS, time.monotonic() - started)  # exemplar: the DATA stage's trace
        metrics.child(ACCEPTED_BYTES, server.listener.name).inc(len(message))
        if self.stats is not None:
            self.stats.message_accepted()
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
        return replies.QUEUED.format(queue_id=record.transaction_id)

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


async def _rdns_of(server: EdgeSMTP) -> str:
    task = server.state.rdns
    if task is None:
        return ""
    if task.done():  # the common case: the lookup started at connect
        return task.result()
    try:
        return await asyncio.wait_for(asyncio.shield(task), RDNS_WAIT_SECONDS)
    except TimeoutError:
        return ""
