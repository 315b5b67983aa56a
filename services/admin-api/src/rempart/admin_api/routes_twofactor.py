"""Two-step verification (R-2FA-1), app passwords (R-2FA-2) and password-hash import.

The auth service owns the secrets and publishes the ``auth/totp_*`` and ``auth/app_password_*``
events; these routes only check who may ask, turn the answers into HTTP, and audit each write
(R-ADM-5: refused with 503 while the audit stream cannot take the record). Secrets in a
response (TOTP secret, recovery codes, app password) exist there once and nowhere else.
"""

from __future__ import annotations

import base64
import io
from typing import Annotated, Any

import grpc
import segno
from fastapi import APIRouter, Path, Request, Response, status

from rempart.admin_api.backend import (
    AdminDep,
    AuditReady,
    Backend,
    BackendDep,
    Principal,
    PrincipalDep,
    ProblemError,
    forbidden,
    invalid,
    not_found,
    record_action,
    record_change,
)
from rempart.admin_api.confinement import account_or_404
from rempart.admin_api.models import (
    MAX_ADDRESS,
    MAX_APP_NAME,
    AppPasswordCreated,
    AppPasswordList,
    AppPasswordNew,
    AppPasswordOut,
    PasswordHashImport,
    Problem,
    RecoveryCodes,
    TotpCode,
    TotpEnrolment,
    TotpState,
)
from rempart.admin_api.passwords import auth_unavailable

router = APIRouter()
_P = {"model": Problem}
R_SELF: dict[int | str, dict[str, Any]] = {401: _P, 403: _P, 409: _P, 422: _P, 503: _P}
TOTP_ISSUER = "Rempart"
TOTP_ACTIVE = "Two-step verification is already on; turn it off first"
TOTP_CODE_WRONG = "The code is not valid (wrong, expired or already used)"
TOTP_NOT_ACTIVE = "Two-step verification is not on"
APP_PASSWORD_ERRORS = {
    "exists": (409, "An app password with this name exists"),
    "too_many": (409, "Too many app passwords; revoke one first"),
    "bad_name": (422, "Invalid app password name"),
}
HASH_REFUSED = "Password hash refused"
AppNamePath = Annotated[str, Path(min_length=1, max_length=MAX_APP_NAME)]
AddressPath = Annotated[str, Path(min_length=3, max_length=MAX_ADDRESS)]


def _qr_png_base64(uri: str) -> str:
    out = io.BytesIO()
    segno.make(uri, error="m").save(out, kind="png", scale=5, border=4)
    return base64.b64encode(out.getvalue()).decode()


async def _audit(backend: Backend, request: Request, principal: Principal, action: str, **details: str) -> None:
    """R-ADM-5: a self-service write is audited like any other, the account as its object. The
    record names the action and the app password's name, never a secret, a code or a password."""
    await record_action(backend, request, principal.address, action, principal.address, kind="account",
                        domain=principal.domain, **details)


async def _auth_call_failed(exc: grpc.aio.AioRpcError) -> ProblemError:
    if exc.code() == grpc.StatusCode.NOT_FOUND:
        return not_found("Account")
    return auth_unavailable()


@router.post("/v1/me/totp", operation_id="enrolTotp", response_model=TotpEnrolment, tags=["self-service"],
             responses=R_SELF, dependencies=[AuditReady], summary="Start TOTP enrolment: the secret is shown once")
async def enrol_totp(request: Request, principal: PrincipalDep, backend: BackendDep) -> TotpEnrolment:
    try:
        reply = await backend.auth.totp_enrol(principal.address, TOTP_ISSUER)
    except grpc.aio.AioRpcError as exc:
        raise await _auth_call_failed(exc) from None
    if reply.already_enabled:
        raise ProblemError(409, TOTP_ACTIVE)
    await _audit(backend, request, principal, "totp_enrolment_started")
    return TotpEnrolment(secret=reply.secret, otpauth_uri=reply.otpauth_uri,
                         qr_png_base64=_qr_png_base64(reply.otpauth_uri))


@router.get("/v1/me/totp", operation_id="getTotp", response_model=TotpState, tags=["self-service"],
            responses=R_SELF)
async def get_totp(principal: PrincipalDep, backend: BackendDep) -> TotpState:
    try:
        reply = await backend.auth.totp_status(principal.address)
    except grpc.aio.AioRpcError as exc:
        raise await _auth_call_failed(exc) from None
    return TotpState(enabled=reply.enabled, recovery_codes_left=reply.recovery_codes_left)


@router.post("/v1/me/totp/confirm", operation_id="confirmTotp", response_model=RecoveryCodes, tags=["self-service"],
             responses=R_SELF, dependencies=[AuditReady],
             summary="Activate TOTP with a current code; the recovery codes are shown once")
async def confirm_totp(body: TotpCode, request: Request, principal: PrincipalDep, backend: BackendDep) -> RecoveryCodes:
    try:
        reply = await backend.auth.totp_confirm(principal.address, body.code)
    except grpc.aio.AioRpcError as exc:
        raise await _auth_call_failed(exc) from None
    if not reply.ok:
        raise ProblemError(422, TOTP_CODE_WRONG)
    if principal.restricted:
        # The caller just proved the second factor: the enrolment session becomes a full one.
        await backend.sessions.lift_restriction(principal.token)
    await _audit(backend, request, principal, "totp_enabled", recovery_codes_issued=str(len(reply.recovery_codes)))
    return RecoveryCodes(recovery_codes=list(reply.recovery_codes))


@router.delete("/v1/me/totp", operation_id="disableTotp", status_code=204, response_class=Response,
               tags=["self-service"], responses=R_SELF, dependencies=[AuditReady],
               summary="Turn TOTP off (needs a current or recovery code)")
async def disable_totp(body: TotpCode, request: Request, principal: PrincipalDep, backend: BackendDep) -> Response:
    try:
        reply = await backend.auth.totp_disable(principal.address, body.code)
    except grpc.aio.AioRpcError as exc:
        raise await _auth_call_failed(exc) from None
    if not reply.ok:
        raise ProblemError(422, TOTP_CODE_WRONG)
    await _audit(backend, request, principal, "totp_disabled")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/v1/me/app-passwords", operation_id="createAppPassword", response_model=AppPasswordCreated,
             status_code=201, tags=["self-service"], responses=R_SELF, dependencies=[AuditReady],
             summary="A new app password for IMAP/POP3/SMTP, shown once")
async def create_app_password(
    body: AppPasswordNew, request: Request, principal: PrincipalDep, backend: BackendDep
) -> AppPasswordCreated:
    try:
        reply = await backend.auth.app_password_create(principal.address, body.name)
    except grpc.aio.AioRpcError as exc:
        raise await _auth_call_failed(exc) from None
    if reply.error or not reply.password:
        code, detail = APP_PASSWORD_ERRORS.get(reply.error, (503, "App password not created"))
        raise ProblemError(code, detail)
    await _audit(backend, request, principal, "app_password_created", app=body.name.strip())
    return AppPasswordCreated(name=body.name.strip(), password=reply.password, created=reply.created)


@router.get("/v1/me/app-passwords", operation_id="listAppPasswords", response_model=AppPasswordList,
            tags=["self-service"], responses=R_SELF)
async def list_app_passwords(principal: PrincipalDep, backend: BackendDep) -> AppPasswordList:
    try:
        reply = await backend.auth.app_password_list(principal.address)
    except grpc.aio.AioRpcError as exc:
        raise await _auth_call_failed(exc) from None
    return AppPasswordList(app_passwords=[
        AppPasswordOut(name=e.name, created=e.created, last_used=e.last_used or None) for e in reply.app_passwords
    ])


@router.delete("/v1/me/app-passwords/{name}", operation_id="revokeAppPassword", status_code=204,
               response_class=Response, tags=["self-service"], responses={**R_SELF, 404: _P},
               dependencies=[AuditReady])
async def revoke_app_password(name: AppNamePath, request: Request, principal: PrincipalDep,
                              backend: BackendDep) -> Response:
    try:
        reply = await backend.auth.app_password_revoke(principal.address, name)
    except grpc.aio.AioRpcError as exc:
        raise await _auth_call_failed(exc) from None
    if not reply.found:
        raise not_found("App password")
    await _audit(backend, request, principal, "app_password_revoked", app=name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/v1/accounts/{address}/password-hash", operation_id="importPasswordHash", status_code=204,
             response_class=Response, tags=["accounts"], responses={**R_SELF, 404: _P},
             dependencies=[AuditReady],
             summary="Migration: set an account's password from another server's hash (superadmin)")
async def import_password_hash(
    address: AddressPath, body: PasswordHashImport, request: Request, principal: AdminDep, backend: BackendDep
) -> Response:
    account = await account_or_404(backend, principal, address)
    if not principal.is_superadmin:
        raise forbidden()
    try:
        reply = await backend.auth.import_hash(account.address, body.hash.get_secret_value())
    except grpc.aio.AioRpcError as exc:
        raise await _auth_call_failed(exc) from None
    if not reply.ok:
        raise invalid(HASH_REFUSED, "hash", reply.error or "refused")
    await record_change(backend, request, principal.address, "password_hash_imported", account.address,
                        f"account:{account.address}", after={"password_hash": "imported"})
    return Response(status_code=status.HTTP_204_NO_CONTENT)
