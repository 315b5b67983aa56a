"""Login, logout and self-service (R-LOG-4, R-LOG-5, R-PWD-3)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response, status

from rempart.admin_api.backend import (
    BEARER,
    AuditReady,
    BackendDep,
    PrincipalDep,
    ProblemError,
    client_ip,
    end_sessions,
    invalid,
    not_authenticated,
    record_change,
)
from rempart.admin_api.models import AccountOut, LoginRequest, LoginResponse, PasswordChange, Problem
from rempart.admin_api.passwords import auth_unavailable, check_password, request_tls, set_password
from rempart.common.pb.auth.v1 import auth_pb2

log = logging.getLogger(__name__)

# R-LOG-4: one answer for an unknown user, a wrong password, a locked or IP-restricted account.
LOGIN_FAILED = "Unknown user or incorrect password"
SECOND_FACTOR = "A valid TOTP code is required"
OLD_PASSWORD_WRONG = "The old password is incorrect"  # noqa: S105 - a message
CONFIRM_MISMATCH = "The new password and its confirmation differ"

router = APIRouter(tags=["auth"])
ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": Problem},
    422: {"model": Problem},
    503: {"model": Problem},
}


@router.post(
    "/v1/auth/login",
    operation_id="login",
    response_model=LoginResponse,
    responses=ERRORS,
    summary="Exchange credentials (and a TOTP code) for a session token",
)
async def login(body: LoginRequest, request: Request, backend: BackendDep) -> LoginResponse:
    ip = client_ip(request)
    reply = await backend.auth.authenticate(
        auth_pb2.AuthenticateRequest(
            login=body.email,
            password=body.password.get_secret_value(),
            client_ip=ip,
            protocol="admin",
            mechanism="password",
            tls=request_tls(request),
            totp_code=body.totp_code or "",
        )
    )
    if reply.status == auth_pb2.AUTH_STATUS_TEMPFAIL:
        raise auth_unavailable()
    if reply.status == auth_pb2.AUTH_STATUS_SECOND_FACTOR_REQUIRED:
        raise ProblemError(401, SECOND_FACTOR, headers=BEARER)
    if reply.status != auth_pb2.AUTH_STATUS_OK:
        raise ProblemError(401, LOGIN_FAILED, headers=BEARER)
    account = await backend.directory.get_account(reply.account)
    if account is None or not account.enabled:
        raise ProblemError(401, LOGIN_FAILED, headers=BEARER)
    restricted = reply.second_factor_enrolment_required
    token = await backend.sessions.create(account.address, account.created, ip, restricted=restricted,
                                          epoch=account.session_epoch)
    await backend.events.publish("admin", "login", client_ip=ip, account=account.address, protocol="admin",
                                 reason="totp_enrolment_required" if restricted else "")
    return LoginResponse(
        token=token, expires_in=backend.sessions.ttl_seconds, account=account.address, role=account.role,
        second_factor_enrolment_required=restricted,
    )


@router.post(
    "/v1/auth/logout",
    operation_id="logout",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses={401: {"model": Problem}},
)
async def logout(principal: PrincipalDep, backend: BackendDep) -> Response:
    await backend.sessions.revoke(principal.token)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/v1/me", operation_id="getMe", response_model=AccountOut, tags=["self-service"],
            responses={401: {"model": Problem}})
async def get_me(principal: PrincipalDep, backend: BackendDep) -> AccountOut:
    account = await backend.directory.get_account(principal.address)
    if account is None:
        raise not_authenticated()
    return AccountOut(
        address=account.address,
        domain=account.domain,
        role=account.role,
        display_name=account.display_name,
        enabled=account.enabled,
        created=account.created,
        aliases=account.aliases,
    )


@router.post(
    "/v1/me/password",
    operation_id="changeMyPassword",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    tags=["self-service"],
    responses={401: {"model": Problem}, 403: {"model": Problem}, 422: {"model": Problem}, 503: {"model": Problem}},
    dependencies=[AuditReady],
)
async def change_my_password(
    body: PasswordChange, request: Request, principal: PrincipalDep, backend: BackendDep
) -> Response:
    """R-PWD-3: the old password is verified by the auth service before the new one is set."""
    new = body.new_password.get_secret_value()
    if new != body.confirm.get_secret_value():
        raise invalid(CONFIRM_MISMATCH, "confirm", "differs from new_password")
    result = await check_password(
        backend, principal.address, body.old_password.get_secret_value(), client_ip(request), request_tls(request)
    )
    if result == auth_pb2.AUTH_STATUS_TEMPFAIL:
        raise auth_unavailable()
    # SECOND_FACTOR_REQUIRED means the password matched; the session already passed 2FA.
    if result not in (auth_pb2.AUTH_STATUS_OK, auth_pb2.AUTH_STATUS_SECOND_FACTOR_REQUIRED):
        raise ProblemError(403, OLD_PASSWORD_WRONG)
    await set_password(backend, principal.address, new, field="new_password")
    # R-ADM-4: a changed password ends the account's other sessions (a thief's among them).
    await end_sessions(backend, principal.address, keep=principal.token)
    await record_change(backend, request, principal.address, "password_changed", principal.address,
                        f"account:{principal.address}", after={"password": "changed"})
    return Response(status_code=status.HTTP_204_NO_CONTENT)

