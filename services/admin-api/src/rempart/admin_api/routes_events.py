"""The event log (the JetStream stream ``EVENTS``) and the audit trail of administrative changes
(the stream ``AUDIT``, R-ADM-5): newest first, filtered, paged."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Query
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError
from nats.js.errors import NotFoundError
from pydantic import BaseModel, Field

from rempart.admin_api.backend import AdminDep, Backend, BackendDep, Principal, RedactorDep, SuperadminDep, invalid
from rempart.admin_api.models import MAX_ADDRESS, MAX_EVENTS, EventList, EventOut, Problem
from rempart.admin_api.paging import CursorQuery, decode_seq_cursor, encode_cursor
from rempart.admin_api.redaction import Redactor
from rempart.common.events import EVENTS_STREAM
from rempart.common.pb.events.v1 import events_pb2

router = APIRouter(tags=["events"])
_P = {"model": Problem}

# A request reads at most this many stream messages, so that a filter matching nothing in a
# large stream cannot pin the API; the answer's next_before lets the client go on.
SCAN_BUDGET = 5000
BATCH = 100
Filter = Annotated[str | None, Query(max_length=64)]


async def _get(backend: Backend, seq: int) -> tuple[int, Any | None]:
    try:
        return seq, await backend.js.get_msg(EVENTS_STREAM, seq=seq)
    except NotFoundError:
        return seq, None  # trimmed by the stream's limits, or never stored


@router.get("/v1/events", operation_id="listEvents", response_model=EventList,
            responses={401: _P, 403: _P, 422: _P, 503: _P})
async def list_events(
    principal: SuperadminDep,
    backend: BackendDep,
    redactor: RedactorDep,
    area: Filter = None,
    what: Filter = None,
    client_ip: Filter = None,
    account: Annotated[str | None, Query(max_length=MAX_ADDRESS)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_EVENTS)] = 100,
    before: Annotated[int | None, Query(ge=1, description="Only events with a smaller sequence.")] = None,
    cursor: CursorQuery = None,
) -> EventList:
    """Newest first. Page with ``cursor`` (``next_cursor``), as every list does, or with
    ``before`` (``next_before``, a stream sequence) as older clients do."""
    from_cursor = decode_seq_cursor("events", cursor)
    if from_cursor is not None:
        before = from_cursor if before is None else min(before, from_cursor)
    page = await _events_page(backend, redactor, area, what, client_ip, account, limit, before)
    if page.next_before is not None:
        page.next_cursor = encode_cursor("events", str(page.next_before))
    return page


async def _events_page(backend: Backend, redactor: Redactor, area: str | None, what: str | None,
                       client_ip: str | None, account: str | None, limit: int, before: int | None) -> EventList:
    info = await backend.js.stream_info(EVENTS_STREAM)
    first, last = int(info.state.first_seq), int(info.state.last_seq)
    seq = last if before is None else min(last, before - 1)
    wanted = {"area": area, "what": what, "client_ip": client_ip, "account": account}
    out: list[EventOut] = []
    scanned = 0
    while seq >= max(first, 1) and scanned < SCAN_BUDGET:
        low = max(first, 1, seq - BATCH + 1)
        fetched = await asyncio.gather(*(_get(backend, s) for s in range(seq, low - 1, -1)))
        scanned += len(fetched)
        for msg_seq, msg in fetched:
            if msg is None or not msg.data:
                continue
            event = events_pb2.Event()
            try:
                event.ParseFromString(msg.data)
            except DecodeError:
                continue
            if any(value is not None and getattr(event, name) != value for name, value in wanted.items()):
                continue
            fields = MessageToDict(event, preserving_proto_field_name=True)
            fields["attributes"] = redactor.attributes(dict(event.attributes))  # R-ADM-3
            fields["time"] = int(fields.pop("time_unix_ms", 0)) / 1000 or None
            out.append(EventOut(seq=msg_seq, **fields))
            if len(out) == limit:
                return EventList(events=out, next_before=msg_seq if msg_seq > first else None)
        seq = low - 1
    return EventList(events=out, next_before=seq + 1 if seq >= max(first, 1) else None)


# The audit trail (R-ADM-5) ------------------------------------------------------------------
AUDIT_SCAN_BUDGET = 5000
MAX_AUDIT_PAGE = 500


class AuditObject(BaseModel):
    kind: str = Field(description="account, alias, domain, domain_alias, settings, settings_list, ip_block, "
                                  "api_key, dkim_key, queue_message, ...")
    id: str


class AuditRecordOut(BaseModel):
    """One administrative change: who, from where, when, on what, and what it was before and after
    (redacted: secrets never appear, a secret setting shows as its keyed fingerprints)."""

    seq: int = Field(description="Position in the audit stream")
    id: str
    time: dt.datetime
    actor: str = Field(description="The account that made the change")
    actor_ip: str = Field(description="The address the request came from")
    api_key: str = Field(default="", description="The id of the API key used, if any")
    action: str
    object: AuditObject
    domain: str = Field(default="", description="The domain the object belongs to; empty for server-wide objects")
    before: dict[str, Any] | None = Field(default=None, description="The object before the change (null: created)")
    after: dict[str, Any] | None = Field(default=None, description="The object after the change (null: deleted)")
    details: dict[str, str] = Field(default_factory=dict)


class AuditList(BaseModel):
    events: list[AuditRecordOut] = Field(description="Newest first")
    next_cursor: str | None = Field(description="Pass as cursor for the next (older) page; null at the end")


def _audit_cursor(seq: int) -> str:
    return encode_cursor("audit", str(seq))



def _as_dict(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    return value if isinstance(value, dict) else {"value": value}


def _record_out(seq: int, record: dict[str, Any]) -> AuditRecordOut | None:
    raw_obj = record.get("object")
    obj: dict[str, Any] = raw_obj if isinstance(raw_obj, dict) else {}
    try:
        return AuditRecordOut(
            seq=seq, id=str(record.get("id", "")), time=dt.datetime.fromisoformat(str(record.get("time", ""))),
            actor=str(record.get("actor", "")), actor_ip=str(record.get("actor_ip", "")),
            api_key=str(record.get("api_key", "")), action=str(record.get("action", "")),
            object=AuditObject(kind=str(obj.get("kind", "")), id=str(obj.get("id", ""))),
            domain=str(record.get("domain", "")), before=_as_dict(record.get("before")),
            after=_as_dict(record.get("after")),
            details={str(k): str(v) for k, v in (record.get("details") or {}).items()},
        )
    except (ValueError, TypeError, AttributeError):
        return None  # not a record this code wrote


AuditFilter = Annotated[str | None, Query(max_length=MAX_ADDRESS)]


@router.get("/v1/audit", operation_id="listAudit", response_model=AuditList,
            responses={401: _P, 403: _P, 422: _P, 503: _P},
            summary="The audit trail of administrative changes (R-ADM-5), newest first")
async def list_audit(
    principal: AdminDep,
    backend: BackendDep,
    actor: AuditFilter = None,
    kind: Annotated[str | None, Query(max_length=64, description="The object's kind (account, settings...)")] = None,
    object_id: AuditFilter = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    since: Annotated[dt.datetime | None, Query(description="RFC 3339: only changes at or after")] = None,
    until: Annotated[dt.datetime | None, Query(description="RFC 3339: only changes before")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_AUDIT_PAGE)] = 100,
    cursor: CursorQuery = None,
) -> AuditList:
    """A superadmin sees every change; a domain admin the changes to its own domain's objects.
    A page may hold fewer than ``limit`` records (at most 5,000 are read per request): go on while
    ``next_cursor`` is not null."""
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise invalid("A time needs its offset (RFC 3339)", name, "no time zone offset", "query")
    audit = backend.audit
    first, last = await audit.bounds()
    before = decode_seq_cursor("audit", cursor)
    seq = last if before is None else min(last, before - 1)
    low_end = max(first, 1)
    out: list[AuditRecordOut] = []
    scanned = 0
    while seq >= low_end and scanned < AUDIT_SCAN_BUDGET:
        low = max(low_end, seq - BATCH + 1)
        fetched = await asyncio.gather(*(_audit_get(backend, s) for s in range(seq, low - 1, -1)))
        scanned += len(fetched)
        for msg_seq, record in fetched:
            found = _record_out(msg_seq, record) if record is not None else None
            if found is None:
                continue
            if since is not None and found.time < since:
                return AuditList(events=out, next_cursor=None)  # older from here on
            if not _audit_matches(principal, found, actor, kind, object_id, action, until):
                continue
            out.append(found)
            if len(out) == limit:
                return AuditList(events=out, next_cursor=_audit_cursor(msg_seq) if msg_seq > low_end else None)
        seq = low - 1
    return AuditList(events=out, next_cursor=_audit_cursor(seq + 1) if seq >= low_end else None)


async def _audit_get(backend: Backend, seq: int) -> tuple[int, dict[str, Any] | None]:
    return seq, await backend.audit.get(seq)


def _audit_matches(principal: Principal, record: AuditRecordOut, actor: str | None, kind: str | None,
                   object_id: str | None, action: str | None, until: dt.datetime | None) -> bool:
    if not principal.is_superadmin and (not record.domain or not principal.can_manage_domain(record.domain)):
        return False
    if until is not None and record.time >= until:
        return False
    wanted = ((actor, record.actor), (kind, record.object.kind), (object_id, record.object.id),
              (action, record.action))
    return all(value is None or value.strip().lower() == have.lower() for value, have in wanted)
