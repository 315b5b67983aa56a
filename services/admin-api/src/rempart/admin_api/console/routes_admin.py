"""Administration of the directory: domains, accounts, aliases and the helpdesk (R-ADM-1, R-ADM-4).

Every action is the API route's own function (:func:`rempart.admin_api.console.calls.call`
runs the role check it declares), so a domain admin is confined here exactly as in the API:
another tenant's domain, account or alias is a 404 page, a superadmin's account a 403. Edit
forms carry the ETag of what they showed and send it as If-Match (R-ADM-2): a change made by
someone else in between is a 412, shown with the fresh state, never silently overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from rempart.admin_api import routes_aliases, routes_directory, routes_helpdesk
from rempart.admin_api.backend import ProblemError, not_found, require_admin
from rempart.admin_api.console.calls import call
from rempart.admin_api.console.forms import Form
from rempart.admin_api.console.web import (
    ConsoleRoute,
    Failure,
    Redirect,
    Visit,
    done,
    failure_of,
    page,
    posted,
    signed_in,
)
from rempart.admin_api.models import (
    MAX_ADDRESS,
    MAX_APP_NAME,
    MAX_DOMAIN,
    MAX_LIST,
    AccountCreate,
    AccountOut,
    AccountPatch,
    AliasCreate,
    AliasTargets,
    DomainCreate,
    DomainPatch,
    PasswordReset,
)

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)
ACCOUNT_FIELDS = {"address": "Address", "password": "Password", "display_name": "Display name", "role": "Role"}
ALIAS_FIELDS = {"alias": "Alias", "targets": "Delivers to"}
DOMAIN_FIELDS = {"name": "Domain name", "description": "Description"}
ROLES = ("user", "domain_admin", "superadmin")


async def admin_visit(request: Request) -> Visit:
    """A signed-in administrator (the API's ``require_admin``); a user gets a 403 page."""
    visit = await signed_in(request)
    await require_admin(visit.principal)
    return visit


def bounded(value: str, longest: int, what: str) -> str:
    """A path segment as the API's path parameters bound it; longer is not found."""
    if not 0 < len(value) <= longest:
        raise not_found(what)
    return value


def etag_of(response: Response) -> str:
    return response.headers.get("etag", "")


def if_match(form: Form) -> str | None:
    return form.get("etag") or None


def lines(text: str) -> list[str]:
    """A textarea of addresses: one per line (commas too), blanks dropped."""
    return [part.strip() for line in text.splitlines() for part in line.split(",") if part.strip()]


# Domains --------------------------------------------------------------------------------------
@router.get("/admin")
async def admin_home(request: Request) -> Response:
    await admin_visit(request)
    raise Redirect("/admin/domains")


async def _domains_page(visit: Visit, failure: Failure | None = None) -> Response:
    listing = await call(routes_directory.list_domains, principal=visit.principal, backend=visit.backend)
    domains = [await call(routes_directory.get_domain, domain=name, response=Response(), principal=visit.principal,
                          backend=visit.backend) for name in listing.domains]
    return page(visit.request, "domains.html", failure.status if failure else 200, visit, domains=domains,
                failure=failure, labels=DOMAIN_FIELDS)


@router.get("/admin/domains")
async def domains_page(request: Request) -> Response:
    return await _domains_page(await admin_visit(request))


@router.post("/admin/domains")
async def create_domain(request: Request) -> Response:
    visit = await admin_visit(request)
    form = await posted(visit)
    try:
        body = DomainCreate(name=form.get("name").strip(), description=form.get("description").strip())
        created = await call(routes_directory.create_domain, body=body, request=request, principal=visit.principal,
                             backend=visit.backend)
    except (ValidationError, ProblemError) as exc:
        failure = failure_of(exc)
        if failure is None:
            raise
        return await _domains_page(visit, failure)
    return done(f"/admin/domains/{created.name}", "domain_created")


@dataclass(frozen=True)
class AccountRow:
    address: str
    account: AccountOut | None  # None: a superadmin, which a domain admin may not open


async def _domain_page(visit: Visit, domain: str, failure: Failure | None = None,
                       labels: dict[str, str] | None = None) -> Response:
    principal, backend = visit.principal, visit.backend
    response = Response()
    info = await call(routes_directory.get_domain, domain=domain, response=response, principal=principal,
                      backend=backend)
    addresses = await call(routes_directory.list_accounts, domain=info.name, principal=principal, backend=backend,
                           offset=0, limit=MAX_LIST)
    rows = []
    for address in addresses.accounts:
        try:
            account = await call(routes_directory.get_account, address=address, response=Response(),
                                 principal=principal, backend=backend)
        except ProblemError as exc:
            if exc.status != 403:
                raise
            account = None
        rows.append(AccountRow(address, account))
    aliases = await call(routes_aliases.list_aliases, domain=info.name, principal=principal, backend=backend)
    roles = ROLES if visit.is_superadmin else ("user",)
    return page(visit.request, "domain.html", failure.status if failure else 200, visit, domain=info,
                etag=etag_of(response), accounts=rows, aliases=aliases.aliases, roles=roles, failure=failure,
                labels=labels or {})


@router.get("/admin/domains/{domain}")
async def domain_page(request: Request, domain: str) -> Response:
    return await _domain_page(await admin_visit(request), bounded(domain, MAX_DOMAIN, "Domain"))


@router.post("/admin/domains/{domain}")
async def update_domain(request: Request, domain: str) -> Response:
    visit = await admin_visit(request)
    domain = bounded(domain, MAX_DOMAIN, "Domain")
    form = await posted(visit)
    try:
        body = DomainPatch(description=form.get("description").strip())
        updated = await call(routes_directory.update_domain, domain=domain, body=body, request=request,
                             response=Response(), principal=visit.principal, backend=visit.backend,
                             if_match=if_match(form))
    except (ValidationError, ProblemError) as exc:
        failure = failure_of(exc, frozenset({403, 412, 422}))
        if failure is None:
            raise
        return await _domain_page(visit, domain, failure, DOMAIN_FIELDS)
    return done(f"/admin/domains/{updated.name}", "domain_updated")


@router.post("/admin/domains/{domain}/delete")
async def delete_domain(request: Request, domain: str) -> Response:
    visit = await admin_visit(request)
    domain = bounded(domain, MAX_DOMAIN, "Domain")
    form = await posted(visit)
    try:
        await call(routes_directory.delete_domain, domain=domain, request=request, principal=visit.principal,
                   backend=visit.backend, if_match=if_match(form))
    except ProblemError as exc:
        failure = failure_of(exc, frozenset({403, 409, 412}))
        if failure is None:
            raise
        return await _domain_page(visit, domain, failure)
    return done("/admin/domains", "domain_deleted")


@router.post("/admin/domains/{domain}/accounts")
async def create_account(request: Request, domain: str) -> Response:
    visit = await admin_visit(request)
    domain = bounded(domain, MAX_DOMAIN, "Domain")
    form = await posted(visit)
    try:
        body = AccountCreate(address=form.get("address").strip(), password=form.get("password"),
                             role=form.get("role", "user"), display_name=form.get("display_name").strip())
        created = await call(routes_directory.create_account, domain=domain, body=body, request=request,
                             principal=visit.principal, backend=visit.backend)
    except (ValidationError, ProblemError) as exc:
        failure = failure_of(exc, frozenset({403, 409, 422}))
        if failure is None:
            raise
        return await _domain_page(visit, domain, failure, ACCOUNT_FIELDS)
    return done(f"/admin/accounts/{created.address}", "account_created")


@router.post("/admin/domains/{domain}/aliases")
async def create_alias(request: Request, domain: str) -> Response:
    visit = await admin_visit(request)
    domain = bounded(domain, MAX_DOMAIN, "Domain")
    form = await posted(visit)
    alias = form.get("alias").strip()
    if alias and "@" not in alias:
        alias = f"{alias}@{domain}"
    try:
        body = AliasCreate(alias=alias, targets=lines(form.get("targets")))
        created = await call(routes_aliases.create_alias, body=body, request=request, principal=visit.principal,
                             backend=visit.backend)
    except (ValidationError, ProblemError) as exc:
        failure = failure_of(exc)
        if failure is None:
            raise
        return await _domain_page(visit, domain, failure, ALIAS_FIELDS)
    return done(f"/admin/aliases/{created.alias}", "alias_created")


# Accounts and the helpdesk (R-ADM-4) -------------------------------------------------------------
async def _account_page(visit: Visit, address: str, failure: Failure | None = None,
                        labels: dict[str, str] | None = None) -> Response:
    principal, backend = visit.principal, visit.backend
    response = Response()
    account = await call(routes_directory.get_account, address=address, response=response, principal=principal,
                         backend=backend)
    counters = await call(routes_directory.get_counters, address=account.address, principal=principal,
                          backend=backend)
    app_passwords = await call(routes_helpdesk.list_account_app_passwords, address=account.address,
                               principal=principal, backend=backend)
    return page(visit.request, "account_admin.html", failure.status if failure else 200, visit, account=account,
                etag=etag_of(response), counters=counters, app_passwords=app_passwords.app_passwords,
                roles=ROLES if visit.is_superadmin else (), failure=failure, labels=labels or {},
                is_self=account.address == principal.address)


def _address(address: str) -> str:
    return bounded(address, MAX_ADDRESS, "Account")


@router.get("/admin/accounts/{address}")
async def account_page(request: Request, address: str) -> Response:
    return await _account_page(await admin_visit(request), _address(address))


@router.post("/admin/accounts/{address}")
async def update_account(request: Request, address: str) -> Response:
    visit = await admin_visit(request)
    address = _address(address)
    form = await posted(visit)
    try:
        role = form.get("role") or None
        body = AccountPatch(display_name=form.get("display_name").strip(), enabled=form.has("enabled"),
                            role=role)
        await call(routes_directory.update_account, address=address, body=body, request=request,
                   response=Response(), principal=visit.principal, backend=visit.backend, if_match=if_match(form))
    except (ValidationError, ProblemError) as exc:
        failure = failure_of(exc, frozenset({403, 409, 412, 422}))
        if failure is None:
            raise
        return await _account_page(visit, address, failure, ACCOUNT_FIELDS)
    return done(f"/admin/accounts/{address}", "account_updated")


@router.post("/admin/accounts/{address}/password")
async def reset_password(request: Request, address: str) -> Response:
    visit = await admin_visit(request)
    address = _address(address)
    form = await posted(visit)
    try:
        body = PasswordReset(password=form.get("password"))
        await call(routes_directory.reset_password, address=address, body=body, request=request,
                   principal=visit.principal, backend=visit.backend)
    except (ValidationError, ProblemError) as exc:
        failure = failure_of(exc, frozenset({403, 422}))
        if failure is None:
            raise
        return await _account_page(visit, address, failure, ACCOUNT_FIELDS)
    return done(f"/admin/accounts/{address}", "password_reset")


@router.post("/admin/accounts/{address}/unlock")
async def unlock(request: Request, address: str) -> Response:
    visit = await admin_visit(request)
    address = _address(address)
    await posted(visit)
    result = await call(routes_helpdesk.unlock_account, address=address, request=request, principal=visit.principal,
                        backend=visit.backend)
    return done(f"/admin/accounts/{result.account}", "unlocked" if result.was_locked else "not_locked")


@router.post("/admin/accounts/{address}/totp-reset")
async def reset_totp(request: Request, address: str) -> Response:
    visit = await admin_visit(request)
    address = _address(address)
    await posted(visit)
    try:
        result = await call(routes_helpdesk.reset_account_totp, address=address, request=request,
                            principal=visit.principal, backend=visit.backend)
    except ProblemError as exc:
        failure = failure_of(exc, frozenset({403}))
        if failure is None:
            raise
        return await _account_page(visit, address, failure)
    return done(f"/admin/accounts/{result.account}", "totp_reset" if result.was_enabled else "totp_was_off")


@router.post("/admin/accounts/{address}/app-passwords/revoke")
async def revoke_app_passwords(request: Request, address: str) -> Response:
    """One app password when the form names it, every one otherwise."""
    visit = await admin_visit(request)
    address = _address(address)
    form = await posted(visit)
    name = form.get("name")
    try:
        if name:
            if len(name) > MAX_APP_NAME:
                raise not_found("App password")
            await call(routes_helpdesk.revoke_account_app_password, address=address, name=name, request=request,
                       principal=visit.principal, backend=visit.backend)
        else:
            await call(routes_helpdesk.revoke_account_app_passwords, address=address, request=request,
                       principal=visit.principal, backend=visit.backend)
    except ProblemError as exc:
        failure = failure_of(exc, frozenset({404}))
        if failure is None or failure.detail != "App password not found":
            raise
        return await _account_page(visit, address, failure)
    return done(f"/admin/accounts/{address}", "app_passwords_revoked")


@router.post("/admin/accounts/{address}/sessions/end")
async def end_sessions(request: Request, address: str) -> Response:
    visit = await admin_visit(request)
    address = _address(address)
    await posted(visit)
    await call(routes_helpdesk.end_account_sessions, address=address, request=request, principal=visit.principal,
               backend=visit.backend)
    if address == visit.principal.address:
        raise Redirect("/login?notice=logged_out")
    return done(f"/admin/accounts/{address}", "sessions_ended")


@router.post("/admin/accounts/{address}/delete")
async def delete_account(request: Request, address: str) -> Response:
    visit = await admin_visit(request)
    address = _address(address)
    form = await posted(visit)
    try:
        await call(routes_directory.delete_account, address=address, request=request, principal=visit.principal,
                   backend=visit.backend, if_match=if_match(form))
    except ProblemError as exc:
        failure = failure_of(exc, frozenset({409, 412}))
        if failure is None:
            raise
        return await _account_page(visit, address, failure)
    return done(f"/admin/domains/{address.rpartition('@')[2]}", "account_deleted")


# Aliases (R-DOM-2) -------------------------------------------------------------------------------
async def _alias_page(visit: Visit, alias: str, failure: Failure | None = None) -> Response:
    response = Response()
    found = await call(routes_aliases.get_alias, alias=alias, response=response, principal=visit.principal,
                       backend=visit.backend)
    return page(visit.request, "alias.html", failure.status if failure else 200, visit, alias=found,
                etag=etag_of(response), domain=found.alias.rpartition("@")[2], failure=failure, labels=ALIAS_FIELDS)


def _alias(alias: str) -> str:
    return bounded(alias, MAX_ADDRESS, "Alias")


@router.get("/admin/aliases/{alias}")
async def alias_page(request: Request, alias: str) -> Response:
    return await _alias_page(await admin_visit(request), _alias(alias))


@router.post("/admin/aliases/{alias}")
async def update_alias(request: Request, alias: str) -> Response:
    visit = await admin_visit(request)
    alias = _alias(alias)
    form = await posted(visit)
    try:
        body = AliasTargets(targets=lines(form.get("targets")))
        updated = await call(routes_aliases.replace_alias_targets, alias=alias, body=body, request=request,
                             response=Response(), principal=visit.principal, backend=visit.backend,
                             if_match=if_match(form))
    except (ValidationError, ProblemError) as exc:
        failure = failure_of(exc)
        if failure is None:
            raise
        return await _alias_page(visit, alias, failure)
    return done(f"/admin/aliases/{updated.alias}", "alias_updated")


@router.post("/admin/aliases/{alias}/delete")
async def delete_alias(request: Request, alias: str) -> Response:
    visit = await admin_visit(request)
    alias = _alias(alias)
    form = await posted(visit)
    try:
        await call(routes_aliases.delete_alias, alias=alias, request=request, principal=visit.principal,
                   backend=visit.backend, if_match=if_match(form))
    except ProblemError as exc:
        failure = failure_of(exc, frozenset({412}))
        if failure is None:
            raise
        return await _alias_page(visit, alias, failure)
    return done(f"/admin/domains/{alias.rpartition('@')[2]}", "alias_deleted")
