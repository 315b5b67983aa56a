"""Delivery status notifications (RFC 3464 inside an RFC 6522 ``multipart/report``).

A DSN goes to the envelope sender of the original message: the human-readable part, the
``message/delivery-status`` part with one block per recipient, then the original headers
(``text/rfc822-headers``), or the whole message when the sender asked ``RET=FULL`` (RFC 3461
4.3) and it is not too large. A DSN's own envelope sender is empty (RFC 3461 6.2, RFC 5321
4.5.5), so that a DSN about a DSN is never made: the relay drops and logs those instead.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import time
from dataclasses import dataclass
from typing import Literal

from rempart.smtp_edge.relay.replies import Reply

Action = Literal["failed", "delayed", "delivered", "relayed", "expanded"]
MAX_RETURNED_BODY = 10 * 1024 * 1024


@dataclass(frozen=True)
class RecipientReport:
    recipient: str
    action: Action
    reply: Reply
    remote_mta: str = ""
    original_recipient: str = ""  # the ORCPT parameter as given ("rfc822;bob@example.org")
    last_attempt_unix: float = 0.0
    will_retry_until_unix: float = 0.0


def _date(unix: float) -> str:
    return email.utils.formatdate(unix, localtime=False, usegmt=True)


def _xtext_decode(value: str) -> str:
    """RFC 3461 4: ORCPT is xtext ("+2B" is "+")."""
    out, i = [], 0
    while i < len(value):
        if value[i] == "+" and i + 2 < len(value) and all(c in "0123456789ABCDEF" for c in value[i + 1:i + 3]):
            out.append(chr(int(value[i + 1:i + 3], 16)))
            i += 3
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def header_block(message: bytes) -> bytes:
    """The original header section, without the blank line that ends it."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = message.find(separator)
        if end >= 0:
            return message[:end]
    return message


def original_subject(message: bytes) -> str:
    for line in header_block(message).decode("utf-8", "replace").splitlines():
        if line.lower().startswith("subject:"):
            return line[8:].strip()[:200]
    return ""


def dsn_transaction_id(original_id: str, reports: list[RecipientReport]) -> str:
    """The same DSN for the same recipients and action: a relay that dies after storing a DSN
    and before recording it stores the same one again, which JetStream deduplicates."""
    digest = hashlib.sha256("\n".join(f"{r.action} {r.recipient}" for r in reports).encode()).hexdigest()
    return f"{original_id}-dsn-{digest[:12]}"


def build_dsn(
    *,
    reporting_mta: str,
    sender: str,
    original: bytes,
    original_id: str,
    arrival_unix: float,
    reports: list[RecipientReport],
    envid: str = "",
    return_full: bool = False,
    now: float | None = None,
) -> bytes:
    now = time.time() if now is None else now
    boundary = f"{original_id}/{reporting_mta}/{os.urandom(6).hex()}"
    delayed = all(r.action == "delayed" for r in reports)
    subject = "Delayed Mail (still being retried)" if delayed else "Undelivered Mail Returned to Sender"
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{sender}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: <{original_id}.{int(now)}.dsn@{reporting_mta}>",
        "Auto-Submitted: auto-replied",  # RFC 3834 5: never answered by autoresponders
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"This is the mail system at host {reporting_mta}.",
        "",
    ]
    if delayed:
        lines += ["Your message could not be delivered yet to the recipients below. It is still",
                  "in the queue and delivery will be retried; you do not need to resend it.", ""]
    else:
        lines += ["I'm sorry to have to inform you that your message could not be delivered to",
                  "one or more recipients. The reasons are given below.", ""]
    subject_line = original_subject(original)
    if subject_line:
        lines += [f"Subject of your message: {subject_line}", ""]
    for report in reports:
        where = f" (from {report.remote_mta})" if report.remote_mta and report.reply.remote else ""
        lines.append(f"<{report.recipient}>: {report.reply}{where}")
    lines += ["", f"--{boundary}", "Content-Type: message/delivery-status", "",
              f"Reporting-MTA: dns; {reporting_mta}", f"X-Rempart-Queue-ID: {original_id}"]
    if envid:
        lines.append(f"Original-Envelope-Id: {_xtext_decode(envid)}")
    lines.append(f"Arrival-Date: {_date(arrival_unix)}")
    for report in reports:
        address_type = "rfc822" if report.recipient.isascii() else "utf-8"  # RFC 6533 3
        lines += ["", f"Final-Recipient: {address_type}; {report.recipient}"]
        if report.original_recipient:
            kind, _, value = report.original_recipient.partition(";")
            lines.append(f"Original-Recipient: {kind.strip() or 'rfc822'};{_xtext_decode(value)}")
        lines += [f"Action: {report.action}", f"Status: {report.reply.enhanced}"]
        if report.remote_mta:
            lines.append(f"Remote-MTA: dns; {report.remote_mta}")
        if report.reply.remote:
            lines.append(f"Diagnostic-Code: smtp; {report.reply.code} {report.reply.enhanced} {report.reply.text}")
        else:
            lines.append(f"Diagnostic-Code: X-Rempart; {report.reply}")
        if report.last_attempt_unix:
            lines.append(f"Last-Attempt-Date: {_date(report.last_attempt_unix)}")
        if report.will_retry_until_unix:
            lines.append(f"Will-Retry-Until: {_date(report.will_retry_until_unix)}")
    head = "\r\n".join(lines).encode("utf-8") + b"\r\n\r\n"
    if return_full and len(original) <= MAX_RETURNED_BODY:
        part = b"Content-Type: message/rfc822\r\n\r\n" + original.rstrip(b"\r\n") + b"\r\n"
    else:
        part = b"Content-Type: text/rfc822-headers\r\n\r\n" + header_block(original) + b"\r\n"
    return head + f"--{boundary}\r\n".encode() + part + f"\r\n--{boundary}--\r\n".encode()
