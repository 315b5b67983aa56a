"""A domain's and an account's settings overrides (R-OPS-1 at domain and account scope).

The settings SPEC lets a domain or an account override (:data:`rempart.common.config.SCOPED_FIELDS`:
the recipients policy, the sending limits, the quota, the login IPs) are shown with the value that
applies and where it comes from (this scope, the domain, the server settings or the default),
and each can be set or cleared here. Reads and writes are the API's own route functions
(``GET``/``PUT /v1/domains/{domain}/settings``, ``/v1/accounts/{address}/settings``), so
confinement is the API's (R-ADM-1: a domain admin reaches only its own domain's accounts, and
may not change a domain's own overrides, which bind it), the write is a PUT of the whole scope
with the ETag the page showed (R-ADM-2: a change made meanwhile is a 412, never overwritten),
and the audit record is the API's (R-ADM-5).
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from rempart.admin_api import routes_directory
from rempart.admin_api.backend import ProblemError
from rempart.admin_api.console.calls import call
from rempart.admin_api.console.forms import Form
from rempart.admin_api.console.routes_admin import admin_visit, bounded
from rempart.admin_api.console.settings_form import SettingField, parse_field, section_fields
from rempart.admin_api.console.web import ConsoleRoute, Failure, Visit, done, failure_of, page, posted
from rempart.admin_api.models import MAX_ADDRESS, MAX_DOMAIN, FieldError, ScopedSettingsOut
from rempart.admin_api.redaction import Redactor
from rempart.admin_api.settings_bodies import ScopedSettingsPatch
from rempart.common.config import SCOPED_FIELDS, MailSettings, deep_merge

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)
# Shown to a domain admin instead of a server-wide address that may be another tenant's (R-ADM-1).
SERVER_WIDE = "set server-wide"
ADDRESS_FIELDS = frozenset({"recipients.catch_all_address"})


def scoped_fields() -> list[SettingField]:
    """The fields a domain or an account may override, in the settings models' order."""
    return [field for section, names in SCOPED_FIELDS.items() for field in section_fields(section)
            if field.name in names]


FIELDS = {field.key: field for field in scoped_fields()}


@dataclass(frozen=True)
class Row:
    """One overridable setting as the page shows it."""

    field: SettingField
    effective: str  # the value that applies, as the form would hold it
    source: str  # where it comes from, in words
    here: bool  # overridden at this scope
    value: str  # the override at this scope ("" when none)


def rows(layers: list[tuple[str, dict[str, Any]]], hide_server_addresses: bool) -> list[Row]:
    """``layers``: (what the page calls it, its stored overrides), outermost first, this scope
    last; the value that applies is the model's reading of them merged over the defaults."""
    merged: dict[str, Any] = MailSettings().model_dump(mode="json")
    for _, doc in layers:
        merged = deep_merge(merged, doc)
    applied = MailSettings.model_validate(merged).model_dump(mode="json")
    here = layers[-1][1]
    out = []
    for field in FIELDS.values():
        source = "default"
        for name, doc in layers:
            if field.name in (doc.get(field.section) or {}):
                source = name
        effective = field.shown(applied[field.section][field.name])
        if hide_server_addresses and source == "server settings" and field.key in ADDRESS_FIELDS:
            effective = SERVER_WIDE
        set_here = field.name in (here.get(field.section) or {})
        out.append(Row(field, effective, source, set_here,
                       field.shown(here[field.section][field.name]) if set_here else ""))
    return out


def changed(current: dict[str, Any], form: Form) -> dict[str, Any]:
    """The scope's overrides after the form's set or clear of one field."""
    field = FIELDS.get(form.get("key"))
    if field is None:
        raise ProblemError(422, "Not a setting this scope may override")
    doc = copy.deepcopy(current)
    section = doc.setdefault(field.section, {})
    if form.get("action") == "clear":
        section.pop(field.name, None)
    else:
        try:
            section[field.name] = parse_field(field, form)
        except ValueError:
            raise ProblemError(422, "Invalid settings", [FieldError(field=field.key, detail="not readable")]) from None
    return {name: fields for name, fields in doc.items() if fields}


@dataclass(frozen=True)
class Scope:
    """What differs between a domain's page and an account's."""

    kind: str  # "domain" or "account"
    name: str
    title: str
    back: str  # the page of the domain or account
    action: str  # where the forms post
    layers: list[tuple[str, dict[str, Any]]]  # outer scopes, outermost first
    may_write: bool


Reader = Callable[[Response], Awaitable[ScopedSettingsOut]]
Writer = Callable[[Any, Response, str | None], Awaitable[ScopedSettingsOut]]


async def _show(visit: Visit, scope: Scope, read: Reader, failure: Failure | None = None) -> Response:
    response = Response()
    stored = await read(response)
    table = rows([*scope.layers, (f"this {scope.kind}", stored.settings)], not visit.is_superadmin)
    return page(visit.request, "overrides.html", failure.status if failure else 200, visit, scope=scope, rows=table,
                etag=response.headers.get("etag", ""), failure=failure)


async def _save(visit: Visit, form: Form, scope: Scope, read: Reader, write: Writer) -> Response:
    try:
        current = await read(Response())
        doc = changed(current.settings, form)
        body = ScopedSettingsPatch.model_validate(doc)
        await write(body, Response(), form.get("etag") or None)
    except (ValidationError, ProblemError) as exc:
        failure = failure_of(exc, frozenset({403, 404, 412, 422}))  # 404: a catch-all elsewhere
        if failure is None:
            raise
        return await _show(visit, scope, read, failure)
    return done(scope.action, "override_cleared" if form.get("action") == "clear" else "override_saved")


def _redactor(request: Request) -> Redactor:
    redactor: Redactor = request.app.state.redactor
    return redactor


ScopedRoute = Callable[..., Awaitable[ScopedSettingsOut]]


def _settings_calls(visit: Visit, get_settings: ScopedRoute, put_settings: ScopedRoute,
                    **target: str) -> tuple[Reader, Writer]:
    """Read and write one scope's overrides through its API routes, as the visitor: ``target``
    is the routes' path parameter (``domain=`` or ``address=``)."""
    request = visit.request
    principal, backend, redactor = visit.principal, visit.backend, _redactor(request)

    async def read(response: Response) -> ScopedSettingsOut:
        return await call(get_settings, response=response, principal=principal, backend=backend,
                          redactor=redactor, **target)

    async def write(body: Any, response: Response, if_match: str | None) -> ScopedSettingsOut:
        return await call(put_settings, body=body, request=request, response=response, principal=principal,
                          backend=backend, redactor=redactor, if_match=if_match, **target)

    return read, write


# A domain ---------------------------------------------------------------------------------------
async def _domain(visit: Visit, domain: str) -> tuple[Scope, Reader, Writer]:
    domain = bounded(domain, MAX_DOMAIN, "Domain")
    read, write = _settings_calls(visit, routes_directory.get_domain_settings, routes_directory.put_domain_settings,
                                  domain=domain)
    name = (await read(Response())).scope.partition(":")[2]  # confined: a 404 for another tenant's
    layers = [("server settings", await visit.backend.store.get_doc("server"))]
    scope = Scope("domain", name, f"Settings of {name}", f"/admin/domains/{quote(name)}",
                  f"/admin/domains/{quote(name)}/settings", layers, visit.is_superadmin)
    return scope, read, write


@router.get("/admin/domains/{domain}/settings")
async def domain_overrides(request: Request, domain: str) -> Response:
    visit = await admin_visit(request)
    scope, read, _ = await _domain(visit, domain)
    return await _show(visit, scope, read)


@router.post("/admin/domains/{domain}/settings")
async def save_domain_override(request: Request, domain: str) -> Response:
    visit = await admin_visit(request)
    form = await posted(visit)
    scope, read, write = await _domain(visit, domain)
    return await _save(visit, form, scope, read, write)


# An account ------------------------------------------------------------------------------------
async def _account(visit: Visit, address: str) -> tuple[Scope, Reader, Writer]:
    address = bounded(address, MAX_ADDRESS, "Account")
    read, write = _settings_calls(visit, routes_directory.get_account_settings,
                                  routes_directory.put_account_settings, address=address)
    backend = visit.backend
    name = (await read(Response())).scope.partition(":")[2]  # confined: a 404 for another tenant's
    domain = name.rpartition("@")[2]
    layers = [("server settings", await backend.store.get_doc("server")),
              (f"the domain {domain}", await backend.store.get_doc(f"domain:{domain}"))]
    scope = Scope("account", name, f"Settings of {name}", f"/admin/accounts/{quote(name, safe='@')}",
                  f"/admin/accounts/{quote(name, safe='@')}/settings", layers, True)
    return scope, read, write


@router.get("/admin/accounts/{address}/settings")
async def account_overrides(request: Request, address: str) -> Response:
    visit = await admin_visit(request)
    scope, read, _ = await _account(visit, address)
    return await _show(visit, scope, read)


@router.post("/admin/accounts/{address}/settings")
async def save_account_override(request: Request, address: str) -> Response:
    visit = await admin_visit(request)
    form = await posted(visit)
    scope, read, write = await _account(visit, address)
    return await _save(visit, form, scope, read, write)
