"""Fixtures: the admin API app over real Redis and NATS, and a small real-gRPC auth service.

The in-test AuthService implements the auth contract just enough for the admin API: it keeps
passwords in a dict (test only), answers OK/INVALID with the role from the Directory, and
refuses passwords shorter than 10 characters the way the real policy names a rule. Its current
TOTP code is always ``TOTP_CODE``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI
from nats.aio.client import Client as NATS

from rempart.admin_api.app import create_app
from rempart.admin_api.backend import Backend
from rempart.admin_api.sessions import SessionStore
from rempart.admin_api.settings import AdminApiSettings
from rempart.common.clients import AuthClient
from rempart.common.directory import Directory, normalize_address
from rempart.common.events import EventBus, connect_nats, ensure_streams
from rempart.common.grpcutil import new_server, set_serving
from rempart.common.pb.auth.v1 import auth_pb2, auth_pb2_grpc
from rempart.common.testing.localstack import LocalServer, start_nats

TOO_SHORT = "password must be at least 10 characters long"
ADMIN = "admin@example.org"
ADMIN_PASSWORD = "Adm1n-Secret-Pw!"
TOTP_CODE = "123456"  # the in-test service's current TOTP code (TotpConfirm, TotpDisable)


class InTestAuthService(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, redis: aioredis.Redis) -> None:
        self.directory = Directory(redis)
        self.passwords: dict[str, str] = {}
        self.requests: list[auth_pb2.AuthenticateRequest] = []
        self.seen: set[str] = set()  # every password the admin API passed on
        self.must_enrol: set[str] = set()  # admins answered with second_factor_enrolment_required
        self.totp_on: set[str] = set()  # accounts whose TOTP is confirmed (active)
        self.disable_code = TOTP_CODE  # the code TotpDisable takes
        self.totp_secrets: dict[str, str] = {}
        self.app_passwords: dict[str, dict[str, str]] = {}
        self.locked: set[str] = set()

    async def Authenticate(self, request: auth_pb2.AuthenticateRequest, context: object) -> auth_pb2.AuthenticateResponse:
        self.requests.append(request)
        self.seen.add(request.password)
        address = normalize_address(request.login)
        account = await self.directory.get_account(address)
        if address in self.locked:
            return auth_pb2.AuthenticateResponse(status=auth_pb2.AUTH_STATUS_LOCKED)
        if account is None or self.passwords.get(address) != request.password:
            return auth_pb2.AuthenticateResponse(status=auth_pb2.AUTH_STATUS_INVALID)
        return auth_pb2.AuthenticateResponse(status=auth_pb2.AUTH_STATUS_OK, account=address, role=account.role,
                                             second_factor_enrolment_required=address in self.must_enrol)

    async def TotpConfirm(self, request: auth_pb2.TotpConfirmRequest, context: object) -> auth_pb2.TotpConfirmResponse:
        if request.code != TOTP_CODE:
            return auth_pb2.TotpConfirmResponse(ok=False)
        self.must_enrol.discard(request.account)
        self.totp_on.add(request.account)
        return auth_pb2.TotpConfirmResponse(ok=True, recovery_codes=[f"code{n}-abcde" for n in range(10)])

    async def TotpEnrol(self, request: auth_pb2.TotpEnrolRequest, context: object) -> auth_pb2.TotpEnrolResponse:
        secret = "JBSWY3DPEHPK3PXPJBSWY3DP" + str(len(self.totp_secrets)).zfill(8)
        self.totp_secrets[request.account] = secret
        return auth_pb2.TotpEnrolResponse(
            secret=secret, otpauth_uri=f"otpauth://totp/Rempart:{request.account}?secret={secret}&issuer=Rempart"
        )

    async def TotpDisable(self, request: auth_pb2.TotpDisableRequest, context: grpc.aio.ServicerContext
                          ) -> auth_pb2.TotpDisableResponse:
        """As the real service: an unknown account is NOT_FOUND; TOTP goes off only when it is on
        and the code is current, otherwise ok=False and nothing changes."""
        if await self.directory.get_account(normalize_address(request.account)) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown account")
        if request.account not in self.totp_on or request.code.strip() != self.disable_code:
            return auth_pb2.TotpDisableResponse(ok=False)
        self.totp_on.discard(request.account)
        self.totp_secrets.pop(request.account, None)
        return auth_pb2.TotpDisableResponse(ok=True)

    async def TotpStatus(self, request: auth_pb2.TotpStatusRequest, context: object) -> auth_pb2.TotpStatusResponse:
        return auth_pb2.TotpStatusResponse(enabled=request.account in self.totp_secrets, recovery_codes_left=10)

    async def AppPasswordCreate(
        self, request: auth_pb2.AppPasswordCreateRequest, context: object
    ) -> auth_pb2.AppPasswordCreateResponse:
        password = f"apppw-{request.name}-{len(self.app_passwords)}-qwertyuiop"
        self.app_passwords.setdefault(request.account, {})[request.name] = password
        return auth_pb2.AppPasswordCreateResponse(password=password, created=1_700_000_000.5)

    async def AppPasswordList(
        self, request: auth_pb2.AppPasswordListRequest, context: object
    ) -> auth_pb2.AppPasswordListResponse:
        return auth_pb2.AppPasswordListResponse(app_passwords=[
            auth_pb2.AppPassword(name=name, created=1_700_000_000.5)
            for name in self.app_passwords.get(request.account, {})
        ])

    async def AppPasswordRevoke(
        self, request: auth_pb2.AppPasswordRevokeRequest, context: object
    ) -> auth_pb2.AppPasswordRevokeResponse:
        found = self.app_passwords.get(request.account, {}).pop(request.name, None)
        return auth_pb2.AppPasswordRevokeResponse(found=found is not None)

    async def AppPasswordRevokeAll(
        self, request: auth_pb2.AppPasswordRevokeAllRequest, context: object
    ) -> auth_pb2.AppPasswordRevokeAllResponse:
        return auth_pb2.AppPasswordRevokeAllResponse(revoked=len(self.app_passwords.pop(request.account, {})))

    async def Unlock(self, request: auth_pb2.UnlockRequest, context: object) -> auth_pb2.UnlockResponse:
        was_locked = request.account in self.locked
        self.locked.discard(request.account)
        return auth_pb2.UnlockResponse(was_locked=was_locked)

    async def TotpReset(self, request: auth_pb2.TotpResetRequest, context: object) -> auth_pb2.TotpResetResponse:
        return auth_pb2.TotpResetResponse(was_enabled=self.totp_secrets.pop(request.account, None) is not None)

    async def ImportHash(self, request: auth_pb2.ImportHashRequest, context: object) -> auth_pb2.ImportHashResponse:
        self.seen.add(request.scheme_hash)
        return auth_pb2.ImportHashResponse(ok=True)

    async def SetPassword(self, request: auth_pb2.SetPasswordRequest, context: object) -> auth_pb2.SetPasswordResponse:
        self.seen.add(request.password)
        if len(request.password) < 10 and not request.skip_policy:
            return auth_pb2.SetPasswordResponse(ok=False, violations=[TOO_SHORT])
        self.passwords[normalize_address(request.account)] = request.password
        return auth_pb2.SetPasswordResponse(ok=True)


@dataclass
class Harness:
    app: FastAPI
    backend: Backend
    auth: InTestAuthService
    settings: AdminApiSettings
    bodies: list[bytes] = field(default_factory=list)
    client: httpx.AsyncClient | None = None

    @property
    def http(self) -> httpx.AsyncClient:
        assert self.client is not None
        return self.client

    async def add_account(self, address: str, password: str, role: str = "user") -> None:
        directory = self.backend.directory
        _, domain = address.split("@")
        if domain not in await directory.list_domains():
            await directory.add_domain(domain)
        await directory.add_account(address, role)  # type: ignore[arg-type]
        self.auth.passwords[address] = password

    async def login(self, address: str, password: str) -> dict[str, str]:
        reply = await self.http.post("/v1/auth/login", json={"email": address, "password": password})
        assert reply.status_code == 200, reply.text
        return {"Authorization": f"Bearer {reply.json()['token']}"}


@pytest.fixture
async def auth_server(redis: aioredis.Redis) -> AsyncIterator[tuple[InTestAuthService, int]]:
    servicer = InTestAuthService(redis)
    server, health = new_server()
    auth_pb2_grpc.add_AuthServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await set_serving(health, True)
    yield servicer, port
    await server.stop(0)


def make_settings(redis_url: str, nats_url: str, **overrides: object) -> AdminApiSettings:
    return AdminApiSettings(redis_url=redis_url, nats_url=nats_url, environment="test", **overrides)  # type: ignore[arg-type]


@pytest.fixture
async def harness(
    redis_url: str,
    nats_url: str,
    redis: aioredis.Redis,
    nats_conn: NATS,
    auth_server: tuple[InTestAuthService, int],
) -> AsyncIterator[Harness]:
    servicer, port = auth_server
    settings = make_settings(redis_url, nats_url, auth_target=f"127.0.0.1:{port}")
    auth = AuthClient(settings.auth_target, timeout=3.0)
    backend = Backend(
        redis=redis,
        js=nats_conn.jetstream(),
        events=EventBus(nats_conn, "admin-api"),
        auth=auth,
        sessions=SessionStore(redis, settings.session_ttl_seconds),
    )
    h = Harness(create_app(settings, backend), backend, servicer, settings)

    async def keep_body(response: httpx.Response) -> None:
        h.bodies.append(await response.aread())

    hooks: dict[str, list[Callable[[httpx.Response], Awaitable[None]]]] = {"response": [keep_body]}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=h.app), base_url="http://admin.test", event_hooks=hooks  # type: ignore[arg-type]
    ) as client:
        h.client = client
        await h.add_account(ADMIN, ADMIN_PASSWORD, "superadmin")
        yield h
    await auth.close()
    # R-PWD-2: no answer of any test ever carried a password the test used.
    for body in h.bodies:
        for secret in h.auth.seen | set(h.auth.passwords.values()):
            assert len(secret) < 6 or secret.encode() not in body, body
        assert ADMIN_PASSWORD.encode() not in body


@contextlib.asynccontextmanager
async def private_nats(harness: Harness, workdir: Path) -> AsyncIterator[LocalServer]:
    """The app over a NATS server of its own (streams made), for a test to ``stop()`` it: the
    audit stream gone (R-ADM-5). Redis and the auth service stay the shared ones."""
    own = start_nats(workdir)
    nc = await connect_nats(own.url, "test-audit")
    try:
        await ensure_streams(nc.jetstream())
        harness.app.state.backend = dataclasses.replace(harness.backend, js=nc.jetstream(),
                                                        events=EventBus(nc, "admin-api"))
        yield own
    finally:
        harness.app.state.backend = harness.backend
        with contextlib.suppress(ConnectionError):  # closing a client whose server is gone
            await nc.close()
        own.stop()


@pytest.fixture
async def admin_headers(harness: Harness) -> dict[str, str]:
    return await harness.login(ADMIN, ADMIN_PASSWORD)
