"""What every account does for itself: password (R-PWD-3), two-step verification (R-2FA-1),
app passwords (R-2FA-2), recent logins, and signing out everywhere.

Each action is the API's self-service route function (``/v1/me/...``), called with the body
model the API would build, so the auth service, the password policy (R-PWD-1) and the events
are the same. Secrets the API shows once (TOTP seed, recovery codes, app password) appear once
here too: in the answer to the POST that made them, never behind a GET.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

import segno
from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from markupsafe import Markup
from pydantic import ValidationError

from rempart.admin_api import routes_auth, routes_events, routes_settings, routes_twofactor
from rempart.admin_api.backend import ProblemError, end_sessions, not_found, record_change
from rempart.admin_api.console.calls import call
from rempart.admin_api.console.web import (
    ConsoleRoute,
    Failure,
    Visit,
    done,
    failure_of,
    page,
    positive_int,
    posted,
    security_of,
    settings_of,
    signed_in,
)
from rempart.admin_api.models import MAX_APP_NAME, AppPasswordNew, PasswordChange, TotpCode
from rempart.admin_api.redaction import Redactor
from rempart.common.config import PasswordSettings

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)

# The auth service does not forbid user or domain names shorter than this (too common).
MIN_NAME_PART = 3
PASSWORD_FIELDS = {"old_password": "Current password", "new_password": "New password", "confirm": "Confirmation"}
LOGIN_EVENTS = {
    "login_ok": "signed in",
    "login_failed": "refused",
    "account_locked": "account locked",
    "account_unlocked": "account unlocked",
}
REASONS = {
    "bad_password": "wrong password",
    "bad_app_password": "wrong app password",
    "no_password": "no password set",
    "totp_missing": "password right, code not given yet",
    "totp_wrong": "wrong code",
    "locked": "account locked",
    "slowed_down": "too many failures, slowed down",
    "ip_restricted": "not allowed from this IP",
    "account_disabled": "account disabled",
    "too_many_failures": "too many failures",
    "lock_expired": "lock expired",
    "helpdesk": "by the helpdesk",
}
LOGINS_SHOWN = 200


@dataclass(frozen=True)
class PasswordRule:
    """One rule of the policy as the page shows it; ``check`` and ``value`` let console.js tick
    it while the user types (a hint only: the auth service decides)."""

    check: str
    text: str
    value: str = ""


def password_rules(policy: PasswordSettings, address: str) -> list[PasswordRule]:
    """R-PWD-1 in the words the auth service uses when it refuses a password."""
    rules = [PasswordRule("length", f"At least {policy.min_length} characters long", str(policy.min_length))]
    if policy.require_digit:
        rules.append(PasswordRule("digit", "At least one digit"))
    if policy.require_non_alnum:
        rules.append(PasswordRule("symbol", "At least one character that is not a letter or a digit"))
    if policy.require_upper:
        rules.append(PasswordRule("upper", "At least one upper-case letter"))
    if policy.require_lower:
        rules.append(PasswordRule("lower", "At least one lower-case letter"))
    if policy.forbid_user_or_domain:
        local, _, domain = address.lower().rpartition("@")
        labels = [label for label in domain.split(".")[:-1] if len(label) >= MIN_NAME_PART]
        rules.append(PasswordRule("absent", "Does not contain your user name",
                                  local if len(local) >= MIN_NAME_PART else ""))
        rules.append(PasswordRule("absent", "Does not contain the domain name", ",".join([domain, *labels])))
    if policy.min_strength > 0:
        rules.append(PasswordRule("server", f"Hard to guess (strength at least {policy.min_strength} of 4; "
                                            "checked when you save)"))
    return rules


# Overview -------------------------------------------------------------------------------------
@router.get("/account")
async def account_page(request: Request) -> Response:
    visit = await signed_in(request)
    me = await call(routes_auth.get_me, principal=visit.principal, backend=visit.backend)
    totp = await call(routes_twofactor.get_totp, principal=visit.principal, backend=visit.backend)
    return page(request, "account.html", visit=visit, account=me, totp=totp)


@router.post("/account/sessions/end")
async def end_my_sessions(request: Request) -> Response:
    """Sign out everywhere: every session of this account, this one included (the helpdesk's
    R-ADM-4 action, on oneself). App passwords are not sessions and keep working."""
    visit = await signed_in(request)
    await posted(visit)
    address = visit.principal.address
    await visit.backend.audit.ready()  # R-ADM-5: no change that cannot be audited (as call() does)
    await end_sessions(visit.backend, address)
    await record_change(visit.backend, request, address, "sessions_ended", address, f"account:{address}")
    security = security_of(request)
    redirect = RedirectResponse("/login?notice=logged_out", status_code=303)
    security.clear_cookie(redirect, security.session_cookie)
    return redirect


# Password (R-PWD-1, R-PWD-3) --------------------------------------------------------------------
async def _password_page(visit: Visit, failure: Failure | None = None) -> Response:
    policy = routes_settings.effective(await visit.backend.store.get_doc("server")).password
    return page(visit.request, "password.html", failure.status if failure else 200, visit,
                rules=password_rules(policy, visit.principal.address), failure=failure, labels=PASSWORD_FIELDS)


@router.get("/account/password")
async def password_page(request: Request) -> Response:
    return await _password_page(await signed_in(request))


@router.post("/account/password")
async def change_password(request: Request) -> Response:
    visit = await signed_in(request)
    form = await posted(visit)
    try:
        body = PasswordChange(old_password=form.get("old_password"), new_password=form.get("new_password"),
                              confirm=form.get("confirm"))
        await call(routes_auth.change_my_password, body=body, request=request, principal=visit.principal,
                   backend=visit.backend)
    except (ValidationError, ProblemError) as exc:
        failure = failure_of(exc)
        if failure is None:
            raise
        return await _password_page(visit, failure)
    return done("/account", "password_changed")


# Two-step verification (R-2FA-1) ----------------------------------------------------------------
def qr_svg(uri: str) -> Markup:
    """The otpauth URI as an inline SVG QR code, drawn here (no image request, no script)."""
    svg = segno.make(uri, error="m").svg_inline(scale=5, border=4, dark="#000", light="#fff", svgclass="qr",
                                                title="QR code of your two-step verification key")
    return Markup(svg)  # noqa: S704 - segno's output: paths and numbers, no user text


async def _twofactor_page(visit: Visit, failure: Failure | None = None) -> Response:
    totp = await call(routes_twofactor.get_totp, principal=visit.principal, backend=visit.backend)
    return page(visit.request, "twofactor.html", failure.status if failure else 200, visit, totp=totp,
                failure=failure)


@router.get("/account/2fa")
async def twofactor_page(request: Request) -> Response:
    return await _twofactor_page(await signed_in(request, enrolling=True))


@router.post("/account/2fa/enrol")
async def enrol(request: Request) -> Response:
    visit = await signed_in(request, enrolling=True)
    await posted(visit)
    try:
        enrolment = await call(routes_twofactor.enrol_totp, request=request, principal=visit.principal,
                               backend=visit.backend)
    except ProblemError as exc:
        failure = failure_of(exc)
        if failure is None:
            raise
        return await _twofactor_page(visit, failure)
    return page(request, "twofactor_enrol.html", visit=visit, secret=enrolment.secret,
                otpauth_uri=enrolment.otpauth_uri, qr=qr_svg(enrolment.otpauth_uri), failure=None)


@router.post("/account/2fa/confirm")
async def confirm(request: Request) -> Response:
    visit = await signed_in(request, enrolling=True)
    form = await posted(visit)
    try:
        body = TotpCode(code=form.get("code").strip())
        codes = await call(routes_twofactor.confirm_totp, body=body, request=request, principal=visit.principal,
                           backend=visit.backend)
    except (ValidationError, ProblemError) as exc:
        if failure_of(exc) is None:
            raise
        # The secret was shown once; whoever scanned it can still confirm, anyone else starts again.
        return page(request, "twofactor_enrol.html", 422, visit, secret="", otpauth_uri="", qr="",
                    failure=Failure(422, routes_twofactor.TOTP_CODE_WRONG, []))
    download = "data:text/plain;charset=utf-8," + quote("\n".join(codes.recovery_codes) + "\n")
    return page(request, "recovery_codes.html", visit=visit, codes=codes.recovery_codes, download=download)


@router.post("/account/2fa/disable")
async def disable(request: Request) -> Response:
    visit = await signed_in(request)
    form = await posted(visit)
    try:
        body = TotpCode(code=form.get("code").strip())
        await call(routes_twofactor.disable_totp, body=body, request=request, principal=visit.principal,
                   backend=visit.backend)
    except (ValidationError, ProblemError) as exc:
        if failure_of(exc) is None:
            raise
        return await _twofactor_page(visit, Failure(422, routes_twofactor.TOTP_CODE_WRONG, []))
    return done("/account/2fa", "totp_disabled")


# App passwords (R-2FA-2) ------------------------------------------------------------------------
@dataclass(frozen=True)
class MailClientSettings:
    """What to paste into a mail client next to a new app password."""

    host: str
    username: str
    imap_port: int
    submission_port: int
    smtps_port: int


async def _app_passwords_page(visit: Visit, failure: Failure | None = None) -> Response:
    listing = await call(routes_twofactor.list_app_passwords, principal=visit.principal, backend=visit.backend)
    return page(visit.request, "app_passwords.html", failure.status if failure else 200, visit,
                app_passwords=listing.app_passwords, failure=failure, labels={"name": "Name"}, max_name=MAX_APP_NAME)


@router.get("/account/app-passwords")
async def app_passwords_page(request: Request) -> Response:
    return await _app_passwords_page(await signed_in(request))


@router.post("/account/app-passwords")
async def create_app_password(request: Request) -> Response:
    visit = await signed_in(request)
    form = await posted(visit)
    try:
        body = AppPasswordNew(name=form.get("name").strip())
        created = await call(routes_twofactor.create_app_password, body=body, request=request,
                             principal=visit.principal, backend=visit.backend)
    except (ValidationError, ProblemError) as exc:
        failure = failure_of(exc)
        if failure is None:
            raise
        return await _app_passwords_page(visit, failure)
    settings = settings_of(request)
    client = MailClientSettings(host=settings.hostname, username=visit.principal.address,
                                imap_port=settings.public_imaps_port, submission_port=settings.public_submission_port,
                                smtps_port=settings.public_smtps_port)
    return page(request, "app_password_created.html", visit=visit, created=created, client=client)


@router.post("/account/app-passwords/revoke")
async def revoke_app_password(request: Request) -> Response:
    visit = await signed_in(request)
    form = await posted(visit)
    name = form.get("name")
    try:
        if not 0 < len(name) <= MAX_APP_NAME:
            raise not_found("App password")
        await call(routes_twofactor.revoke_app_password, name=name, request=request, principal=visit.principal,
                   backend=visit.backend)
    except ProblemError as exc:
        failure = failure_of(exc)
        if failure is None:
            raise
        return await _app_passwords_page(visit, failure)
    return done("/account/app-passwords", "app_password_revoked")


# Recent logins ----------------------------------------------------------------------------------
@router.get("/account/logins")
async def logins_page(request: Request) -> Response:
    """The auth service's login events about this account, as ``GET /v1/events`` reads them.

    ``list_events`` is called directly, not through :func:`call`: the API keeps the whole event
    log to superadmins, and here the filter is pinned to the caller's own account."""
    visit = await signed_in(request)
    redactor: Redactor = request.app.state.redactor
    listing = await routes_events.list_events(
        principal=visit.principal, backend=visit.backend, redactor=redactor, area="auth", what=None, client_ip=None,
        account=visit.principal.address, limit=LOGINS_SHOWN, before=positive_int(request.query_params.get("before")),
    )
    logins = [event for event in listing.events if event.what in LOGIN_EVENTS]
    return page(request, "logins.html", visit=visit, logins=logins, results=LOGIN_EVENTS, reasons=REASONS,
                next_before=listing.next_before)
