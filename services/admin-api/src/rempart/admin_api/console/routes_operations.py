"""Operations pages for superadmins: blocked IPs (R-IPS-5), the event stream, the settings of
SPEC.md (R-OPS-1) and the suite's status. Reads and writes are the API's route functions."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from rempart.admin_api import routes_events, routes_ips, routes_settings
from rempart.admin_api.backend import ProblemError, require_superadmin
from rempart.admin_api.console.calls import call
from rempart.admin_api.console.settings_form import GROUPS, GROUPS_BY_KEY, form_changes, group_fields
from rempart.admin_api.console.web import (
    ConsoleRoute,
    Failure,
    Visit,
    done,
    failure_of,
    page,
    positive_int,
    posted,
    signed_in,
)
from rempart.admin_api.models import MAX_ADDRESS, MAX_LIST, EventOut, SrsRotation
from rempart.admin_api.redaction import Redactor
from rempart.admin_api.settings_bodies import MailSettingsPatch
from rempart.common.events import EVENTS_STREAM, MAIL_STREAM
from rempart.common.grpcutil import channel_check

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)
EVENTS_SHOWN = 100
FILTER_MAX = 64
CHECK_SECONDS = 2.0
HOUR = 3600
BUCKETS = 6  # the last hour in 10-minute bars


async def superadmin_visit(request: Request) -> Visit:
    visit = await signed_in(request)
    await require_superadmin(visit.principal)
    return visit


def redactor_of(request: Request) -> Redactor:
    redactor: Redactor = request.app.state.redactor
    return redactor


# Blocked IPs (R-IPS-5) ---------------------------------------------------------------------------
async def _blocks_page(visit: Visit, failure: Failure | None = None) -> Response:
    request = visit.request
    listing = await call(routes_ips.list_blocks, principal=visit.principal, backend=visit.backend, limit=MAX_LIST)
    looked_up, lookup = None, request.query_params.get("ip", "").strip()[:FILTER_MAX]
    if lookup and failure is None:
        try:
            looked_up = await call(routes_ips.get_block, ip=lookup, principal=visit.principal, backend=visit.backend)
        except ProblemError as exc:
            failure = failure_of(exc, frozenset({404, 422}))
            if failure is None:
                raise
    return page(request, "blocks.html", failure.status if failure else 200, visit, blocks=listing.blocks,
                truncated=listing.truncated, lookup=lookup, looked_up=looked_up, failure=failure)


@router.get("/admin/blocks")
async def blocks_page(request: Request) -> Response:
    return await _blocks_page(await superadmin_visit(request))


@router.post("/admin/blocks/unblock")
async def unblock(request: Request) -> Response:
    visit = await superadmin_visit(request)
    form = await posted(visit)
    try:
        await call(routes_ips.delete_block, ip=form.get("ip").strip()[:FILTER_MAX], request=request,
                   principal=visit.principal, backend=visit.backend)
    except ProblemError as exc:
        failure = failure_of(exc, frozenset({404, 422}))
        if failure is None:
            raise
        return await _blocks_page(visit, failure)
    return done("/admin/blocks", "unblocked")


# The event stream ---------------------------------------------------------------------------------
@router.get("/admin/events")
async def events_page(request: Request) -> Response:
    visit = await superadmin_visit(request)
    query = request.query_params
    filters = {name: (query.get(name) or "").strip() for name in ("area", "what", "account", "client_ip")}
    bounded = {name: value[: MAX_ADDRESS if name == "account" else FILTER_MAX] or None
               for name, value in filters.items()}
    listing = await call(routes_events.list_events, principal=visit.principal, backend=visit.backend,
                         redactor=redactor_of(request), area=bounded["area"], what=bounded["what"],
                         client_ip=bounded["client_ip"], account=bounded["account"], limit=EVENTS_SHOWN,
                         before=positive_int(query.get("before")))
    more = {name: value for name, value in filters.items() if value}
    return page(request, "events.html", visit=visit, events=listing.events, filters=filters, more=more,
                next_before=listing.next_before)


# Settings (R-OPS-1) -------------------------------------------------------------------------------
async def _settings_page(visit: Visit, failure: Failure | None = None, failed_group: str = "") -> Response:
    response = Response()
    current = await call(routes_settings.get_settings, response=response, principal=visit.principal,
                         backend=visit.backend, redactor=redactor_of(visit.request))
    groups = [(group, group_fields(group)) for group in GROUPS]
    return page(visit.request, "settings.html", failure.status if failure else 200, visit, groups=groups,
                values=current["settings"], version=current["version"], etag=response.headers.get("etag", ""),
                failure=failure, failed_group=failed_group)


@router.get("/admin/settings")
async def settings_page(request: Request) -> Response:
    return await _settings_page(await superadmin_visit(request))


@router.post("/admin/settings/srs-rotation")
async def rotate_srs(request: Request) -> Response:
    visit = await superadmin_visit(request)
    form = await posted(visit)
    try:
        await call(routes_settings.rotate_srs_secrets, body=SrsRotation(), request=request, response=Response(),
                   principal=visit.principal, backend=visit.backend, redactor=redactor_of(request),
                   if_match=form.get("etag") or None)
    except ProblemError as exc:
        failure = failure_of(exc, frozenset({412, 422}))
        if failure is None:
            raise
        return await _settings_page(visit, failure, "dns")
    return done("/admin/settings#dns", "srs_rotated")


@router.post("/admin/settings/{group}")
async def save_settings(request: Request, group: str) -> Response:
    visit = await superadmin_visit(request)
    chosen = GROUPS_BY_KEY.get(group)
    if chosen is None:
        raise ProblemError(404, "Settings group not found")
    form = await posted(visit)
    redactor = redactor_of(request)
    current = await call(routes_settings.get_settings, response=Response(), principal=visit.principal,
                         backend=visit.backend, redactor=redactor)
    doc, unreadable = form_changes(chosen, form, current["settings"])
    try:
        if unreadable:
            raise ProblemError(422, "Invalid settings", unreadable)
        if doc:
            body = MailSettingsPatch.model_validate(doc)
            await call(routes_settings.patch_settings, body=body, request=request, response=Response(),
                       principal=visit.principal, backend=visit.backend, redactor=redactor,
                       if_match=form.get("etag") or None)
    except (ValidationError, ProblemError) as exc:
        failure = failure_of(exc, frozenset({412, 422}))
        if failure is None:
            raise
        return await _settings_page(visit, failure, chosen.key)
    return done(f"/admin/settings#{chosen.key}", "settings_saved")


# Status ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Bar:
    label: str
    count: int
    height: int
    y: int
    x: int


async def _check(name: str, probe: Any) -> Check:
    started = time.monotonic()
    try:
        detail = await asyncio.wait_for(probe(), CHECK_SECONDS)
    except Exception as exc:  # noqa: BLE001 - any failure is "not ready", shown as its type
        return Check(name, False, type(exc).__name__)
    return Check(name, True, f"{detail} ({(time.monotonic() - started) * 1000:.0f} ms)")


def _hour_chart(events: list[EventOut], now: float) -> tuple[list[Bar], Counter[str]]:
    counts = [0] * BUCKETS
    kinds: Counter[str] = Counter()
    for event in events:
        if event.time is None:
            continue
        age = now - event.time.timestamp()
        if 0 <= age < HOUR:
            counts[BUCKETS - 1 - int(age // (HOUR / BUCKETS))] += 1
            kinds[f"{event.area}/{event.what}"] += 1
    top = max(counts) or 1
    bars = [Bar(f"{(BUCKETS - i) * 10} to {(BUCKETS - i - 1) * 10} min ago", n, round(100 * n / top),
                110 - round(100 * n / top), 10 + i * 50) for i, n in enumerate(counts)]
    return bars, kinds


@router.get("/admin/status")
async def status_page(request: Request) -> Response:
    visit = await superadmin_visit(request)
    backend = visit.backend

    async def redis() -> str:
        await backend.redis.ping()
        return "answers"

    async def jetstream() -> str:
        mail = await backend.js.stream_info(MAIL_STREAM)
        events = await backend.js.stream_info(EVENTS_STREAM)
        return f"MAIL {mail.state.messages} records, EVENTS {events.state.messages} events"

    async def auth() -> str:
        await channel_check(backend.auth.channel)()
        return "serving"

    checks = await asyncio.gather(_check("Redis", redis), _check("NATS JetStream", jetstream),
                                  _check("Auth service", auth))
    consumers: list[tuple[str, int, int]] = []
    try:
        for info in await asyncio.wait_for(backend.js.consumers_info(MAIL_STREAM), CHECK_SECONDS):
            consumers.append((info.name, int(info.num_pending or 0), int(info.num_ack_pending or 0)))
    except Exception:  # noqa: BLE001 - JetStream down is already shown above
        consumers = []
    recent = await call(routes_events.list_events, principal=visit.principal, backend=backend,
                        redactor=redactor_of(request), area=None, what=None, client_ip=None, account=None,
                        limit=500, before=None)
    bars, kinds = _hour_chart(recent.events, time.time())
    return page(request, "status.html", visit=visit, checks=checks, consumers=consumers, bars=bars,
                kinds=kinds.most_common(20), now=dt.datetime.now(dt.UTC))
