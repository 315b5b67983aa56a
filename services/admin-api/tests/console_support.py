"""What the console tests share: a browser-like client (cookies over https, CSRF tokens read
from the page) and an in-test auth service that also asks for a TOTP code at login."""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
import redis.asyncio as aioredis

from rempart.common.directory import normalize_address
from rempart.common.grpcutil import new_server, set_serving
from rempart.common.pb.auth.v1 import auth_pb2, auth_pb2_grpc

from .conftest import Harness, InTestAuthService

CSRF = re.compile(r'name="csrf" value="([^"]*)"')
ETAG = re.compile(r'name="etag" value="([^"]*)"')
LOGIN_CODE = "654321"  # the in-test TOTP code at login (TotpConfirm takes "123456")


class TotpAuthService(InTestAuthService):
    """The conftest auth service, plus R-2FA-1 at admin login: an account whose TOTP is on must
    give a code with its password (SECOND_FACTOR_REQUIRED otherwise), as the real service does.
    Its current code at login and to turn TOTP off is ``LOGIN_CODE``."""

    def __init__(self, redis: aioredis.Redis) -> None:
        super().__init__(redis)
        self.disable_code = LOGIN_CODE
        self.server: grpc.aio.Server | None = None  # to stop it: the auth service down

    async def Authenticate(self, request: auth_pb2.AuthenticateRequest, context: object) -> auth_pb2.AuthenticateResponse:
        reply = await super().Authenticate(request, context)
        address = normalize_address(request.login)
        if reply.status == auth_pb2.AUTH_STATUS_OK and address in self.totp_on and request.protocol == "admin":
            if request.totp_code != LOGIN_CODE:
                return auth_pb2.AuthenticateResponse(status=auth_pb2.AUTH_STATUS_SECOND_FACTOR_REQUIRED)
        return reply


@pytest.fixture
async def auth_server(redis: aioredis.Redis) -> AsyncIterator[tuple[InTestAuthService, int]]:
    servicer = TotpAuthService(redis)
    server, health = new_server()
    servicer.server = server
    auth_pb2_grpc.add_AuthServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await set_serving(health, True)
    yield servicer, port
    await server.stop(0)


class Browser:
    """A console visitor: keeps cookies like a browser (https, so Secure cookies come back) and
    sends the CSRF token of the last page it read with every form."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=harness.app),  # type: ignore[arg-type]
                                      base_url="https://console.test")
        self.csrf = ""
        self.etag = ""
        self.bodies: list[bytes] = []

    def _read(self, response: httpx.Response) -> httpx.Response:
        self.bodies.append(response.content)
        found = CSRF.search(response.text)
        if found:
            self.csrf = found.group(1)
        etag = ETAG.search(response.text)
        if etag:
            self.etag = html.unescape(etag.group(1))  # what a browser sends back
        return response

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self._read(await self.http.get(path, **kwargs))

    async def post(self, path: str, data: dict[str, Any] | None = None, csrf: str | None = None,
                   **kwargs: Any) -> httpx.Response:
        form = dict(data or {})
        form.setdefault("csrf", self.csrf if csrf is None else csrf)
        return self._read(await self.http.post(path, data=form, **kwargs))

    async def login(self, email: str, password: str, code: str | None = None) -> httpx.Response:
        await self.get("/login")
        reply = await self.post("/login", {"email": email, "password": password})
        if code is not None and reply.status_code == 200 and 'action="/login/code"' in reply.text:
            reply = await self.post("/login/code", {"code": code})
        if reply.status_code == 303:
            await self.get(reply.headers["location"])  # the first page: its CSRF token
        return reply

    def cookie(self, name: str) -> str | None:
        for cookie in self.http.cookies.jar:
            if cookie.name == name:
                return cookie.value
        return None

    async def close(self) -> None:
        await self.http.aclose()


def session_cookie(browser: Browser) -> str | None:
    return browser.cookie("__Host-rempart-session")


@pytest.fixture
async def browsers(harness: Harness) -> AsyncIterator[list[Browser]]:
    """Make browsers with ``new_browser(browsers)``; each is checked afterwards: no page ever
    showed a password the test typed (R-PWD-2)."""
    made: list[Browser] = []
    yield made
    for browser in made:
        await browser.close()
        for body in browser.bodies:
            for secret in harness.auth.seen | set(harness.auth.passwords.values()):
                assert len(secret) < 6 or secret.encode() not in body, body[:300]


def new_browser(harness: Harness, made: list[Browser]) -> Browser:
    browser = Browser(harness)
    made.append(browser)
    return browser
