"""Login, logout and self-service (R-LOG-4, R-LOG-5, R-PWD-3)."""

from __future__ import annotations

import logging
import time
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response, status

from rempart.admin_api.apikeys import ID_HEX, MAX_KEYS, ApiKey
from rempart.admin_api.backend import (
    BEARER,
    AdminDep,
    AuditReady,
    BackendDep,
    Principal,
    PrincipalDep,
    ProblemError,
    api_keys,
    client_ip,
    end_sessions,
    invalid,
    not_authenticated,
    not_found,
    record_action,
    record_change,
)
from rempart.admin_api.confinement import domain_or_404
from rempart.admin_api.models import (
    MAX_KEY_DAYS,
    AccountOut,
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyList,
    ApiKeyOut,
    LoginRequest,
    LoginResponse,
    PasswordChange,
    Problem,
)
from rempart.admin_api.paging import DEFAULT_LIMIT, CursorQuery, LimitQuery, decode_score_cursor, encode_cursor
from rempart.admin_api.passwords import auth_unavailable, check_password, request_tls, set_password
from rempart.common.pb.auth.v1 import auth_pb2

log = logging.getLogger(__name__)

# R-LOG-4: one answer for an unknown user, a wrong password, a locked or IP-restricted account.
LOGIN_FAILED = "Unknown user or incorrect password"
SECOND_FACTOR = "A valid TOTP code is required"
OLD_PASSWORD_WRONG = "The old password is incorrect"  # noqa: S105 - a message
CONFIRM_MISMATCH = "The new password and its confirmation differ"

router = APIRouter(tags=["auth"])
_P: dict[str, object] = {"model": Problem}
KEY_SCAN_BUDGET = 5000
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
    # Its API keys too: they were perhaps made by that thief.
    revoked = await end_sessions(backend, principal.address, keep=principal.token)
    await record_change(backend, request, principal.address, "password_changed", principal.address,
                        f"account:{principal.address}", after={"password": "changed"},
                        api_access_revoked=str(revoked))
    return Response(status_code=status.HTTP_204_NO_CONTENT)



# API keys (R-ADM-1, R-ADM-3) ----------------------------------------------------------------
R_KEYS: dict[int | str, dict[str, object]] = {401: _P, 403: _P, 404: _P, 409: _P, 422: _P, 503: _P}
KeyIdPath = Annotated[str, Path(min_length=ID_HEX, max_length=ID_HEX, pattern=r"^[0-9a-f]+$")]
TOO_MANY_KEYS = "Too many API keys: revoke some first"
KEY_EXPIRY_PAST = "must be in the future"


def key_out(key: ApiKey) -> ApiKeyOut:
    return ApiKeyOut(
        id=key.id, name=key.name, owner=key.owner, scope=key.scope, domain=key.domain or None,
        created=key.created,  # type: ignore[arg-type]
        expires_at=key.expires or None,  # type: ignore[arg-type]
        expired=key.expired(time.time()),
        last_used=key.last_used or None,  # type: ignore[arg-type]
        last_ip=key.last_ip or None,
    )


def _visible(principal: Principal, key: ApiKey) -> bool:
    return principal.is_superadmin or (bool(key.domain) and principal.can_manage_domain(key.domain))


@router.post("/v1/api-keys", operation_id="createApiKey", response_model=ApiKeyCreated, status_code=201,
             tags=["api-keys"], responses=R_KEYS, dependencies=[AuditReady],
             summary="Make an API key; the key is shown once")
async def create_api_key(
    body: ApiKeyCreate, request: Request, principal: AdminDep, backend: BackendDep
) -> ApiKeyCreated:
    """Signed in with a session only (a key does not make keys). A domain admin's key is
    confined to its domain; a superadmin may confine one to any domain. What the key may do is
    checked on every use against what its creator may do then (R-ADM-1)."""
    domain = ""
    if body.domain is not None and body.domain.strip():
        domain = await domain_or_404(backend, principal, body.domain)
    if not principal.is_superadmin:
        domain = principal.domain
    expires = 0.0
    if body.expires_at is not None:
        if body.expires_at.tzinfo is None:
            raise invalid("A time needs its offset (RFC 3339)", "expires_at", "no time zone offset")
        expires = body.expires_at.timestamp()
        if expires <= time.time():
            raise invalid("The expiry is in the past", "expires_at", KEY_EXPIRY_PAST)
        if expires > time.time() + MAX_KEY_DAYS * 86400:
            raise invalid("The expiry is too far", "expires_at", f"at most {MAX_KEY_DAYS} days ahead")
    store = api_keys(request)
    if await store.count() >= MAX_KEYS:
        raise ProblemError(409, TOO_MANY_KEYS)
    owner = await backend.directory.get_account(principal.address)
    if owner is None:
        raise not_authenticated()
    token, key = await store.create(name=body.name, owner=owner.address, owner_created=owner.created,
                                    owner_epoch=owner.session_epoch, scope=body.scope, domain=domain, expires=expires)
    out = key_out(key)
    try:
        await record_action(backend, request, principal.address, "api_key_created", key.id, kind="api_key",
                            domain=domain, after=out)
    except Exception:
        await store.revoke(key.id)  # never a live key without its audit record
        raise
    return ApiKeyCreated(key=token, **out.model_dump())


@router.get("/v1/api-keys", operation_id="listApiKeys", response_model=ApiKeyList, tags=["api-keys"],
            responses=R_KEYS)
async def list_api_keys(request: Request, principal: AdminDep, limit: LimitQuery = DEFAULT_LIMIT,
                        cursor: CursorQuery = None) -> ApiKeyList:
    """Oldest first; never the key. A superadmin sees every key, a domain admin its domain's."""
    after = decode_score_cursor("api-keys", cursor)
    store = api_keys(request)
    shown: list[ApiKey] = []
    scanned = 0
    while len(shown) < limit and scanned < KEY_SCAN_BUDGET:
        batch = await store.page(after, min(limit * 2, KEY_SCAN_BUDGET))
        if not batch:
            break
        scanned += len(batch)
        for key in batch:
            after = (key.created, key.id)
            if _visible(principal, key):
                shown.append(key)
                if len(shown) == limit:
                    break
    more = bool(await store.page(after, 1)) if after is not None else False
    next_cursor = encode_cursor("api-keys", f"{after[0]!r} {after[1]}") if more and after is not None else None
    return ApiKeyList(api_keys=[key_out(k) for k in shown], next_cursor=next_cursor)


async def _key_or_404(request: Request, principal: Principal, key_id: str) -> ApiKey:
    key = await api_keys(request).get(key_id)
    if key is None or not _visible(principal, key):
        raise not_found("API key")
    return key


@router.get("/v1/api-keys/{key_id}", operation_id="getApiKey", response_model=ApiKeyOut, tags=["api-keys"],
            responses=R_KEYS)
async def get_api_key(key_id: KeyIdPath, request: Request, principal: AdminDep) -> ApiKeyOut:
    return key_out(await _key_or_404(request, principal, key_id))


@router.delete("/v1/api-keys/{key_id}", operation_id="revokeApiKey", status_code=204, response_class=Response,
               tags=["api-keys"], responses=R_KEYS, dependencies=[AuditReady])
async def revoke_api_key(key_id: KeyIdPath, request: Request, principal: AdminDep, backend: BackendDep) -> Response:
    """At once: the next request with the key is a 401."""
    key = await _key_or_404(request, principal, key_id)
    if not await api_keys(request).revoke(key.id):
        raise not_found("API key")
    await record_action(backend, request, principal.address, "api_key_revoked", key.id, kind="api_key",
                        domain=key.domain, before=key_out(key))
    return Response(status_code=204)
