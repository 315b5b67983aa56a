"""The console's request plumbing: who is visiting, page rendering, redirects, errors.

Pages are Jinja2 templates with autoescaping on: every string a user or an administrator typed
(a display name of ``<script>``) reaches the page as text. Handlers raise :class:`Redirect` or
the API's :class:`ProblemError`; :class:`ConsoleRoute` turns them into a redirect or an HTML
error page, and a lost dependency (Redis, NATS, the auth service) into a 503 page.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import redis.asyncio as aioredis
from fastapi import Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from nats.errors import Error as NatsError
from pydantic import ValidationError

from rempart.admin_api.backend import Backend, Principal, ProblemError, session_principal
from rempart.admin_api.console.forms import Form, read_form
from rempart.admin_api.console.security import ConsoleSecurity
from rempart.admin_api.models import FieldError
from rempart.admin_api.settings import AdminApiSettings

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
UNAVAILABLE = "A backing service is unavailable. Try again in a moment."
FORM_REFUSED = "This form has expired or did not come from this console. Reload the page and try again."
# Pages a session that must first enrol TOTP (an admin, R-2FA-1) may reach.
ENROLMENT_PAGE = "/account/2fa"

# What a redirect after a successful POST says (a key in the URL, never user text).
NOTICES = {
    "logged_out": "You are signed out.",
    "password_changed": "Your password is changed. Your other sessions are signed out.",
    "totp_disabled": "Two-step verification is off.",
    "app_password_revoked": "The app password is revoked.",
    "domain_created": "The domain is created.",
    "domain_updated": "The domain is saved.",
    "domain_deleted": "The domain is deleted.",
    "account_created": "The account is created.",
    "account_updated": "The account is saved.",
    "account_deleted": "The account is deleted.",
    "password_reset": "The password is reset and the account's sessions are ended.",
    "unlocked": "The account was locked and is now unlocked.",
    "not_locked": "The account was not locked; its recent failures are forgotten.",
    "totp_reset": "Two-step verification is off for this account and its sessions are ended.",
    "totp_was_off": "Two-step verification was not on; the account's sessions are ended.",
    "app_passwords_revoked": "The account's app passwords are revoked.",
    "sessions_ended": "The account's sessions are ended.",
    "alias_created": "The alias is created.",
    "alias_updated": "The alias is saved.",
    "alias_deleted": "The alias is deleted.",
    "unblocked": "The IP is unblocked.",
    "settings_saved": "The settings are saved; every replica applies them within seconds.",
    "srs_rotated": "A new SRS key signs from now on.",
    "override_saved": "The override is saved; every replica applies it within seconds.",
    "override_cleared": "The override is cleared: the value from the wider scope applies again.",
}


class Redirect(Exception):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


def _when(value: object) -> str:
    """An RFC 3339 time (or a datetime, or Unix seconds) as people read it, in UTC."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = dt.datetime.fromtimestamp(value, dt.UTC) if value > 0 else None
    elif isinstance(value, str) and value:
        try:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return str(value)
    if not isinstance(value, dt.datetime):
        return ""
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _segment(value: object) -> str:
    """A path segment: an address, a domain, an IP or an app password name, percent-encoded."""
    return quote(str(value), safe="@")


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(("html",), default_for_string=True, default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["segment"] = _segment
    return env


JINJA = _environment()


@dataclass(frozen=True)
class Visit:
    """One signed-in request: the caller as the API sees it and the CSRF token of its session."""

    request: Request
    backend: Backend
    principal: Principal
    csrf: str

    @property
    def is_admin(self) -> bool:
        return self.principal.role in ("superadmin", "domain_admin")

    @property
    def is_superadmin(self) -> bool:
        return self.principal.is_superadmin


def backend_of(request: Request) -> Backend:
    backend: Backend = request.app.state.backend
    return backend


def security_of(request: Request) -> ConsoleSecurity:
    security: ConsoleSecurity = request.app.state.console
    return security


def settings_of(request: Request) -> AdminApiSettings:
    settings: AdminApiSettings = request.app.state.settings
    return settings


async def current_visit(request: Request) -> Visit | None:
    security = security_of(request)
    token = security.session_token(request)
    if not token:
        return None
    backend = backend_of(request)
    principal = await session_principal(backend, token)
    if principal is None:
        return None
    return Visit(request, backend, principal, security.session_csrf(token))


async def signed_in(request: Request, enrolling: bool = False) -> Visit:
    """The visit of a signed-in caller, or a redirect to the login page (R-LOG-5). A session that
    must enrol TOTP first reaches only the enrolment page (``enrolling``) and logout."""
    visit = await current_visit(request)
    if visit is None:
        raise Redirect("/login")
    if visit.principal.restricted and not enrolling:
        raise Redirect(ENROLMENT_PAGE)
    return visit


async def posted(visit: Visit) -> Form:
    """The form of a signed-in POST, refused (403) unless it carries this session's CSRF token."""
    form = await read_form(visit.request)
    if not ConsoleSecurity.same(visit.csrf, form.get("csrf")):
        raise ProblemError(403, FORM_REFUSED)
    return form


def page(request: Request, template: str, status: int = 200, visit: Visit | None = None,
         **context: Any) -> HTMLResponse:
    notice = NOTICES.get(request.query_params.get("notice", ""), "")
    html = JINJA.get_template(template).render(
        visit=visit, me=visit.principal if visit else None, csrf=visit.csrf if visit else "", notice=notice,
        path=request.url.path, **context,
    )
    # Pages show secrets once (TOTP seed, app passwords, recovery codes): never cache any of them.
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})


def done(url: str, notice: str) -> RedirectResponse:
    """After a successful POST: see the result with a GET (the browser's back button re-posts nothing)."""
    assert notice in NOTICES, notice
    path, hash_mark, fragment = url.partition("#")
    separator = "&" if "?" in path else "?"
    return RedirectResponse(f"{path}{separator}notice={notice}{hash_mark}{fragment}", status_code=303)


def field_errors(exc: ValidationError) -> list[FieldError]:
    """A body model refused what the form said: the same field errors the API would answer."""
    # Imported here: app.py mounts the console, so the console cannot import app.py first.
    from rempart.admin_api.app import field_error

    return [field_error({**err, "loc": ("body", *err.get("loc", ()))}) for err in exc.errors()][:50]


@dataclass(frozen=True)
class Failure:
    """A refused form, shown above it: the API's problem detail and the fields it names."""

    status: int
    detail: str
    errors: list[FieldError]


# What a form shows next to itself; anything else (401, 503) is the route class's business.
FORM_STATUSES = frozenset({403, 404, 409, 412, 415, 422})


def failure_of(exc: Exception, statuses: frozenset[int] = FORM_STATUSES) -> Failure | None:
    if isinstance(exc, ValidationError):
        return Failure(422, "Some fields are not valid", field_errors(exc))
    if isinstance(exc, ProblemError) and exc.status in statuses:
        return Failure(exc.status, exc.detail, exc.errors)
    return None


def error_page(request: Request, status: int, detail: str, headers: dict[str, str] | None = None) -> HTMLResponse:
    response = page(request, "error.html", status=status, status_code=status, detail=detail)
    for name, value in (headers or {}).items():
        if name.lower() != "www-authenticate":
            response.headers[name] = value
    return response


Endpoint = Callable[[Request], Coroutine[Any, Any, Response]]


class ConsoleRoute(APIRoute):
    """Console pages answer in HTML: a redirect, an error page, or a 503 page."""

    def get_route_handler(self) -> Endpoint:
        handler = super().get_route_handler()

        async def console_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except Redirect as redirect:
                return RedirectResponse(redirect.url, status_code=303)
            except ProblemError as exc:
                if exc.status == 401:
                    return RedirectResponse("/login", status_code=303)
                return error_page(request, exc.status, exc.detail, exc.headers)
            except (aioredis.RedisError, grpc.aio.AioRpcError, NatsError, ConnectionError, TimeoutError) as exc:
                log.warning("console: dependency failure: %s", type(exc).__name__)
                return error_page(request, 503, UNAVAILABLE, {"Retry-After": "5"})

        return console_handler


def positive_int(raw: str | None) -> int | None:
    """A query parameter that must be a positive integer (a page cursor); anything else: none."""
    if raw is None or not raw.isdigit() or len(raw) > 18:
        return None
    value = int(raw)
    return value if value > 0 else None
