"""The web console in a real browser (issue 14): Debian's chromium, headless, driven through
chromedriver's W3C WebDriver protocol, against the real admin API app over TLS (uvicorn), the
real auth service (Argon2id, TOTP, lockout) and real Redis and NATS.

A new user signs in, changes the password (the page's script ticks the rules as one types, so
it runs under the Content-Security-Policy), enrols TOTP by reading the secret from the page and
computing the code with pyotp, signs out, signs in again with a code, and creates an app
password that the auth service then takes for IMAP (and the account password no longer does,
R-2FA-2). An administrator signs in with its code, creates a domain and a user, unlocks a
locked account and lifts an IP block. Screenshots of each page go to
tests/e2e/screenshots/console/ (not committed) for a reviewer to look at.

Skipped, with the reason, when chromium or chromedriver is not installed (.ci/run installs
them on Debian: apt-get install chromium chromium-driver).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
import redis.asyncio as aioredis
import uvicorn
from nats.aio.client import Client as NATS

from rempart.admin_api.app import create_app
from rempart.admin_api.backend import Backend
from rempart.admin_api.sessions import SessionStore
from rempart.admin_api.settings import AdminApiSettings
from rempart.auth.app import running
from rempart.auth.settings import AuthSettings
from rempart.common import keys
from rempart.common.clients import AuthClient
from rempart.common.config import SettingsStore
from rempart.common.directory import Directory
from rempart.common.events import EventBus
from rempart.common.pb.auth.v1 import auth_pb2

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium and chromedriver not installed (Debian: apt-get install chromium chromium-driver)",
)
SCREENSHOTS = Path(__file__).resolve().parents[3] / "tests" / "e2e" / "screenshots" / "console"
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver element reference key
USER = "june@example.org"
PASSWORD = "Quiet-Heron-42-Lake"
NEW_PASSWORD = "Amber-Falcon-77-Ridge"
ADMIN = "root@example.org"
LOCKED = "lee@example.org"
BLOCKED_IP = "192.0.2.66"
WAIT_SECONDS = 10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def chromedriver() -> Iterator[str]:
    assert CHROMEDRIVER is not None
    port = _free_port()
    process = subprocess.Popen([CHROMEDRIVER, f"--port={port}", "--allowed-ips=127.0.0.1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + WAIT_SECONDS
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/status", timeout=1).json()["value"]["ready"]:
                break
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            last = exc
        time.sleep(0.05)
    else:
        process.kill()
        raise TimeoutError(f"chromedriver did not start: {last}")
    yield url
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()


class Chromium:
    """The few WebDriver commands the test needs (W3C protocol, JSON over HTTP)."""

    def __init__(self, http: httpx.AsyncClient, session: str, base: str) -> None:
        self.http = http
        self.session = session
        self.base = base

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        reply = await self.http.request(method, f"/session/{self.session}{path}", json=body)
        value = reply.json()["value"]
        if reply.status_code != 200:
            raise AssertionError(f"webdriver {method} {path}: {value.get('error')}: {value.get('message')}")
        return value

    async def open(self, path: str) -> None:
        await self._call("POST", "/url", {"url": self.base + path})

    async def path(self) -> str:
        url = str(await self._call("GET", "/url"))
        return url.removeprefix(self.base)

    async def find(self, css: str) -> str:
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            found = await self._call("POST", "/elements", {"using": "css selector", "value": css})
            if found:
                return str(found[0][ELEMENT])
            if time.monotonic() > deadline:
                raise AssertionError(f"no element {css} on {await self.path()}")
            await asyncio.sleep(0.05)

    async def type(self, css: str, text: str) -> None:
        await self._call("POST", f"/element/{await self.find(css)}/value", {"text": text})

    async def clear(self, css: str) -> None:
        await self._call("POST", f"/element/{await self.find(css)}/clear", {})

    async def click(self, css: str) -> None:
        await self._call("POST", f"/element/{await self.find(css)}/click", {})

    async def text(self, css: str) -> str:
        return str(await self._call("GET", f"/element/{await self.find(css)}/text"))

    async def attribute(self, css: str, name: str) -> str | None:
        value = await self._call("GET", f"/element/{await self.find(css)}/attribute/{name}")
        return None if value is None else str(value)

    async def wait_for_path(self, expected: str) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while (current := await self.path()) != expected:
            if time.monotonic() > deadline:
                raise AssertionError(f"at {current}, expected {expected}")
            await asyncio.sleep(0.05)

    async def screenshot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        (SCREENSHOTS / f"{name}.png").write_bytes(base64.b64decode(await self._call("GET", "/screenshot")))


@contextlib.asynccontextmanager
async def chromium(driver: str, base: str) -> AsyncIterator[Chromium]:
    capabilities = {"capabilities": {"alwaysMatch": {
        "browserName": "chrome",
        "acceptInsecureCerts": True,  # the test's self-signed certificate
        "goog:chromeOptions": {"binary": CHROMIUM, "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,1000",
            "--no-first-run", "--disable-extensions", "--password-store=basic"]},
    }}}
    async with httpx.AsyncClient(base_url=driver, timeout=30) as http:
        reply = await http.post("/session", json=capabilities)
        assert reply.status_code == 200, reply.text
        session = reply.json()["value"]["sessionId"]
        try:
            yield Chromium(http, session, base)
        finally:
            await http.delete(f"/session/{session}")


@dataclass
class Stack:
    url: str
    auth: AuthClient
    redis: aioredis.Redis
    admin_totp: pyotp.TOTP


async def imap_login(auth: AuthClient, account: str, password: str) -> auth_pb2.AuthenticateResponse:
    return await auth.authenticate(auth_pb2.AuthenticateRequest(
        login=account, password=password, client_ip="198.51.100.20", protocol="imap", mechanism="PLAIN", tls=True))


@pytest.fixture
async def stack(
    redis_url: str, nats_url: str, redis: aioredis.Redis, nats_conn: NATS, tls_files: tuple[str, str]
) -> AsyncIterator[Stack]:
    """The admin API app (console included) over TLS, with the real auth service behind it."""
    common: dict[str, Any] = {"redis_url": redis_url, "nats_url": nats_url, "environment": "test",
                              "ops_port": 0, "log_format": "text"}
    # Failed logins answer at once here (R-LOG-4's delay is the auth tests' business).
    await SettingsStore(redis).put_doc("server", {"login": {"failure_delay_ms": 0}})
    auth_settings = AuthSettings(**common, grpc_host="127.0.0.1", grpc_port=0, argon2_time_cost=1,
                                 argon2_memory_kib=1024, shutdown_grace_seconds=1.0)
    async with running(auth_settings) as auth_service:
        settings = AdminApiSettings(**common, auth_target=f"127.0.0.1:{auth_service.grpc_port}")
        auth = AuthClient(settings.auth_target, timeout=5.0)
        backend = Backend(redis=redis, js=nats_conn.jetstream(), events=EventBus(nats_conn, "admin-api"), auth=auth,
                          sessions=SessionStore(redis, settings.session_ttl_seconds))
        directory = Directory(redis)
        await directory.add_domain("example.org")
        for address, role, name in ((USER, "user", "June"), (ADMIN, "superadmin", "Root"), (LOCKED, "user", "Lee")):
            await directory.add_account(address, role, name)  # type: ignore[arg-type]
            reply = await auth.set_password(address, PASSWORD, skip_policy=False)
            assert reply.ok, reply.violations
        # The administrator has TOTP already (admins must, R-2FA-1): enrolled through the auth service.
        enrolment = await auth.totp_enrol(ADMIN, "Rempart")
        admin_totp = pyotp.TOTP(enrolment.secret)
        assert (await auth.totp_confirm(ADMIN, admin_totp.now())).ok
        cert, key = tls_files
        server = uvicorn.Server(uvicorn.Config(create_app(settings, backend), host="127.0.0.1", port=0,
                                               ssl_certfile=cert, ssl_keyfile=key, lifespan="off", log_config=None))
        task = asyncio.create_task(server.serve())
        while not server.started:
            assert not task.done(), "uvicorn stopped"
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield Stack(f"https://127.0.0.1:{port}", auth, redis, admin_totp)
        server.should_exit = True
        await task
        await auth.close()


async def _sign_in(browser: Chromium, email: str, password: str, code: str | None = None,
                   shots: str = "") -> None:
    await browser.open("/login")
    await browser.type("#email", email)
    await browser.type("#password", password)
    await browser.click("form[action='/login'] button")
    if code is not None:
        await browser.find("form[action='/login/code'] #code")  # the answer to the password's POST
        if shots:
            await browser.screenshot(shots)
        await browser.type("#code", code)
        await browser.click("form[action='/login/code'] button")
    await browser.wait_for_path("/account")


async def test_r_2fa_1_a_user_enrols_totp_signs_in_with_a_code_and_makes_an_app_password(
    stack: Stack, chromedriver: str
) -> None:
    started = time.monotonic()
    async with chromium(chromedriver, stack.url) as browser:
        await browser.open("/")
        await browser.wait_for_path("/login")
        await browser.screenshot("01-login")
        await _sign_in(browser, USER, PASSWORD)
        assert await browser.text("#display-name") == "June"
        assert await browser.text("#totp-state") == "off"
        await browser.screenshot("02-account")

        # R-PWD-3, and the page's own script runs under the CSP: the rules tick while one types.
        await browser.open("/account/password")
        await browser.type("#old_password", PASSWORD)
        await browser.type("#new_password", "short")
        assert await browser.attribute("li[data-check='length']", "data-state") == "unmet"
        await browser.clear("#new_password")
        await browser.type("#new_password", NEW_PASSWORD)
        assert await browser.attribute("li[data-check='length']", "data-state") == "met"
        await browser.type("#confirm", NEW_PASSWORD)
        assert await browser.attribute("li[data-check='confirm']", "data-state") == "met"
        await browser.screenshot("03-password")
        await browser.click("#password-form button")
        await browser.wait_for_path("/account?notice=password_changed")

        await browser.open("/account/2fa")
        await browser.click("form[action='/account/2fa/enrol'] button")
        secret = await browser.text("#totp-secret")
        await browser.find("figure.qr svg")
        await browser.screenshot("04-totp-enrol")
        totp = pyotp.TOTP(secret)
        await browser.type("#code", totp.now())
        await browser.click("form[action='/account/2fa/confirm'] button")
        codes = await browser.text("#recovery-codes")
        assert len(codes.split()) >= 8
        await browser.screenshot("05-recovery-codes")

        await browser.click("form.signout button")
        await browser.wait_for_path("/login?notice=logged_out")
        await browser.open("/account")
        await browser.wait_for_path("/login")  # signed out means signed out

        # The confirming code's time step is used (RFC 6238 section 5.2): sign in with the next one.
        await _sign_in(browser, USER, NEW_PASSWORD, totp.at(time.time() + 30), shots="06-login-code")
        assert (await browser.text("#totp-state")).startswith("on")
        await browser.screenshot("07-signed-in-with-totp")

        # R-2FA-2: mail programs now need an app password.
        await browser.open("/account/app-passwords")
        await browser.type("#name", "phone")
        await browser.click("form[action='/account/app-passwords'] button")
        app_password = await browser.text("#app-password")
        await browser.screenshot("08-app-password")
    ok = await imap_login(stack.auth, USER, app_password)
    assert ok.status == auth_pb2.AUTH_STATUS_OK and ok.app_password
    refused = await imap_login(stack.auth, USER, NEW_PASSWORD)
    assert refused.status != auth_pb2.AUTH_STATUS_OK
    assert time.monotonic() - started < 30


async def test_r_adm_4_an_admin_creates_a_domain_and_a_user_unlocks_and_unblocks(
    stack: Stack, chromedriver: str
) -> None:
    for attempt in range(5):  # R-LOG-1: five different wrong passwords lock Lee out
        await imap_login(stack.auth, LOCKED, f"Wrong-Password-{attempt}")
    assert (await imap_login(stack.auth, LOCKED, PASSWORD)).status == auth_pb2.AUTH_STATUS_LOCKED
    now = time.time()
    block = {"reason": "R-IPS-2 failed logins", "blocked_at": now, "expires_at": now + 3600, "client_ip": BLOCKED_IP,
             "protocol": "imap"}
    await stack.redis.set(keys.ips_block(BLOCKED_IP), json.dumps(block), ex=3600)
    await stack.redis.zadd(keys.IPS_BLOCKS, {BLOCKED_IP: now + 3600})
    started = time.monotonic()
    async with chromium(chromedriver, stack.url) as browser:
        await _sign_in(browser, ADMIN, PASSWORD, stack.admin_totp.at(time.time() + 30))
        await browser.open("/admin/domains")
        await browser.type("#name", "shop.example")
        await browser.type("#description", "The shop")
        await browser.click("form[action='/admin/domains'] button")
        await browser.wait_for_path("/admin/domains/shop.example?notice=domain_created")
        await browser.type("#address", "max")
        await browser.type("#display_name", "Max")
        await browser.type("#new-password", NEW_PASSWORD)
        await browser.click("form[action='/admin/domains/shop.example/accounts'] button")
        await browser.wait_for_path("/admin/accounts/max@shop.example?notice=account_created")
        await browser.screenshot("11-admin-account")
        assert (await imap_login(stack.auth, "max@shop.example", NEW_PASSWORD)).status == auth_pb2.AUTH_STATUS_OK

        await browser.open(f"/admin/accounts/{LOCKED}")
        await browser.click(f"form[action='/admin/accounts/{LOCKED}/unlock'] button")
        await browser.wait_for_path(f"/admin/accounts/{LOCKED}?notice=unlocked")
        assert "now unlocked" in await browser.text(".notice")
        assert (await imap_login(stack.auth, LOCKED, PASSWORD)).status == auth_pb2.AUTH_STATUS_OK

        await browser.open("/admin/blocks")
        assert "failed logins" in await browser.text("#blocks")
        await browser.screenshot("12-admin-blocks")
        await browser.click("#blocks form[action='/admin/blocks/unblock'] button")
        await browser.wait_for_path("/admin/blocks?notice=unblocked")
        assert await stack.redis.get(keys.ips_block(BLOCKED_IP)) is None
        await browser.find("#no-blocks")

        for name, path in (("13-admin-settings", "/admin/settings"), ("14-admin-events", "/admin/events"),
                           ("15-admin-status", "/admin/status"), ("16-admin-domain", "/admin/domains/example.org")):
            await browser.open(path)
            await browser.find("h1")
            await browser.screenshot(name)
    assert time.monotonic() - started < 30
