"""Signing in and out (R-LOG-4, R-LOG-5, R-2FA-1), through the API's own login and logout.

Two steps when the account has two-step verification: the password first; when the auth service
answers that a code is missing, the code. The auth service checks both in one call (a wrong code
counts towards the lockout like a wrong password), so the password waits for the second step in
a sealed cookie of five minutes (:mod:`rempart.admin_api.console.security`). A failed login says
the same thing whatever went wrong (R-LOG-4): it is the API's answer.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import ValidationError

from rempart.admin_api import routes_auth
from rempart.admin_api.backend import ProblemError
from rempart.admin_api.console.calls import call
from rempart.admin_api.console.forms import Form, read_form
from rempart.admin_api.console.security import PENDING_LOGIN_SECONDS
from rempart.admin_api.console.web import (
    ENROLMENT_PAGE,
    FORM_REFUSED,
    ConsoleRoute,
    Redirect,
    backend_of,
    current_visit,
    page,
    posted,
    security_of,
)
from rempart.admin_api.models import LoginRequest

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)
CODE_WRONG = "The code is not valid (wrong, expired or already used). Wait for the next one and try again."
LOGIN_EXPIRED = "Your sign-in took too long. Enter your password again."
INCOMPLETE = "Enter your email address and your password."


@router.get("/")
async def home(request: Request) -> Response:
    raise Redirect("/account" if await current_visit(request) else "/login")


def login_form(request: Request, status: int = 200, error: str = "", login: str = "",
               template: str = "login.html") -> HTMLResponse:
    """The login (or code) form, bound to this browser's login nonce (login CSRF)."""
    security = security_of(request)
    nonce = security.login_nonce(request) or security.new_nonce()
    response = page(request, template, status=status, login_csrf=security.login_csrf(nonce), error=error,
                    login=login)
    security.set_cookie(response, security.login_cookie, nonce)
    return response


async def _login_post(request: Request) -> Form:
    security = security_of(request)
    form = await read_form(request)
    nonce = security.login_nonce(request)
    if not nonce or not security.same(security.login_csrf(nonce), form.get("csrf")):
        raise ProblemError(403, FORM_REFUSED)
    return form


@router.get("/login")
async def login_page(request: Request) -> Response:
    if await current_visit(request):
        raise Redirect("/account")
    return login_form(request)


@router.post("/login")
async def login_password(request: Request) -> Response:
    form = await _login_post(request)
    return await _attempt(request, form.get("email").strip(), form.get("password"), "")


@router.post("/login/code")
async def login_code(request: Request) -> Response:
    form = await _login_post(request)
    security = security_of(request)
    pending = security.open_pending(request.cookies.get(security.pending_cookie, ""))
    if pending is None:
        return login_form(request, 401, LOGIN_EXPIRED)
    login, password = pending
    code = form.get("code").strip()
    if not code:
        return login_form(request, 422, CODE_WRONG, login, "login_code.html")
    return await _attempt(request, login, password, code)


async def _attempt(request: Request, login: str, password: str, code: str) -> Response:
    security = security_of(request)
    try:
        body = LoginRequest(email=login, password=password, totp_code=code or None)
    except ValidationError:
        return login_form(request, 422, INCOMPLETE, login)
    try:
        session = await call(routes_auth.login, body=body, request=request, backend=backend_of(request))
    except ProblemError as exc:
        if exc.status != 401:
            raise
        if exc.detail == routes_auth.SECOND_FACTOR:
            response = login_form(request, 401 if code else 200, CODE_WRONG if code else "", login,
                                  "login_code.html")
            if not code:
                sealed = security.seal_pending(login, password)
                security.set_cookie(response, security.pending_cookie, sealed, max_age=PENDING_LOGIN_SECONDS)
            return response
        response = login_form(request, 401, exc.detail, login)
        security.clear_cookie(response, security.pending_cookie)
        return response
    target = ENROLMENT_PAGE if session.second_factor_enrolment_required else "/account"
    redirect = RedirectResponse(target, status_code=303)
    security.set_cookie(redirect, security.session_cookie, session.token, max_age=session.expires_in)
    security.clear_cookie(redirect, security.pending_cookie)
    security.clear_cookie(redirect, security.login_cookie)
    return redirect


@router.post("/logout")
async def logout(request: Request) -> Response:
    security = security_of(request)
    visit = await current_visit(request)
    if visit is not None:
        await posted(visit)
        await call(routes_auth.logout, principal=visit.principal, backend=visit.backend)
    redirect = RedirectResponse("/login?notice=logged_out", status_code=303)
    security.clear_cookie(redirect, security.session_cookie)
    return redirect
