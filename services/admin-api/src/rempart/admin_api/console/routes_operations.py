"""Operations pages for superadmins: blocked IPs (R-IPS-5), the event stream, the settings of
SPEC.md (R-OPS-1) and the suite's status. Reads and writes are the API's route functions."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from rempart.admin_api import routes_cluster, routes_events, routes_ips, routes_settings
from rempart.admin_api.backend import ProblemError, require_superadmin
from rempart.admin_api.console import status
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
from rempart.admin_api.models import MAX_ADDRESS, MAX_LIST, SrsRotation
from rempart.admin_api.redaction import Redactor
from rempart.admin_api.routes_cluster import ClusterOut
from rempart.admin_api.settings import AdminApiSettings
from rempart.admin_api.settings_bodies import MailSettingsPatch
from rempart.common import stats
from rempart.common.events import EVENTS_STREAM, MAIL_STREAM
from rempart.common.grpcutil import channel_check
from rempart.common.outqueue import OutboundQueue

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)
EVENTS_SHOWN = 100
CLUSTER_SECONDS = 3.0  # the pods' readiness, from the Kubernetes API (the cluster view's own bound may be longer)
FILTER_MAX = 64


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
        return f"MAIL stream: {mail.state.messages} records; EVENTS stream: {events.state.messages} events"

    async def auth() -> str:
        await channel_check(backend.auth.channel)()
        return "serving"

    async def pods() -> ClusterOut:
        try:
            return await asyncio.wait_for(call(routes_cluster.get_cluster, request=request,
                                               principal=visit.principal), CLUSTER_SECONDS)
        except TimeoutError:
            return ClusterOut(in_cluster=True, label_selector="",
                              reason=f"the Kubernetes API did not answer within {CLUSTER_SECONDS:g} s")

    direct = asyncio.gather(status.check("Redis", redis), status.check("NATS JetStream", jetstream),
                            status.check("Auth service", auth))
    settings: AdminApiSettings = request.app.state.settings
    answered, services, cluster = await asyncio.gather(
        direct, status.services_readiness(settings.status_readiness_urls), pods())
    checks = [*answered, *services, *status.pods_readiness(cluster)]
    now = time.time()
    queue = chart = None
    if answered[0].up:  # the queue's state and the counters are in Redis
        depth, oldest_ms = await OutboundQueue(backend.redis).depth_and_oldest_ms()
        queue = status.queue_of(depth, oldest_ms, now)
        chart = status.chart_of(await stats.last_hour(backend.redis, now=now))
    return page(request, "status.html", visit=visit, checks=checks, pods_note=cluster.reason or "", queue=queue,
                chart=chart, now=dt.datetime.fromtimestamp(now, dt.UTC))
