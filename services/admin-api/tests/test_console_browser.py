"""The web console in a real browser (issue 14): Debian's chromium, headless, driven through
chromedriver's W3C WebDriver protocol, against the real admin API app over TLS (uvicorn), the
real auth service (Argon2id, TOTP, lockout) and real Redis and NATS.

A new user signs in, enrols TOTP by reading the secret from the page and computing the code
with pyotp, signs out, and signs in again with a code. Along the way the page's script must
run under the Content-Security-Policy (the password rules tick as one types). Screenshots of
each page go to tests/e2e/screenshots/console/ (not committed) for a reviewer to look at.

Skipped, with the reason, when chromium or chromedriver is not installed (.ci/run installs
them on Debian: apt-get install chromium chromium-driver).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
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
from rempart.common.clients import AuthClient
from rempart.common.directory import Directory
from rempart.common.events import EventBus

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


@pytest.fixture
async def console_url(
    redis_url: str, nats_url: str, redis: aioredis.Redis, nats_conn: NATS, tls_files: tuple[str, str]
) -> AsyncIterator[str]:
    """The admin API app (console included) over TLS, with the real auth service behind it."""
    common: dict[str, Any] = {"redis_url": redis_url, "nats_url": nats_url, "environment": "test",
                              "ops_port": 0, "log_format": "text"}
    auth_settings = AuthSettings(**common, grpc_host="127.0.0.1", grpc_port=0, argon2_time_cost=1,
                                 argon2_memory_kib=1024, shutdown_grace_seconds=1.0)
    async with running(auth_settings) as auth_service:
        settings = AdminApiSettings(**common, auth_target=f"127.0.0.1:{auth_service.grpc_port}")
        auth = AuthClient(settings.auth_target, timeout=5.0)
        backend = Backend(redis=redis, js=nats_conn.jetstream(), events=EventBus(nats_conn, "admin-api"), auth=auth,
                          sessions=SessionStore(redis, settings.session_ttl_seconds))
        await Directory(redis).add_domain("example.org")
        await Directory(redis).add_account(USER, "user", "June")
        reply = await auth.set_password(USER, PASSWORD, skip_policy=False)
        assert reply.ok, reply.violations
        cert, key = tls_files
        server = uvicorn.Server(uvicorn.Config(create_app(settings, backend), host="127.0.0.1", port=0,
                                               ssl_certfile=cert, ssl_keyfile=key, lifespan="off", log_config=None))
        task = asyncio.create_task(server.serve())
        while not server.started:
            assert not task.done(), "uvicorn stopped"
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"https://127.0.0.1:{port}"
        server.should_exit = True
        await task
        await auth.close()


async def _sign_in(browser: Chromium, code: str | None = None) -> None:
    await browser.open("/login")
    await browser.type("#email", USER)
    await browser.type("#password", PASSWORD)
    await browser.click("form[action='/login'] button")
    if code is not None:
        await browser.find("form[action='/login/code'] #code")  # the answer to the password's POST
        await browser.screenshot("03-login-code")
        await browser.type("#code", code)
        await browser.click("form[action='/login/code'] button")
    await browser.wait_for_path("/account")


async def test_r_2fa_1_a_user_enrols_totp_and_signs_in_with_a_code_in_chromium(
    console_url: str, chromedriver: str
) -> None:
    started = time.monotonic()
    async with chromium(chromedriver, console_url) as browser:
        await browser.open("/")
        await browser.wait_for_path("/login")
        await browser.screenshot("01-login")
        await _sign_in(browser)
        assert await browser.text("#display-name") == "June"
        assert await browser.text("#totp-state") == "off"
        await browser.screenshot("02-account")

        # The page's own script runs under the CSP: the rules tick while one types.
        await browser.open("/account/password")
        await browser.type("#new_password", "short")
        assert await browser.attribute("li[data-check='length']", "data-state") == "unmet"
        await browser.type("#new_password", "-Long-Enough-9")
        assert await browser.attribute("li[data-check='length']", "data-state") == "met"
        await browser.screenshot("04-password")

        await browser.open("/account/2fa")
        await browser.click("form[action='/account/2fa/enrol'] button")
        secret = await browser.text("#totp-secret")
        await browser.find("figure.qr svg")
        await browser.screenshot("05-totp-enrol")
        totp = pyotp.TOTP(secret)
        await browser.type("#code", totp.now())
        await browser.click("form[action='/account/2fa/confirm'] button")
        codes = await browser.text("#recovery-codes")
        assert len(codes.split()) >= 8
        await browser.screenshot("06-recovery-codes")

        await browser.click("form.signout button")
        await browser.wait_for_path("/login?notice=logged_out")
        await browser.open("/account")
        await browser.wait_for_path("/login")  # signed out means signed out

        # The confirming code's time step is used (RFC 6238 section 5.2): sign in with the next one.
        await _sign_in(browser, totp.at(time.time() + 30))
        assert (await browser.text("#totp-state")).startswith("on")
        await browser.screenshot("07-signed-in-with-totp")
    assert time.monotonic() - started < 30
