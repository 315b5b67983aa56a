"""The audit log: the JetStream stream ``EVENTS``, newest first, filtered, paged by sequence."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError
from nats.js.errors import NotFoundError

from rempart.admin_api.backend import Backend, BackendDep, RedactorDep, SuperadminDep
from rempart.admin_api.models import MAX_ADDRESS, MAX_EVENTS, EventList, EventOut, Problem
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
) -> EventList:
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
