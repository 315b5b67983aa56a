"""Aliases and domain aliases (R-DOM-2), confined like every resource (R-ADM-1).

A domain admin lists, creates, edits and deletes the aliases of its domain, whose targets are
its own addresses or remote ones. Domain aliases make a new name local, so only a superadmin
creates or deletes them (a domain admin could otherwise claim ``gmail.com``); a domain admin
sees the ones that point at its domain. Deleting one names it, so a domain admin gets 404 for
another tenant's and 403 for its own.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response

from rempart.admin_api.backend import (
    AdminDep,
    AuditReady,
    Backend,
    BackendDep,
    Principal,
    ProblemError,
    SuperadminDep,
    forbidden,
    invalid,
    not_found,
    record_change,
)
from rempart.admin_api.confinement import alias_address, checked_targets, domain_or_404
from rempart.admin_api.models import (
    MAX_ADDRESS,
    MAX_DOMAIN,
    MAX_LIST,
    AliasCreate,
    AliasList,
    AliasOut,
    AliasTargets,
    DomainAliasCreate,
    DomainAliasList,
    DomainAliasOut,
    Problem,
)
from rempart.admin_api.paging import CursorQuery, LimitQuery, NameFilter, containing, page_sorted
from rempart.admin_api.preconditions import IfMatchHeader, check_if_match, etag_of, with_etag
from rempart.common.directory import DirectoryError, normalize_address, valid_domain_name

router = APIRouter(dependencies=[AuditReady])
DomainPath = Annotated[str, Path(min_length=1, max_length=MAX_DOMAIN)]
AliasPath = Annotated[str, Path(min_length=3, max_length=MAX_ADDRESS)]
DomainAliasPath = Annotated[str, Path(min_length=1, max_length=MAX_DOMAIN)]

_P = {"model": Problem}
R_READ: dict[int | str, dict[str, Any]] = {401: _P, 403: _P, 404: _P}
R_WRITE: dict[int | str, dict[str, Any]] = {401: _P, 403: _P, 404: _P, 409: _P, 412: _P, 422: _P, 503: _P}


# Aliases ------------------------------------------------------------------------------------
@router.get("/v1/domains/{domain}/aliases", operation_id="listAliases", response_model=AliasList,
            tags=["aliases"], responses=R_READ)
async def list_aliases(
    domain: DomainPath,
    principal: AdminDep,
    backend: BackendDep,
    limit: LimitQuery = MAX_LIST,
    cursor: CursorQuery = None,
    q: NameFilter = None,
) -> AliasList:
    """By address; ``q`` keeps the aliases whose address contains it."""
    name = await domain_or_404(backend, principal, domain)
    names = containing(await backend.directory.list_aliases(name), q)
    shown, next_cursor = page_sorted(f"aliases:{name}", names, str, cursor, limit)
    out = []
    for alias in shown:
        targets = await backend.directory.alias_targets(alias)
        if targets is not None:
            out.append(AliasOut(alias=alias, targets=targets))
    return AliasList(aliases=out, next_cursor=next_cursor)


@router.post("/v1/aliases", operation_id="createAlias", response_model=AliasOut, status_code=201, tags=["aliases"],
             responses=R_WRITE)
async def create_alias(body: AliasCreate, request: Request, principal: AdminDep, backend: BackendDep) -> AliasOut:
    alias, domain = alias_address(principal, body.alias, "Domain", "body")
    if domain not in await backend.directory.list_domains():
        raise not_found("Domain")
    targets = await checked_targets(backend, principal, body.targets, "targets")
    if await backend.directory.alias_targets(alias) is not None:
        raise ProblemError(409, "Alias already exists")
    try:
        await backend.directory.add_alias(alias, targets)
    except DirectoryError:
        raise ProblemError(409, "An account has this address") from None
    out = AliasOut(alias=alias, targets=await backend.directory.alias_targets(alias) or [])
    await record_change(backend, request, principal.address, "alias_created", alias, f"alias:{alias}", after=out)
    return out


@router.get("/v1/aliases/{alias}", operation_id="getAlias", response_model=AliasOut, tags=["aliases"],
            responses=R_READ)
async def get_alias(alias: AliasPath, response: Response, principal: AdminDep, backend: BackendDep) -> AliasOut:
    address, _ = alias_address(principal, alias)
    out = await _alias_or_404(backend, address)
    with_etag(response, etag_of(out))
    return out


async def _alias_or_404(backend: Backend, address: str) -> AliasOut:
    targets = await backend.directory.alias_targets(address)
    if targets is None:
        raise not_found("Alias")
    return AliasOut(alias=address, targets=targets)


@router.put("/v1/aliases/{alias}", operation_id="replaceAliasTargets", response_model=AliasOut, tags=["aliases"],
            responses=R_WRITE)
async def replace_alias_targets(
    alias: AliasPath, body: AliasTargets, request: Request, response: Response, principal: AdminDep,
    backend: BackendDep, if_match: IfMatchHeader = None,
) -> AliasOut:
    address, _ = alias_address(principal, alias)
    before = await _alias_or_404(backend, address)
    check_if_match(if_match, etag_of(before))
    targets = await checked_targets(backend, principal, body.targets, "targets")
    await backend.directory.set_alias_targets(address, targets)
    out = await _alias_or_404(backend, address)
    await record_change(backend, request, principal.address, "alias_updated", address, f"alias:{address}",
                        before=before, after=out)
    with_etag(response, etag_of(out))
    return out


@router.delete("/v1/aliases/{alias}", operation_id="deleteAlias", status_code=204, response_class=Response,
               tags=["aliases"], responses=R_WRITE)
async def delete_alias(
    alias: AliasPath, request: Request, principal: AdminDep, backend: BackendDep, if_match: IfMatchHeader = None
) -> Response:
    address, _ = alias_address(principal, alias)
    before = await _alias_or_404(backend, address)
    check_if_match(if_match, etag_of(before))
    if await backend.directory.delete_alias(address) is None:
        raise not_found("Alias")
    await record_change(backend, request, principal.address, "alias_deleted", address, f"alias:{address}",
                        before=before)
    return Response(status_code=204)


# Domain aliases -----------------------------------------------------------------------------
@router.get("/v1/domains/{domain}/domain-aliases", operation_id="listDomainAliases", response_model=DomainAliasList,
            tags=["domains"], responses=R_READ)
async def list_domain_aliases(
    domain: DomainPath,
    principal: AdminDep,
    backend: BackendDep,
    limit: LimitQuery = MAX_LIST,
    cursor: CursorQuery = None,
    q: NameFilter = None,
) -> DomainAliasList:
    name = await domain_or_404(backend, principal, domain)
    mine = [alias_name for alias_name, target in (await backend.directory.domain_aliases()).items() if target == name]
    found = [DomainAliasOut(name=alias_name, target=name) for alias_name in containing(mine, q)]
    shown, next_cursor = page_sorted(f"domain-aliases:{name}", found, lambda d: d.name, cursor, limit)
    return DomainAliasList(domain_aliases=shown, next_cursor=next_cursor)


async def _domain_alias_or_404(backend: Backend, principal: Principal, name: str) -> DomainAliasOut:
    name = normalize_address(name)
    target = (await backend.directory.domain_aliases()).get(name)
    if target is None or not principal.can_manage_domain(target):
        raise not_found("Domain alias")
    return DomainAliasOut(name=name, target=target)


@router.get("/v1/domain-aliases/{domain_alias}", operation_id="getDomainAlias", response_model=DomainAliasOut,
            tags=["domains"], responses=R_READ)
async def get_domain_alias(
    domain_alias: DomainAliasPath, response: Response, principal: AdminDep, backend: BackendDep
) -> DomainAliasOut:
    out = await _domain_alias_or_404(backend, principal, domain_alias)
    with_etag(response, etag_of(out))
    return out


@router.put("/v1/domain-aliases/{domain_alias}", operation_id="putDomainAlias", response_model=DomainAliasOut,
            tags=["domains"], responses=R_WRITE)
async def put_domain_alias(
    domain_alias: DomainAliasPath, body: DomainAliasCreate, request: Request, response: Response,
    principal: SuperadminDep, backend: BackendDep, if_match: IfMatchHeader = None,
) -> DomainAliasOut:
    # Superadmin only, refused before anything is looked up: a new local name is a server-wide
    # decision, and a domain admin learns nothing about which names exist.
    name = normalize_address(domain_alias)
    target = await domain_or_404(backend, principal, body.target)
    if not valid_domain_name(name):
        raise invalid("Not a domain name", "domain_alias", "not a domain name", "path")
    if name in await backend.directory.list_domains():
        raise ProblemError(409, "A domain has this name")
    existing = (await backend.directory.domain_aliases()).get(name)
    check_if_match(if_match, None if existing is None else etag_of(DomainAliasOut(name=name, target=existing)))
    await backend.directory.add_domain_alias(name, target)
    out = DomainAliasOut(name=name, target=target)
    await record_change(backend, request, principal.address, "domain_alias_set", name, f"domain:{target}",
                        kind="domain_alias", before=None if existing is None else {"name": name, "target": existing},
                        after=out)
    with_etag(response, etag_of(out))
    return out


@router.delete("/v1/domain-aliases/{domain_alias}", operation_id="deleteDomainAlias", status_code=204,
               response_class=Response, tags=["domains"], responses=R_WRITE)
async def delete_domain_alias(
    domain_alias: DomainAliasPath, request: Request, principal: AdminDep, backend: BackendDep,
    if_match: IfMatchHeader = None,
) -> Response:
    found = await _domain_alias_or_404(backend, principal, domain_alias)
    if not principal.is_superadmin:
        raise forbidden()
    check_if_match(if_match, etag_of(found))
    await backend.directory.delete_domain_alias(found.name)
    await record_change(backend, request, principal.address, "domain_alias_deleted", found.name,
                        f"domain:{found.target}", kind="domain_alias", before=found)
    return Response(status_code=204)
