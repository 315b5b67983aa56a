"""The web console over HTTP (issue 14): sign-in, self-service, and what keeps it safe in a
browser (CSRF, cookies, headers, escaping, body limits), with the real app, Redis, NATS and a
gRPC auth service. Administration pages are in test_console_admin.py."""

from __future__ import annotations

import asyncio
import re

import pytest
from fastapi import Response
from fastapi.routing import APIRoute
from pydantic import ValidationError

from rempart.admin_api import routes_auth, routes_directory, routes_events, routes_twofactor
from rempart.admin_api.backend import require_admin, require_superadmin
from rempart.admin_api.console import routes_account, routes_admin, routes_login, routes_operations
from rempart.admin_api.console.calls import declared_role_check
from rempart.admin_api.console.security import CONTENT_SECURITY_POLICY, ConsoleSecurity
from rempart.admin_api.settings import AdminApiSettings
from rempart.common.events import EVENTS_STREAM

from .conftest import ADMIN, ADMIN_PASSWORD, TOO_SHORT, Harness
from .console_support import LOGIN_CODE, Browser, auth_server, browsers, new_browser, session_cookie

__all__ = ["auth_server", "browsers"]  # fixtures used by name

GOOD_PASSWORD = "Corr3ct-Horse-Battery!"
NEW_PASSWORD = "Br4nd-New-Pass-Word!"
IVY = "ivy@example.org"
LOGIN_FAILED = "Unknown user or incorrect password"
CONSOLE_ROUTES = [route for module in (routes_login, routes_account, routes_admin, routes_operations)
                  for route in module.router.routes if isinstance(route, APIRoute)]


def console_paths(method: str, templated: bool = True) -> list[str]:
    return [route.path for route in CONSOLE_ROUTES if method in route.methods and (templated or "{" not in route.path)]


async def _ivy(harness: Harness, made: list[Browser]) -> Browser:
    await harness.add_account(IVY, GOOD_PASSWORD)
    browser = new_browser(harness, made)
    reply = await browser.login(IVY, GOOD_PASSWORD)
    assert reply.status_code == 303 and reply.headers["location"] == "/account", reply.text
    return browser


# Signing in and out (R-LOG-4, R-LOG-5) ------------------------------------------------------------
async def test_r_log_5_every_console_page_needs_a_session(harness: Harness, browsers: list[Browser]) -> None:
    browser = new_browser(harness, browsers)
    pages = console_paths("GET")
    assert len(pages) >= 15
    for path in pages:
        if path in ("/login",):
            continue
        concrete = re.sub(r"\{[^}]+\}", "x@example.org", path)
        reply = await browser.get(concrete)
        assert reply.status_code == 303 and reply.headers["location"] == "/login", (path, reply.status_code)
    # A made-up session cookie is no session either.
    browser.http.cookies.set("__Host-rempart-session", "not-a-session", domain="console.test")
    assert (await browser.get("/account")).headers["location"] == "/login"


async def test_r_log_5_login_sets_a_strict_session_cookie(harness: Harness, browsers: list[Browser]) -> None:
    await harness.add_account(IVY, GOOD_PASSWORD)
    browser = new_browser(harness, browsers)
    first = await browser.get("/login")
    assert first.status_code == 200 and 'name="csrf"' in first.text
    nonce_cookie = first.headers["set-cookie"]
    assert nonce_cookie.startswith("__Host-rempart-login=")
    reply = await browser.post("/login", {"email": IVY, "password": GOOD_PASSWORD})
    assert reply.status_code == 303 and reply.headers["location"] == "/account"
    session = next(c for c in reply.headers.get_list("set-cookie") if c.startswith("__Host-rempart-session="))
    flags = {part.strip().lower() for part in session.split(";")[1:]}
    assert {"httponly", "secure", "samesite=strict", "path=/"} <= flags, session
    assert not any(f.startswith("domain=") for f in flags)
    token = session_cookie(browser)
    assert token and len(token) >= 40
    # It is an API session like any other: the same store, the same account.
    me = await harness.http.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200 and me.json()["address"] == IVY
    page = await browser.get("/account")
    assert page.status_code == 200 and IVY in page.text
    assert (await browser.get("/login")).headers["location"] == "/account"
    request = harness.auth.requests[-1]
    assert (request.protocol, request.mechanism, request.client_ip) == ("admin", "password", "127.0.0.1")


async def test_r_log_4_a_failed_login_says_the_same_whoever(harness: Harness, browsers: list[Browser]) -> None:
    await harness.add_account(IVY, GOOD_PASSWORD)
    harness.auth.locked.add("locked@example.org")
    await harness.add_account("locked@example.org", GOOD_PASSWORD)
    answers = []
    for email, password in ((IVY, "Wrong-Password-1"), ("nobody@example.org", "Wrong-Password-1"),
                            ("locked@example.org", GOOD_PASSWORD)):
        browser = new_browser(harness, browsers)
        reply = await browser.login(email, password)
        assert reply.status_code == 401 and LOGIN_FAILED in reply.text
        assert session_cookie(browser) is None
        answers.append(reply.text.replace(email, "EMAIL").replace(browser.csrf, "CSRF"))
    assert answers[0] == answers[1] == answers[2]


async def test_r_log_5_logout_ends_the_session(harness: Harness, browsers: list[Browser]) -> None:
    browser = await _ivy(harness, browsers)
    token = session_cookie(browser)
    reply = await browser.post("/logout")
    assert reply.status_code == 303 and reply.headers["location"] == "/login?notice=logged_out"
    assert session_cookie(browser) is None
    assert (await harness.http.get("/v1/me", headers={"Authorization": f"Bearer {token}"})).status_code == 401
    assert "You are signed out." in (await browser.get("/login?notice=logged_out")).text


async def test_r_2fa_1_login_asks_for_the_code_second(harness: Harness, browsers: list[Browser]) -> None:
    await harness.add_account(IVY, GOOD_PASSWORD)
    harness.auth.totp_on.add(IVY)
    browser = new_browser(harness, browsers)
    await browser.get("/login")
    step = await browser.post("/login", {"email": IVY, "password": GOOD_PASSWORD})
    assert step.status_code == 200 and 'action="/login/code"' in step.text and session_cookie(browser) is None
    pending = browser.cookie("__Host-rempart-pending")
    assert pending and GOOD_PASSWORD not in pending  # sealed, never the password in clear
    wrong = await browser.post("/login/code", {"code": "000000"})
    assert wrong.status_code == 401 and "The code is not valid" in wrong.text and session_cookie(browser) is None
    right = await browser.post("/login/code", {"code": LOGIN_CODE})
    assert right.status_code == 303 and right.headers["location"] == "/account" and session_cookie(browser)
    assert browser.cookie("__Host-rempart-pending") is None
    assert [r.totp_code for r in harness.auth.requests[-3:]] == ["", "000000", LOGIN_CODE]


async def test_r_2fa_1_the_code_step_needs_the_password_step(harness: Harness, browsers: list[Browser]) -> None:
    await harness.add_account(IVY, GOOD_PASSWORD)
    harness.auth.totp_on.add(IVY)
    browser = new_browser(harness, browsers)
    await browser.get("/login")
    alone = await browser.post("/login/code", {"code": LOGIN_CODE})
    assert alone.status_code == 401 and "took too long" in alone.text and session_cookie(browser) is None
    await browser.post("/login", {"email": IVY, "password": GOOD_PASSWORD})
    sealed = browser.cookie("__Host-rempart-pending")
    assert sealed
    browser.http.cookies.set("__Host-rempart-pending", sealed[:-4] + "AAAA", domain="console.test")
    forged = await browser.post("/login/code", {"code": LOGIN_CODE})
    assert forged.status_code == 401 and session_cookie(browser) is None


async def test_r_2fa_1_an_admin_without_totp_must_enrol_first(harness: Harness, browsers: list[Browser]) -> None:
    harness.auth.must_enrol.add(ADMIN)
    browser = new_browser(harness, browsers)
    reply = await browser.login(ADMIN, ADMIN_PASSWORD)
    assert reply.headers["location"] == "/account/2fa"
    for path in ("/account", "/account/password", "/admin/domains", "/admin/settings"):
        assert (await browser.get(path)).headers["location"] == "/account/2fa", path
    page = await browser.get("/account/2fa")
    assert "set it up before anything else" in page.text and "Domains" not in page.text
    enrol = await browser.post("/account/2fa/enrol")
    assert enrol.status_code == 200
    done = await browser.post("/account/2fa/confirm", {"code": "123456"})
    assert done.status_code == 200 and "recovery" in done.text
    assert (await browser.get("/admin/domains")).status_code == 200


# CSRF, headers, escaping, limits -------------------------------------------------------------------
async def test_every_console_form_refuses_a_missing_or_wrong_csrf_token(
    harness: Harness, browsers: list[Browser]
) -> None:
    posts = console_paths("POST")
    assert len(posts) >= 25
    browser = new_browser(harness, browsers)
    await browser.login(ADMIN, ADMIN_PASSWORD)
    other = await _ivy(harness, browsers)  # a real token, of another session
    for path in posts:
        concrete = re.sub(r"\{[^}]+\}", "example.org" if "{domain}" in path or "{group}" in path else IVY, path)
        concrete = concrete.replace("/settings/example.org", "/settings/ips")
        for token in ("", "forged", other.csrf):
            reply = await browser.post(concrete, {"name": "x", "email": ADMIN, "password": ADMIN_PASSWORD},
                                       csrf=token)
            assert reply.status_code == 403, (path, token, reply.status_code)
            assert "did not come from this console" in reply.text
    # Nothing happened: the admin's session is alive, and so is Ivy's.
    assert (await browser.get("/account")).status_code == 200
    assert (await other.get("/account")).status_code == 200


async def test_login_csrf_is_bound_to_this_browser(harness: Harness, browsers: list[Browser]) -> None:
    attacker = new_browser(harness, browsers)
    await attacker.get("/login")
    victim = new_browser(harness, browsers)
    reply = await victim.post("/login", {"email": ADMIN, "password": ADMIN_PASSWORD}, csrf=attacker.csrf)
    assert reply.status_code == 403 and session_cookie(victim) is None


async def test_every_page_carries_the_security_headers(harness: Harness, browsers: list[Browser]) -> None:
    browser = new_browser(harness, browsers)
    pages = ["/login", "/static/console.css", "/static/console.js"]
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY and "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY
    for path in pages:
        reply = await browser.get(path)
        assert reply.status_code == 200, path
        assert reply.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert reply.headers["x-frame-options"] == "DENY"
        assert reply.headers["x-content-type-options"] == "nosniff"
    await browser.login(ADMIN, ADMIN_PASSWORD)
    html_pages = console_paths("GET", templated=False)
    templated = ["/admin/domains/example.org", f"/admin/accounts/{ADMIN}", "/admin/domains/example.org/settings",
                 f"/admin/accounts/{ADMIN}/settings"]
    for path in [*html_pages, *templated]:
        reply = await browser.get(path, follow_redirects=True)
        assert reply.status_code == 200, (path, reply.status_code)
        assert reply.headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
        assert reply.headers["x-frame-options"] == "DENY" and reply.headers["cache-control"] == "no-store", path
        # Nothing inline for the CSP to refuse: no script body, no style attribute, no handler.
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", reply.text), path
        assert not re.search(r"<style|\sstyle=|\son[a-z]+=", reply.text), path
    assert reply.headers["strict-transport-security"] == "max-age=31536000"
    # The API's answers get the same headers (over plain http, without HSTS).
    api = await harness.http.get("/v1/openapi.json")
    assert api.headers["x-frame-options"] == "DENY" and "strict-transport-security" not in api.headers


async def test_a_display_name_of_script_renders_as_text(harness: Harness, browsers: list[Browser]) -> None:
    browser = new_browser(harness, browsers)
    await browser.login(ADMIN, ADMIN_PASSWORD)
    probe = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    await browser.get("/admin/domains/example.org")
    created = await browser.post("/admin/domains/example.org/accounts",
                                 {"address": "probe", "display_name": probe, "password": GOOD_PASSWORD, "role": "user"})
    assert created.status_code == 303, created.text
    for path in ("/admin/domains/example.org", "/admin/accounts/probe@example.org"):
        page = (await browser.get(path)).text
        assert probe not in page and "<img src=x" not in page
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    # Typed into the login form, it comes back as text too.
    stranger = new_browser(harness, browsers)
    await stranger.get("/login")
    reply = await stranger.post("/login", {"email": '"><script>x</script>@example.org', "password": "x"})
    assert "<script>x</script>" not in reply.text and "&lt;script&gt;x&lt;/script&gt;" in reply.text


async def test_forms_have_the_api_body_limit(harness: Harness, browsers: list[Browser]) -> None:
    browser = await _ivy(harness, browsers)
    big = "x" * (harness.settings.max_body_bytes + 1)
    reply = await browser.post("/account/app-passwords", {"name": big})
    assert reply.status_code == 413
    assert reply.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    json_body = await browser.http.post("/account/app-passwords", json={"csrf": browser.csrf, "name": "x"})
    assert json_body.status_code == 415


def test_the_console_runs_the_role_check_each_api_route_declares() -> None:
    assert declared_role_check(routes_directory.create_domain) is require_superadmin
    assert declared_role_check(routes_directory.get_domain) is require_admin
    assert declared_role_check(routes_events.list_events) is require_superadmin
    assert declared_role_check(routes_auth.change_my_password) is None
    assert declared_role_check(routes_twofactor.create_app_password) is None


# Self-service -----------------------------------------------------------------------------------------
async def test_r_pwd_3_change_password_with_the_rules_shown(harness: Harness, browsers: list[Browser]) -> None:
    browser = await _ivy(harness, browsers)
    elsewhere = await new_browser(harness, browsers).login(IVY, GOOD_PASSWORD)
    assert elsewhere.status_code == 303
    form = await browser.get("/account/password")
    for rule in ("At least 10 characters long", "At least one digit", "At least one upper-case letter",
                 "Does not contain your user name", "Typed the same way twice"):
        assert rule in form.text
    assert 'data-check="absent" data-value="ivy"' in form.text
    wrong_old = await browser.post("/account/password", {"old_password": "Not-It-123!", "new_password": NEW_PASSWORD,
                                                         "confirm": NEW_PASSWORD})
    assert wrong_old.status_code == 403 and "The old password is incorrect" in wrong_old.text
    differs = await browser.post("/account/password", {"old_password": GOOD_PASSWORD, "new_password": NEW_PASSWORD,
                                                       "confirm": NEW_PASSWORD + "x"})
    assert differs.status_code == 422 and "differ" in differs.text
    short = await browser.post("/account/password", {"old_password": GOOD_PASSWORD, "new_password": "Sh0rt!",
                                                     "confirm": "Sh0rt!"})
    assert short.status_code == 422 and f"New password: {TOO_SHORT}" in short.text
    empty = await browser.post("/account/password", {"old_password": "", "new_password": "", "confirm": ""})
    assert empty.status_code == 422 and "Current password:" in empty.text
    assert harness.auth.passwords[IVY] == GOOD_PASSWORD
    changed = await browser.post("/account/password", {"old_password": GOOD_PASSWORD, "new_password": NEW_PASSWORD,
                                                       "confirm": NEW_PASSWORD})
    assert changed.status_code == 303 and changed.headers["location"] == "/account?notice=password_changed"
    assert harness.auth.passwords[IVY] == NEW_PASSWORD
    assert (await browser.get("/account")).status_code == 200  # this session stays
    other = new_browser(harness, browsers)
    await other.login(IVY, NEW_PASSWORD)
    assert (await other.get("/account")).status_code == 200


async def test_r_2fa_1_enrol_with_the_qr_code_and_the_secret_shown_once(
    harness: Harness, browsers: list[Browser]
) -> None:
    browser = await _ivy(harness, browsers)
    off = await browser.get("/account/2fa")
    assert "is <strong>off</strong>" in off.text
    enrol = await browser.post("/account/2fa/enrol")
    secret = harness.auth.totp_secrets[IVY]
    assert f'<code id="totp-secret" class="secret">{secret}</code>' in enrol.text
    assert '<svg width="' in enrol.text and 'class="qr"' in enrol.text and "<path" in enrol.text
    wrong = await browser.post("/account/2fa/confirm", {"code": "999999"})
    assert wrong.status_code == 422 and "not valid" in wrong.text and secret not in wrong.text
    confirmed = await browser.post("/account/2fa/confirm", {"code": "123456"})
    assert confirmed.status_code == 200
    assert "code0-abcde" in confirmed.text and 'download="rempart-recovery-codes.txt"' in confirmed.text
    assert "data:text/plain;charset=utf-8,code0-abcde%0Acode1-abcde" in confirmed.text
    on = await browser.get("/account/2fa")
    assert "is <strong>on</strong>" in on.text and secret not in on.text


async def test_r_2fa_1_turning_totp_off_needs_a_code(harness: Harness, browsers: list[Browser]) -> None:
    browser = await _ivy(harness, browsers)
    await browser.post("/account/2fa/enrol")
    await browser.post("/account/2fa/confirm", {"code": "123456"})
    await browser.get("/account/2fa")
    wrong = await browser.post("/account/2fa/disable", {"code": "111111"})
    assert wrong.status_code == 422 and "not valid" in wrong.text and IVY in harness.auth.totp_on
    off = await browser.post("/account/2fa/disable", {"code": LOGIN_CODE})
    assert off.status_code == 303 and off.headers["location"] == "/account/2fa?notice=totp_disabled"
    assert IVY not in harness.auth.totp_on
    assert "is <strong>off</strong>" in (await browser.get("/account/2fa?notice=totp_disabled")).text


def test_insecure_console_cookies_only_outside_production() -> None:
    plain = ConsoleSecurity("k", secure=False)
    assert (plain.session_cookie, plain.login_cookie) == ("rempart-session", "rempart-login")
    response = Response()
    plain.set_cookie(response, plain.session_cookie, "token")
    cookie = response.headers["set-cookie"].lower()
    assert "secure" not in cookie and "httponly" in cookie and "samesite=strict" in cookie
    assert AdminApiSettings(environment="dev", console_secure_cookies=False).console_secure_cookies is False
    with pytest.raises(ValidationError, match="only for plain-http development"):
        AdminApiSettings(environment="prod", secret_key="a-real-key", console_secure_cookies=False)  # type: ignore[arg-type]


async def test_r_2fa_2_app_passwords_shown_once_with_the_mail_settings(
    harness: Harness, browsers: list[Browser]
) -> None:
    browser = await _ivy(harness, browsers)
    created = await browser.post("/account/app-passwords", {"name": "phone"})
    assert created.status_code == 200
    password = harness.auth.app_passwords[IVY]["phone"]
    assert f'<code id="app-password" class="secret">{password}</code>' in created.text
    settings = harness.settings
    for expected in (settings.hostname, str(settings.public_imaps_port), str(settings.public_submission_port),
                     "STARTTLS", "SSL/TLS", IVY):
        assert expected in created.text
    listing = await browser.get("/account/app-passwords")
    assert "phone" in listing.text and password not in listing.text
    duplicate = await browser.post("/account/app-passwords", {"name": "bad/name"})
    assert duplicate.status_code == 422 and "Name:" in duplicate.text
    revoked = await browser.post("/account/app-passwords/revoke", {"name": "phone"})
    assert revoked.status_code == 303 and harness.auth.app_passwords[IVY] == {}
    missing = await browser.post("/account/app-passwords/revoke", {"name": "phone"})
    assert missing.status_code == 404 and "App password not found" in missing.text


async def test_recent_logins_show_the_ip_and_result_of_ones_own_account(
    harness: Harness, browsers: list[Browser]
) -> None:
    browser = await _ivy(harness, browsers)
    events = harness.backend.events
    await events.publish("auth", "login_ok", client_ip="198.51.100.7", account=IVY, protocol="imap")
    await events.publish("auth", "login_failed", client_ip="203.0.113.9", account=IVY, protocol="smtp",
                         reason="bad_password")
    await events.publish("auth", "login_ok", client_ip="192.0.2.99", account=ADMIN, protocol="imap")
    await events.publish("auth", "totp_enabled", account=IVY)
    for _ in range(50):
        if (await harness.backend.js.stream_info(EVENTS_STREAM)).state.messages >= 4:
            break
        await asyncio.sleep(0.05)
    page = (await browser.get("/account/logins")).text
    assert "198.51.100.7" in page and "signed in" in page and "imap" in page
    assert "203.0.113.9" in page and "refused" in page and "wrong password" in page
    assert "192.0.2.99" not in page  # another account's
    assert "totp" not in page


async def test_sign_out_everywhere(harness: Harness, browsers: list[Browser]) -> None:
    browser = await _ivy(harness, browsers)
    other = new_browser(harness, browsers)
    await other.login(IVY, GOOD_PASSWORD)
    reply = await browser.post("/account/sessions/end")
    assert reply.status_code == 303 and reply.headers["location"] == "/login?notice=logged_out"
    assert (await browser.get("/account")).headers["location"] == "/login"
    assert (await other.get("/account")).headers["location"] == "/login"
