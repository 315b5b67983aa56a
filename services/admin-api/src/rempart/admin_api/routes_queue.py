"""The outbound queue (R-OUT-2): the messages the relay has not finished with, each recipient's
state and last reply, and two actions: retry now, and delete.

Everything here is the relay's own state (:mod:`rempart.common.outqueue`): the per-recipient
results and schedule it writes after every remote reply, and the queue index it keeps. A retry
rewrites the schedule the relay reads and hands the transaction to one relay replica at once; a
deletion leaves the mark the relay looks for before every record, connection and final dot.
Headers are read from the message itself on the MAIL stream; the body never leaves.

Confinement (R-ADM-1): a superadmin sees every message; a domain admin the messages whose
envelope sender is in its domain (or one of its domain aliases); any other is not found, with
the same answer whether it exists or not. Users are refused.
"""

from __future__ import annotations

import base64
import binascii
import email.message
import email.parser
import email.policy
import logging
import re
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from rempart.admin_api.backend import (
    AdminDep,
    AuditReady,
    Backend,
    BackendDep,
    Principal,
    ProblemError,
    invalid,
    not_found,
    record_action,
)
from rempart.admin_api.models import MAX_ADDRESS, MAX_DOMAIN, MAX_LIST, Problem, Timestamp
from rempart.admin_api.preconditions import IfMatchHeader, check_if_match, etag_of, with_etag
from rempart.common.mailstore import BlobUnreadable, MessageStore
from rempart.common.outqueue import RETRY_SUBJECT, OutboundQueue, QueuedMessage, RecipientState, ViewState, domain_of

log = logging.getLogger(__name__)

router = APIRouter(tags=["queue"], dependencies=[AuditReady])
_P = {"model": Problem}
R_LIST: dict[int | str, dict[str, Any]] = {401: _P, 403: _P, 422: _P}
R_READ: dict[int | str, dict[str, Any]] = {401: _P, 403: _P, 404: _P, 422: _P}
R_WRITE: dict[int | str, dict[str, Any]] = {401: _P, 403: _P, 404: _P, 409: _P, 412: _P, 422: _P, 503: _P}
# Transaction ids are hex, and a DSN's is its original's with "-dsn-<hex>" appended.
QueueIdPath = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9-]*$")]
NOT_FOUND = "Queued message"
# A request reads at most this many queued messages, so that a filter matching nothing in a
# long queue cannot pin the API; the answer's next_cursor lets the client go on.
SCAN_BUDGET = 5000
# Headers are read from the start of the message, at most this far.
MAX_HEADER_BYTES = 256 * 1024
MAX_HEADER_TEXT = 998  # RFC 5322 2.1.1: a line's limit; a longer value is cut
MAX_AUDITED_RECIPIENTS = 100
_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_HEADER_END = re.compile(rb"\r?\n\r?\n")

STATE_HELP = ("pending: not tried yet; sending: the final dot is on its way (no reply yet); deferred: tried, "
              "refused for now, tried again at next_attempt; delivered: the remote accepted it; bounced: "
              "refused for good, or expired (a DSN went to the sender unless the sender is <> or asked for "
              "none), or deleted from the queue by an administrator (no DSN)")


class QueueRecipient(BaseModel):
    address: str
    state: ViewState = Field(description=STATE_HELP)
    attempts: int = Field(description="Attempts that ended in a temporary failure")
    last_attempt: Timestamp | None
    next_attempt: Timestamp | None = Field(description="When the relay tries it next (pending and deferred only)")
    reply_code: int | None = Field(description="The last reply's code (451, 550...)")
    enhanced_status: str | None = Field(description="The last reply's enhanced status code (RFC 3463)")
    reply_text: str | None = Field(description="The last reply's text")
    reply_from_remote: bool = Field(description="The remote server said it (else the relay: DNS, connection, "
                                                "expiry...)")
    remote_mta: str | None = Field(description="The mail host that gave the last reply")


class QueuedMessageOut(BaseModel):
    id: str = Field(description="The queue id (the transaction id in the relay's logs: queue_id)")
    sender: str = Field(description="The envelope sender (MAIL FROM); empty for <> (a DSN)")
    size: int = Field(description="Bytes")
    first_seen: Timestamp = Field(description="When the message was accepted")
    next_attempt: Timestamp | None = Field(description="The soonest next attempt of its recipients")
    attempts: int = Field(description="The most attempts of any of its recipients")
    destinations: list[str] = Field(description="The domains it still waits to be delivered to")
    recipients: list[QueueRecipient]


class QueuedMessageHeaders(BaseModel):
    """The message's own headers, decoded (RFC 2047); null when absent or unreadable."""

    model_config = ConfigDict(populate_by_name=True)

    subject: str | None = None
    from_: str | None = Field(default=None, alias="from")
    to: str | None = None
    message_id: str | None = None
    date: str | None = None


class QueuedMessageDetail(QueuedMessageOut):
    headers: QueuedMessageHeaders = Field(description="Subject, From, To, Message-ID and Date; never the body")


class QueueList(BaseModel):
    messages: list[QueuedMessageOut] = Field(description="Oldest first")
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null at the end")


class QueueRetryOut(BaseModel):
    id: str
    recipients_due: list[str] = Field(description="The recipients now due; one relay replica takes them at once")
    next_attempt: Timestamp


# Views -------------------------------------------------------------------------------------------
def _reply_parts(line: str) -> tuple[int | None, str | None, str | None]:
    if not line:
        return None, None, None
    code, _, rest = line.partition(" ")
    enhanced, _, text = rest.partition(" ")
    if not _ENHANCED.match(enhanced):
        enhanced, text = "", rest
    return (int(code) if code.isdigit() else None), enhanced or None, text or None


def _seconds(ms: int | None) -> float | None:
    return ms / 1000 if ms else None


def _recipient_out(message: QueuedMessage, address: str, state: RecipientState) -> QueueRecipient:
    code, enhanced, text = _reply_parts(state.reply)
    return QueueRecipient(
        address=address, state=state.view_state, attempts=state.attempts,
        last_attempt=_seconds(state.last_ms),  # type: ignore[arg-type]
        next_attempt=_seconds(message.next_attempt_ms(state)),  # type: ignore[arg-type]
        reply_code=code, enhanced_status=enhanced, reply_text=text,
        reply_from_remote=state.remote_reply, remote_mta=state.mta or None,
    )


def message_out(message: QueuedMessage) -> QueuedMessageOut:
    return QueuedMessageOut(
        id=message.transaction_id, sender=message.sender, size=message.size,
        first_seen=message.received_ms / 1000,  # type: ignore[arg-type]
        next_attempt=_seconds(message.next_attempt),  # type: ignore[arg-type]
        attempts=message.attempts, destinations=message.destinations,
        recipients=[_recipient_out(message, r, s) for r, s in message.recipients.items()],
    )


def _header_value(parsed: email.message.EmailMessage, name: str) -> str | None:
    try:
        value = parsed.get(name)
        return None if value is None else " ".join(str(value).split())[:MAX_HEADER_TEXT]
    except Exception:  # noqa: BLE001 - a malformed header is shown as absent, never an error
        return None


async def _header_block(backend: Backend, message: QueuedMessage) -> bytes | None:
    """The message's header section, read from its delivery record (or blob) on the MAIL stream."""
    if not message.seq:
        return None
    store = await MessageStore.open(backend.js)
    record = await store.record_at(message.seq, message.transaction_id)
    if record is None:
        return None
    if not record.blob:
        data = bytes(record.body[:MAX_HEADER_BYTES])
    else:
        data = b""
        chunks = store.iter_blob(record.blob)
        try:
            async for chunk in chunks:
                data += chunk
                if _HEADER_END.search(data) or len(data) >= MAX_HEADER_BYTES:
                    break  # the headers are read: the rest of the message is not
        except BlobUnreadable:
            return None
        finally:
            close = getattr(chunks, "aclose", None)
            if close is not None:
                await close()
    end = _HEADER_END.search(data)
    return data[:end.start()] + b"\r\n" if end else data[:MAX_HEADER_BYTES]


async def headers_of(backend: Backend, message: QueuedMessage) -> QueuedMessageHeaders:
    block = await _header_block(backend, message)
    if not block:
        return QueuedMessageHeaders()
    parsed = email.parser.BytesParser(policy=email.policy.default).parsebytes(block, headersonly=True)
    assert isinstance(parsed, email.message.EmailMessage)
    return QueuedMessageHeaders(subject=_header_value(parsed, "Subject"), from_=_header_value(parsed, "From"),
                                to=_header_value(parsed, "To"), message_id=_header_value(parsed, "Message-ID"),
                                date=_header_value(parsed, "Date"))


# Confinement -----------------------------------------------------------------------------------
class Visibility:
    """Which queued messages the caller may see: a domain admin, those whose envelope sender's
    domain is its own (directly or as a domain alias)."""

    def __init__(self, backend: Backend, principal: Principal) -> None:
        self._backend = backend
        self._principal = principal
        self._canonical: dict[str, str | None] = {}

    async def allows(self, message: QueuedMessage) -> bool:
        if self._principal.is_superadmin:
            return True
        if not message.sender:
            return False  # a DSN (<>) belongs to no tenant
        domain = domain_of(message.sender)
        if domain not in self._canonical:
            self._canonical[domain] = await self._backend.directory.canonical_domain(domain)
        canonical = self._canonical[domain]
        return canonical is not None and self._principal.can_manage_domain(canonical)


async def _visible_or_404(backend: Backend, principal: Principal, queue_id: str) -> QueuedMessage:
    message = await OutboundQueue(backend.redis).get(queue_id)
    if message is None or not await Visibility(backend, principal).allows(message):
        raise not_found(NOT_FOUND)
    return message


# Pagination ------------------------------------------------------------------------------------
def _cursor(message: QueuedMessage) -> str:
    return base64.urlsafe_b64encode(f"{message.received_ms}:{message.transaction_id}".encode()).decode().rstrip("=")


def _after(cursor: str | None) -> tuple[int, str] | None:
    if cursor is None:
        return None
    try:
        arrival, _, txn = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().partition(":")
        if txn:
            return int(arrival), txn
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise invalid("Not a cursor of this list", "cursor", "not a next_cursor from this list", "query")


def _matches(message: QueuedMessage, sender: str | None, sender_domain: str | None, recipient_domain: str | None,
             state: str | None) -> bool:
    if sender is not None and message.sender.lower() != ("" if sender.strip() == "<>" else sender.strip().lower()):
        return False
    if sender_domain is not None and (not message.sender or domain_of(message.sender) != sender_domain.lower()):
        return False
    if recipient_domain is not None and recipient_domain.lower() not in message.destinations:
        return False
    return state is None or any(s.view_state == state for s in message.recipients.values())


# Routes -----------------------------------------------------------------------------------------
@router.get("/v1/queue", operation_id="listQueue", response_model=QueueList, responses=R_LIST)
async def list_queue(
    principal: AdminDep,
    backend: BackendDep,
    sender: Annotated[str | None, Query(max_length=MAX_ADDRESS,
                                        description="The envelope sender, exactly (any case); <> for DSNs")] = None,
    sender_domain: Annotated[str | None, Query(max_length=MAX_DOMAIN)] = None,
    recipient_domain: Annotated[str | None, Query(max_length=MAX_DOMAIN,
                                                  description="A domain it still waits to be delivered to")] = None,
    state: Annotated[Literal["pending", "sending", "deferred"] | None,
                     Query(description="Messages with at least one recipient in this state")] = None,
    older_than: Annotated[int | None, Query(ge=0, le=10 * 365 * 86400,
                                            description="Only messages first seen at least this many seconds ago")]
    = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 100,
    cursor: Annotated[str | None, Query(max_length=400, description="next_cursor of the previous page")] = None,
) -> QueueList:
    """The messages waiting for delivery or being retried, oldest first, with each recipient's
    state and last reply. A page may hold fewer than ``limit`` messages (at most 5,000 are read
    per request); go on while ``next_cursor`` is not null."""
    after = _after(cursor)
    before_ms = int((time.time() - older_than) * 1000) if older_than is not None else None
    visibility = Visibility(backend, principal)
    out: list[QueuedMessageOut] = []
    scanned = 0
    last: QueuedMessage | None = None
    async for message in OutboundQueue(backend.redis).scan(after, before_ms):
        scanned += 1
        last = message
        if _matches(message, sender, sender_domain, recipient_domain, state) and await visibility.allows(message):
            out.append(message_out(message))
        if len(out) >= limit or scanned >= SCAN_BUDGET:
            return QueueList(messages=out, next_cursor=_cursor(last))
    return QueueList(messages=out, next_cursor=None)


@router.get("/v1/queue/{queue_id}", operation_id="getQueuedMessage", response_model=QueuedMessageDetail,
            responses=R_READ)
async def get_queued_message(queue_id: QueueIdPath, response: Response, principal: AdminDep,
                             backend: BackendDep) -> QueuedMessageDetail:
    """One queued message: its recipients' states and its headers (Subject, From, To,
    Message-ID, Date), never its body. The ETag covers its queue state."""
    message = await _visible_or_404(backend, principal, queue_id)
    out = message_out(message)
    with_etag(response, etag_of(out))
    return QueuedMessageDetail(**out.model_dump(), headers=await headers_of(backend, message))


@router.post("/v1/queue/{queue_id}/retry", operation_id="retryQueuedMessage", response_model=QueueRetryOut,
             status_code=202, responses=R_WRITE)
async def retry_queued_message(queue_id: QueueIdPath, request: Request, principal: AdminDep,
                               backend: BackendDep, if_match: IfMatchHeader = None) -> QueueRetryOut:
    """Retry now: every recipient waiting for its next attempt becomes due, and one relay replica
    takes the message at once (the others see the same schedule). 409 when every recipient still
    waiting is being delivered right now."""
    message = await _visible_or_404(backend, principal, queue_id)
    check_if_match(if_match, etag_of(message_out(message)))
    now_ms = int(time.time() * 1000)
    due = await OutboundQueue(backend.redis).retry(queue_id, now_ms)
    if due is None:
        raise not_found(NOT_FOUND)
    if not due:
        raise ProblemError(409, "Every recipient still waiting is being delivered right now")
    try:
        await backend.events.connection.publish(RETRY_SUBJECT, queue_id.encode())
    except Exception as exc:  # noqa: BLE001 - the relays also look for retries every few seconds
        log.warning("retry announcement not published: %s", exc)
    await record_action(backend, request, principal.address, "queue_message_retried", queue_id,
                        kind="queue_message", domain=domain_of(message.sender) if message.sender else "",
                        recipients_due=_listed(due), sender=message.sender or "<>")
    return QueueRetryOut(id=queue_id, recipients_due=due, next_attempt=now_ms / 1000)  # type: ignore[arg-type]


@router.delete("/v1/queue/{queue_id}", operation_id="deleteQueuedMessage", status_code=204, response_class=Response,
               responses=R_WRITE)
async def delete_queued_message(queue_id: QueueIdPath, request: Request, principal: AdminDep,
                                backend: BackendDep, if_match: IfMatchHeader = None) -> Response:
    """Drop the message from the queue. Its recipients not yet delivered are **not bounced**: no
    DSN goes to the sender. A relay replica delivering it right now stops before its next
    connection and before the final dot of the transaction under way, and never sends it
    again; a recipient whose remote already received the final dot has it."""
    message = await _visible_or_404(backend, principal, queue_id)
    check_if_match(if_match, etag_of(message_out(message)))
    if not await OutboundQueue(backend.redis).remove(queue_id, principal.address):
        raise not_found(NOT_FOUND)
    await record_action(backend, request, principal.address, "queue_message_deleted", queue_id,
                        kind="queue_message", domain=domain_of(message.sender) if message.sender else "",
                        before=message_out(message), recipients_not_delivered=_listed(message.waiting),
                        sender=message.sender or "<>")
    return Response(status_code=204)


def _listed(addresses: list[str]) -> str:
    shown = ",".join(addresses[:MAX_AUDITED_RECIPIENTS])
    more = len(addresses) - MAX_AUDITED_RECIPIENTS
    return shown + (f" (+{more} more)" if more > 0 else "")
