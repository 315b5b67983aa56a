"""Helpdesk (R-ADM-4): what an administrator does for a user who is stuck or compromised.

Unlock a locked account, turn two-step verification off when the phone is lost, revoke app
passwords and end sessions. The auth service owns lockout, TOTP and app passwords, so the first
three are calls to it; sessions are the admin API's own. Who may: the superadmin, and a domain
admin for its own domain's accounts (R-ADM-1: another tenant's account is a 404).

A 2FA reset also ends the account's sessions and deletes its API keys: it is what one does
after a lost or stolen phone. Ending sessions deletes the account's API keys as well.
Nobody resets their own 2FA here: that needs a current code (``DELETE /v1/me/totp``), so that a
stolen session cannot switch it off.
"""

from __future__ import annotations

from typing import Annotated, Any

import grpc
from fastapi import APIRouter, Path, Request, Response

from rempart.admin_api.backend import (
    AdminDep,
    AuditReady,
    Backend,
    BackendDep,
    ProblemError,
    end_sessions,
    not_found,
    record_change,
)
from rempart.admin_api.confinement import account_or_404
from rempart.admin_api.models import (
    MAX_ADDRESS,
    MAX_APP_NAME,
    AppPasswordList,
    AppPasswordOut,
    AppPasswordsRevoked,
    Problem,
    TotpResetResult,
    UnlockResult,
)
from rempart.admin_api.passwords import auth_unavailable
from rempart.common.directory import Account

router = APIRouter(tags=["helpdesk"], dependencies=[AuditReady])
AddressPath = Annotated[str, Path(min_length=3, max_length=MAX_ADDRESS)]
AppNamePath = Annotated[str, Path(min_length=1, max_length=MAX_APP_NAME)]
_P = {"model": Problem}
R_HELP: dict[int | str, dict[str, Any]] = {401: _P, 403: _P, 404: _P, 503: _P}
OWN_TOTP = "Turn off your own two-step verification with a current code: DELETE /v1/me/totp"


def _failed(exc: grpc.aio.AioRpcError) -> ProblemError:
    # NOT_FOUND: the account went away between our lookup and the call.
    return not_found("Account") if exc.code() == grpc.StatusCode.NOT_FOUND else auth_unavailable()


async def _audit(backend: Backend, request: Request, actor: str, what: str, account: Account, **result: str) -> None:
    """A helpdesk action, recorded the one way every admin write is (R-ADM-5)."""
    await record_change(backend, request, actor, what, account.address, f"account:{account.address}", **result)


@router.post("/v1/accounts/{address}/unlock", operation_id="unlockAccount", response_model=UnlockResult,
             responses=R_HELP, summary="End a login lock (R-LOG-1) and forget the recent failures")
async def unlock_account(
    address: AddressPath, request: Request, principal: AdminDep, backend: BackendDep
) -> UnlockResult:
    account = await account_or_404(backend, principal, address)
    try:
        reply = await backend.auth.unlock(account.address)
    except grpc.aio.AioRpcError as exc:
        raise _failed(exc) from None
    await _audit(backend, request, principal.address, "account_unlocked", account,
                 was_locked=str(reply.was_locked).lower())
    return UnlockResult(account=account.address, was_locked=reply.was_locked)


@router.delete("/v1/accounts/{address}/totp", operation_id="resetAccountTotp", response_model=TotpResetResult,
               responses=R_HELP,
               summary="Turn the user's two-step verification off without a code; ends sessions and API keys")
async def reset_account_totp(
    address: AddressPath, request: Request, principal: AdminDep, backend: BackendDep
) -> TotpResetResult:
    account = await account_or_404(backend, principal, address)
    if account.address == principal.address:
        raise ProblemError(403, OWN_TOTP)
    try:
        reply = await backend.auth.totp_reset(account.address)
    except grpc.aio.AioRpcError as exc:
        raise _failed(exc) from None
    revoked = await end_sessions(backend, account.address)
    await _audit(backend, request, principal.address, "totp_reset", account,
                 was_enabled=str(reply.was_enabled).lower(), api_access_revoked=str(revoked))
    return TotpResetResult(account=account.address, was_enabled=reply.was_enabled)


@router.get("/v1/accounts/{address}/app-passwords", operation_id="listAccountAppPasswords",
            response_model=AppPasswordList, responses=R_HELP)
async def list_account_app_passwords(address: AddressPath, principal: AdminDep, backend: BackendDep) -> AppPasswordList:
    account = await account_or_404(backend, principal, address)
    try:
        reply = await backend.auth.app_password_list(account.address)
    except grpc.aio.AioRpcError as exc:
        raise _failed(exc) from None
    return AppPasswordList(app_passwords=[
        AppPasswordOut(name=e.name, created=e.created, last_used=e.last_used or None) for e in reply.app_passwords
    ])


@router.delete("/v1/accounts/{address}/app-passwords", operation_id="revokeAccountAppPasswords",
               response_model=AppPasswordsRevoked, responses=R_HELP, summary="Revoke every app password")
async def revoke_account_app_passwords(
    address: AddressPath, request: Request, principal: AdminDep, backend: BackendDep
) -> AppPasswordsRevoked:
    account = await account_or_404(backend, principal, address)
    try:
        reply = await backend.auth.app_password_revoke_all(account.address)
    except grpc.aio.AioRpcError as exc:
        raise _failed(exc) from None
    await _audit(backend, request, principal.address, "app_passwords_revoked", account, revoked=str(reply.revoked))
    return AppPasswordsRevoked(account=account.address, revoked=reply.revoked)


@router.delete("/v1/accounts/{address}/app-passwords/{name}", operation_id="revokeAccountAppPassword",
               status_code=204, response_class=Response, responses=R_HELP)
async def revoke_account_app_password(
    address: AddressPath, name: AppNamePath, request: Request, principal: AdminDep, backend: BackendDep
) -> Response:
    account = await account_or_404(backend, principal, address)
    try:
        reply = await backend.auth.app_password_revoke(account.address, name)
    except grpc.aio.AioRpcError as exc:
        raise _failed(exc) from None
    if not reply.found:
        raise not_found("App password")
    await _audit(backend, request, principal.address, "app_password_revoked", account, app=name)
    return Response(status_code=204)


@router.delete("/v1/accounts/{address}/sessions", operation_id="endAccountSessions", status_code=204,
               response_class=Response, responses=R_HELP,
               summary="End every admin API session of the account and delete its API keys")
async def end_account_sessions(
    address: AddressPath, request: Request, principal: AdminDep, backend: BackendDep
) -> Response:
    account = await account_or_404(backend, principal, address)
    revoked = await end_sessions(backend, account.address)
    await _audit(backend, request, principal.address, "sessions_ended", account, api_access_revoked=str(revoked))
    return Response(status_code=204)
