"""Domains, accounts, aliases, their scoped settings and the R-LIM-3 counters.

Superadmins manage everything; a domain admin manages its own domain's accounts and aliases
(never a superadmin account, never a role); users reach only ``/v1/me``.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter, Body, Path, Query, Request, Response
from redis.exceptions import WatchError

from rempart.admin_api.backend import (
    AdminDep,
    AuditReady,
    Backend,
    BackendDep,
    Principal,
    ProblemError,
    RedactorDep,
    SuperadminDep,
    end_sessions,
    forbidden,
    invalid,
    not_found,
    record_change,
)
from rempart.admin_api.confinement import account_or_404, check_scoped_settings, domain_or_404, visible_aliases
from rempart.admin_api.models import (
    MAX_ADDRESS,
    MAX_DOMAIN,
    MAX_LIST,
    AccountCreate,
    AccountList,
    AccountOut,
    AccountPatch,
    Counters,
    DomainCreate,
    DomainList,
    DomainOut,
    DomainPatch,
    PasswordReset,
    Problem,
    ScopedSettingsOut,
)
from rempart.admin_api.paging import CursorQuery, LimitQuery, NameFilter, containing, page_sorted
from rempart.admin_api.passwords import set_password
from rempart.admin_api.preconditions import IfMatchHeader, check_if_match, etag_of, with_etag
from rempart.admin_api.redaction import Redactor, keep_unchanged_secrets
from rempart.admin_api.scopes import read_scope, write_scope
from rempart.admin_api.settings_bodies import ScopedSettingsPatch, as_document
from rempart.common import keys
from rempart.common.config import MailSettings, deep_merge
from rempart.common.directory import Account, DirectoryError, normalize_address, split_address, valid_domain_name

log = logging.getLogger(__name__)

router = APIRouter(dependencies=[AuditReady])
DomainPath = Annotated[str, Path(min_length=1, max_length=MAX_DOMAIN)]
AddressPath = Annotated[str, Path(min_length=3, max_length=MAX_ADDRESS)]
SettingsBody = Annotated[
    ScopedSettingsPatch,  # type: ignore[valid-type]
    Body(description="This scope's overrides, replacing the stored ones (only what the scope may override)."),
]

_P = {"model": Problem}
R_READ: dict[int | str, dict[str, Any]] = {401: _P, 403: _P, 404: _P}
R_WRITE: dict[int | str, dict[str, Any]] = {401: _P, 403: _P, 404: _P, 409: _P, 412: _P, 422: _P, 503: _P}


def account_out(account: Account, principal: Principal) -> AccountOut:
    return AccountOut(
        address=account.address,
        domain=account.domain,
        role=account.role,
        display_name=account.display_name,
        enabled=account.enabled,
        created=account.created,
        aliases=visible_aliases(principal, account.aliases),
    )


async def _scoped_out(backend: Backend, redactor: Redactor, response: Response, scope: str) -> ScopedSettingsOut:
    version, doc, tag = await read_scope(backend, redactor, scope)
    with_etag(response, tag)
    return ScopedSettingsOut(scope=scope, version=version, settings=redactor.settings(doc))


async def _replace_scoped(
    backend: Backend, redactor: Redactor, response: Response, scope: str, doc: dict[str, Any], if_match: str | None,
    before: dict[str, Any] | None = None,
) -> ScopedSettingsOut:
    """PUT of a domain's or an account's overrides; secrets left out or echoed keep their value."""
    version, stored, tag = await write_scope(
        backend, redactor, scope, if_match, lambda current: keep_unchanged_secrets(doc, current, replace=True),
        before,
    )
    with_etag(response, tag)
    return ScopedSettingsOut(scope=scope, version=version, settings=redactor.settings(stored))


# Domains ------------------------------------------------------------------------------------
@router.get("/v1/domains", operation_id="listDomains", response_model=DomainList, tags=["domains"], responses=R_READ)
async def list_domains(
    principal: AdminDep,
    backend: BackendDep,
    limit: LimitQuery = MAX_LIST,
    cursor: CursorQuery = None,
    q: NameFilter = None,
) -> DomainList:
    """By name; ``q`` keeps the names that contain it."""
    domains = await backend.directory.list_domains()
    if not principal.is_superadmin:
        domains = [d for d in domains if d == principal.domain]
    shown, next_cursor = page_sorted("domains", containing(domains, q), str, cursor, limit)
    return DomainList(domains=shown, next_cursor=next_cursor)


@router.post("/v1/domains", operation_id="createDomain", response_model=DomainOut, status_code=201,
             tags=["domains"], responses=R_WRITE)
async def create_domain(
    body: DomainCreate, request: Request, principal: SuperadminDep, backend: BackendDep
) -> DomainOut:
    name = normalize_address(body.name)
    if not valid_domain_name(name):
        raise invalid("Not a domain name", "name", "not a domain name")
    if await backend.directory.canonical_domain(name) is not None:
        raise ProblemError(409, "Domain already exists")  # as a domain alias
    try:
        await backend.directory.add_domain(name, body.description)
    except DirectoryError:
        raise ProblemError(409, "Domain already exists") from None
    out = await _domain_out(backend, name)
    await record_change(backend, request, principal.address, "domain_created", name, f"domain:{name}", after=out)
    return out


async def _domain_out(backend: Backend, name: str) -> DomainOut:
    info = await backend.redis.hgetall(keys.domain(name))
    count = await backend.redis.scard(keys.domain_accounts(name))
    return DomainOut(
        name=name,
        description=str(info.get("description", "")),
        created=float(info.get("created", 0) or 0) or None,
        accounts=int(count),
    )


@router.get("/v1/domains/{domain}", operation_id="getDomain", response_model=DomainOut, tags=["domains"],
            responses=R_READ)
async def get_domain(domain: DomainPath, response: Response, principal: AdminDep, backend: BackendDep) -> DomainOut:
    out = await _domain_out(backend, await domain_or_404(backend, principal, domain))
    with_etag(response, etag_of(out))
    return out


@router.patch("/v1/domains/{domain}", operation_id="updateDomain", response_model=DomainOut, tags=["domains"],
              responses=R_WRITE)
async def update_domain(
    domain: DomainPath, body: DomainPatch, request: Request, response: Response, principal: AdminDep,
    backend: BackendDep, if_match: IfMatchHeader = None,
) -> DomainOut:
    name = await domain_or_404(backend, principal, domain)
    before = await _domain_out(backend, name)
    check_if_match(if_match, etag_of(before))
    if body.description is not None:
        await backend.redis.hset(keys.domain(name), "description", body.description)
    out = await _domain_out(backend, name)
    await record_change(backend, request, principal.address, "domain_updated", name, f"domain:{name}",
                        before=before, after=out)
    with_etag(response, etag_of(out))
    return out


@router.delete("/v1/domains/{domain}", operation_id="deleteDomain", status_code=204, response_class=Response,
               tags=["domains"], responses=R_WRITE)
async def delete_domain(
    domain: DomainPath, request: Request, principal: AdminDep, backend: BackendDep, if_match: IfMatchHeader = None
) -> Response:
    name = await domain_or_404(backend, principal, domain)
    if not principal.is_superadmin:
        raise forbidden()
    before = await _domain_out(backend, name)
    check_if_match(if_match, etag_of(before))
    try:
        await backend.directory.delete_domain(name)
    except DirectoryError:
        raise ProblemError(409, "The domain still has accounts") from None
    # What only meant something while the domain was local goes with it.
    for alias in await backend.directory.list_aliases(name):
        await backend.directory.delete_alias(alias)
    for alias_name, target in (await backend.directory.domain_aliases()).items():
        if target == name:
            await backend.directory.delete_domain_alias(alias_name)
    await backend.store.delete_doc(f"domain:{name}")
    await record_change(backend, request, principal.address, "domain_deleted", name, f"domain:{name}",
                        before=before)
    return Response(status_code=204)


@router.get("/v1/domains/{domain}/settings", operation_id="getDomainSettings", response_model=ScopedSettingsOut,
            tags=["domains"], responses=R_READ)
async def get_domain_settings(
    domain: DomainPath, response: Response, principal: AdminDep, backend: BackendDep, redactor: RedactorDep
) -> ScopedSettingsOut:
    name = await domain_or_404(backend, principal, domain)
    return await _scoped_out(backend, redactor, response, f"domain:{name}")


@router.put("/v1/domains/{domain}/settings", operation_id="putDomainSettings", response_model=ScopedSettingsOut,
            tags=["domains"], responses=R_WRITE)
async def put_domain_settings(
    domain: DomainPath, body: SettingsBody, request: Request, response: Response, principal: AdminDep,
    backend: BackendDep, redactor: RedactorDep, if_match: IfMatchHeader = None,
) -> ScopedSettingsOut:
    doc = as_document(body)
    name = await domain_or_404(backend, principal, domain)
    if not principal.is_superadmin:
        raise forbidden()  # a domain's hard limits (R-LIM-1) bind its own admins too
    scope = f"domain:{name}"
    before: dict[str, Any] = {}
    out = await _replace_scoped(backend, redactor, response, scope, doc, if_match, before)
    await record_change(backend, request, principal.address, "domain_settings_changed", name, scope,
                        kind="domain_settings", before=before, after=out.settings)
    return out


# Accounts -----------------------------------------------------------------------------------
@router.get("/v1/domains/{domain}/accounts", operation_id="listAccounts", response_model=AccountList,
            tags=["accounts"], responses=R_READ)
async def list_accounts(
    domain: DomainPath,
    principal: AdminDep,
    backend: BackendDep,
    offset: Annotated[int, Query(ge=0, le=1_000_000, deprecated=True,
                                 description="Skip this many (older clients); use cursor instead")] = 0,
    limit: LimitQuery = MAX_LIST,
    cursor: CursorQuery = None,
    q: NameFilter = None,
) -> AccountList:
    """By address; ``q`` keeps the addresses that contain it."""
    name = await domain_or_404(backend, principal, domain)
    accounts = sorted(containing(await backend.directory.list_accounts(name), q))[offset:]
    shown, next_cursor = page_sorted(f"accounts:{name}", accounts, str, cursor, limit)
    return AccountList(accounts=shown, next_cursor=next_cursor)


@router.post("/v1/domains/{domain}/accounts", operation_id="createAccount", response_model=AccountOut,
             status_code=201, tags=["accounts"], responses=R_WRITE)
async def create_account(
    domain: DomainPath, body: AccountCreate, request: Request, principal: AdminDep, backend: BackendDep
) -> AccountOut:
    name = await domain_or_404(backend, principal, domain)
    if body.role != "user" and not principal.is_superadmin:
        raise forbidden()
    address = normalize_address(body.address if "@" in body.address else f"{body.address}@{name}")
    try:
        local, addr_domain = split_address(address)
    except DirectoryError:
        raise invalid("Not an address", "address", "not an address") from None
    if addr_domain != name or not _valid_local_part(local):
        raise invalid("Not an address of this domain", "address", f"not an address in {name}")
    if await backend.directory.alias_targets(address) is not None:
        raise ProblemError(409, "An alias has this address")
    try:
        account = await backend.directory.add_account(address, body.role, body.display_name)
    except DirectoryError:
        raise ProblemError(409, "Account already exists") from None
    try:
        await set_password(backend, address, body.password.get_secret_value())
    except Exception:
        # No account may exist without the password its creator chose (R-PWD-1 refused it).
        await backend.directory.delete_account(address)
        raise
    out = account_out(account, principal)
    await record_change(backend, request, principal.address, "account_created", address, f"account:{address}",
                        after=out)
    return out


def _valid_local_part(local: str) -> bool:
    return 0 < len(local) <= 64 and all(c.isalnum() or c in "._+-'" for c in local) and ".." not in local


@router.get("/v1/accounts/{address}", operation_id="getAccount", response_model=AccountOut, tags=["accounts"],
            responses=R_READ)
async def get_account(address: AddressPath, response: Response, principal: AdminDep, backend: BackendDep) -> AccountOut:
    out = account_out(await account_or_404(backend, principal, address), principal)
    with_etag(response, etag_of(out))
    return out


@router.patch("/v1/accounts/{address}", operation_id="updateAccount", response_model=AccountOut, tags=["accounts"],
              responses=R_WRITE)
async def update_account(
    address: AddressPath, body: AccountPatch, request: Request, response: Response, principal: AdminDep,
    backend: BackendDep, if_match: IfMatchHeader = None,
) -> AccountOut:
    account = await account_or_404(backend, principal, address)
    if body.role is not None and body.role != account.role and not principal.is_superadmin:
        raise forbidden()
    if account.address == principal.address and (body.enabled is False or (body.role or account.role) != account.role):
        raise ProblemError(409, "You cannot disable or demote yourself")
    # The shared Directory has no setters for these fields yet; same hash, same field names.
    changes: dict[Any, Any] = {name: value for name, value in (
        ("enabled", None if body.enabled is None else ("1" if body.enabled else "0")),
        ("display_name", body.display_name),
        ("role", body.role),
    ) if value is not None}
    key = keys.account(account.address)
    async with backend.redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                # WATCH: the If-Match check and the write see the same account (R-ADM-2).
                await pipe.watch(key)
                current = await backend.directory.get_account(account.address)
                if current is None:
                    raise not_found("Account")
                check_if_match(if_match, etag_of(account_out(current, principal)))
                pipe.multi()  # type: ignore[no-untyped-call]
                if changes:
                    pipe.hset(key, mapping=changes)
                await pipe.execute()
                break
            except WatchError:
                continue
    updated = await backend.directory.get_account(account.address)
    if updated is None:
        raise not_found("Account")
    out = account_out(updated, principal)
    await record_change(backend, request, principal.address, "account_updated", account.address,
                        f"account:{account.address}", before=account_out(account, principal), after=out)
    with_etag(response, etag_of(out))
    return out


@router.delete("/v1/accounts/{address}", operation_id="deleteAccount", status_code=204, response_class=Response,
               tags=["accounts"], responses=R_WRITE)
async def delete_account(
    address: AddressPath, request: Request, principal: AdminDep, backend: BackendDep, if_match: IfMatchHeader = None
) -> Response:
    account = await account_or_404(backend, principal, address)
    if account.address == principal.address:
        raise ProblemError(409, "You cannot delete yourself")
    check_if_match(if_match, etag_of(account_out(account, principal)))
    await _detach_aliases(backend, principal, account)
    await backend.directory.delete_account(account.address)
    await backend.store.delete_doc(f"account:{account.address}")
    await record_change(backend, request, principal.address, "account_deleted", account.address,
                        f"account:{account.address}", before=account_out(account, principal))
    return Response(status_code=204)


@router.put("/v1/accounts/{address}/password", operation_id="resetAccountPassword", status_code=204,
            response_class=Response, tags=["accounts"], responses=R_WRITE)
async def reset_password(
    address: AddressPath, body: PasswordReset, request: Request, principal: AdminDep, backend: BackendDep
) -> Response:
    account = await account_or_404(backend, principal, address)
    await set_password(backend, account.address, body.password.get_secret_value())
    # R-ADM-4: a reset password ends the account's sessions (the caller's own excepted).
    # And its API keys (R-ADM-4).
    revoked = await end_sessions(backend, account.address,
                                 keep=principal.token if account.address == principal.address else None)
    await record_change(backend, request, principal.address, "password_reset", account.address,
                        f"account:{account.address}", after={"password": "changed"}, api_access_revoked=str(revoked))
    return Response(status_code=204)


@router.get("/v1/accounts/{address}/settings", operation_id="getAccountSettings", response_model=ScopedSettingsOut,
            tags=["accounts"], responses=R_READ)
async def get_account_settings(
    address: AddressPath, response: Response, principal: AdminDep, backend: BackendDep, redactor: RedactorDep
) -> ScopedSettingsOut:
    account = await account_or_404(backend, principal, address)
    return await _scoped_out(backend, redactor, response, f"account:{account.address}")


@router.put("/v1/accounts/{address}/settings", operation_id="putAccountSettings", response_model=ScopedSettingsOut,
            tags=["accounts"], responses=R_WRITE)
async def put_account_settings(
    address: AddressPath, body: SettingsBody, request: Request, response: Response, principal: AdminDep,
    backend: BackendDep, redactor: RedactorDep, if_match: IfMatchHeader = None,
) -> ScopedSettingsOut:
    doc = as_document(body)
    account = await account_or_404(backend, principal, address)
    await check_scoped_settings(backend, principal, doc)
    scope = f"account:{account.address}"
    before: dict[str, Any] = {}
    out = await _replace_scoped(backend, redactor, response, scope, doc, if_match, before)
    await record_change(backend, request, principal.address, "account_settings_changed", account.address, scope,
                        kind="account_settings", before=before, after=out.settings)
    return out


@router.get("/v1/accounts/{address}/counters", operation_id="getAccountCounters", response_model=Counters,
            tags=["accounts"], responses=R_READ)
async def get_counters(address: AddressPath, principal: AdminDep, backend: BackendDep) -> Counters:
    """R-LIM-3: the policy service's counter for today, in ``limits.counter_timezone``."""
    account = await account_or_404(backend, principal, address)
    server = MailSettings.model_validate(deep_merge(MailSettings().model_dump(), await backend.store.get_doc("server")))
    tz_name = server.limits.counter_timezone
    try:
        zone: dt.tzinfo = ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError):
        tz_name, zone = "UTC", dt.UTC
    day = dt.datetime.now(zone).strftime("%Y-%m-%d")
    raw = await backend.redis.get(keys.sent_external(account.address, day))
    return Counters(address=account.address, day=day, timezone=tz_name, sent_external=int(raw or 0))


async def _detach_aliases(backend: Backend, principal: Principal, account: Account) -> None:
    """Before an account goes: each alias forwarding to it loses that target. An alias left with
    none is deleted when it is the caller's; another tenant's is left empty (an unknown recipient
    until its own admin edits it), never deleted by someone who may not see it."""
    for alias in account.aliases:
        targets = await backend.directory.alias_targets(alias)
        if targets is None:
            continue
        remaining = [t for t in targets if t != account.address]
        if not remaining and principal.can_manage_domain(alias.rpartition("@")[2]):
            await backend.directory.delete_alias(alias)
        else:
            await backend.directory.set_alias_targets(alias, remaining)
