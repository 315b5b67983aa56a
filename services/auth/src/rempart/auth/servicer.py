"""The AuthService gRPC servicer: each call answered by its flow, over one set of stores.

- :mod:`rempart.auth.login`: Authenticate (R-LOG-1..4) and the checks every login shares;
- :mod:`rempart.auth.scram_login`: ScramStart and ScramFinish (SCRAM-SHA-256, R-TLS-2);
- :mod:`rempart.auth.accounts`: passwords, TOTP, app passwords and the helpdesk calls.
"""

from __future__ import annotations

from typing import TypeAlias

import grpc

from rempart.auth.accounts import AccountAdministration
from rempart.auth.hashing import CredentialHasher
from rempart.auth.login import LoginFlow
from rempart.auth.scram_login import ScramFlow
from rempart.auth.settings import AuthSettings
from rempart.common import tracing
from rempart.common.pb.auth.v1 import auth_pb2, auth_pb2_grpc
from rempart.common.runtime import ServiceRuntime

SERVICE_NAME = "rempart.auth.v1.AuthService"
Context: TypeAlias = grpc.aio.ServicerContext


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, settings: AuthSettings, runtime: ServiceRuntime) -> None:
        self.login = LoginFlow(settings, runtime)
        self.scram = ScramFlow(self.login)
        self.accounts = AccountAdministration(self.login)

    @property
    def hasher(self) -> CredentialHasher:
        return self.login.hasher

    async def start(self) -> None:
        await self.login.start()

    async def Authenticate(
        self, request: auth_pb2.AuthenticateRequest, context: Context
    ) -> auth_pb2.AuthenticateResponse:
        reply = await self.login.authenticate(request, context)
        # The decision on the call's span; never the request (it holds the password).
        tracing.annotate({"rempart.auth.status": auth_pb2.AuthStatus.Name(reply.status)})
        return reply

    async def ScramStart(self, request: auth_pb2.ScramStartRequest, context: Context) -> auth_pb2.ScramStartResponse:
        return await self.scram.start(request, context)

    async def ScramFinish(self, request: auth_pb2.ScramFinishRequest, context: Context) -> auth_pb2.ScramFinishResponse:
        return await self.scram.finish(request, context)

    async def SetPassword(self, request: auth_pb2.SetPasswordRequest, context: Context) -> auth_pb2.SetPasswordResponse:
        return await self.accounts.set_password(request, context)

    async def ImportHash(self, request: auth_pb2.ImportHashRequest, context: Context) -> auth_pb2.ImportHashResponse:
        return await self.accounts.import_hash(request, context)

    async def TotpEnrol(self, request: auth_pb2.TotpEnrolRequest, context: Context) -> auth_pb2.TotpEnrolResponse:
        return await self.accounts.totp_enrol(request, context)

    async def TotpConfirm(self, request: auth_pb2.TotpConfirmRequest, context: Context) -> auth_pb2.TotpConfirmResponse:
        return await self.accounts.totp_confirm(request, context)

    async def TotpDisable(self, request: auth_pb2.TotpDisableRequest, context: Context) -> auth_pb2.TotpDisableResponse:
        return await self.accounts.totp_disable(request, context)

    async def TotpStatus(self, request: auth_pb2.TotpStatusRequest, context: Context) -> auth_pb2.TotpStatusResponse:
        return await self.accounts.totp_status(request, context)

    async def AppPasswordCreate(
        self, request: auth_pb2.AppPasswordCreateRequest, context: Context
    ) -> auth_pb2.AppPasswordCreateResponse:
        return await self.accounts.app_password_create(request, context)

    async def AppPasswordList(
        self, request: auth_pb2.AppPasswordListRequest, context: Context
    ) -> auth_pb2.AppPasswordListResponse:
        return await self.accounts.app_password_list(request, context)

    async def AppPasswordRevoke(
        self, request: auth_pb2.AppPasswordRevokeRequest, context: Context
    ) -> auth_pb2.AppPasswordRevokeResponse:
        return await self.accounts.app_password_revoke(request, context)

    async def Unlock(self, request: auth_pb2.UnlockRequest, context: Context) -> auth_pb2.UnlockResponse:
        return await self.accounts.unlock(request, context)

    async def TotpReset(self, request: auth_pb2.TotpResetRequest, context: Context) -> auth_pb2.TotpResetResponse:
        return await self.accounts.totp_reset(request, context)

    async def AppPasswordRevokeAll(
        self, request: auth_pb2.AppPasswordRevokeAllRequest, context: Context
    ) -> auth_pb2.AppPasswordRevokeAllResponse:
        return await self.accounts.app_password_revoke_all(request, context)
