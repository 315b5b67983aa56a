"""R-ADM-1: a domain admin is confined to its domain on every resource.

Every route that names a domain, an account, an alias or a domain alias finds it through these
functions. For a domain admin, anything of another domain is *not found* (404), with the same
answer whether it exists or not, so that confinement does not become an oracle for what other
tenants hold. Inside its own domain a domain admin may still be refused (403) what only a
superadmin may do (a superadmin account, a role, a domain's hard limits).

Addresses a domain admin writes into its own resources (alias targets, a catch-all) are
resources too: one in another *local* domain is not found either. A remote address is fine
(forwarding off-site is the domain owner's choice, R-DOM-2); a local one of another tenant
would deliver into, and mark, that tenant's account.
"""

from __future__ import annotations

from typing import Any, Literal

from rempart.admin_api.backend import Backend, Principal, ProblemError, forbidden, invalid, not_found
from rempart.admin_api.models import MAX_ADDRESS, FieldError
from rempart.common.directory import Account, DirectoryError, normalize_address, split_address


async def domain_or_404(backend: Backend, principal: Principal, name: str) -> str:
    name = normalize_address(name)
    if not principal.can_manage_domain(name) or name not in await backend.directory.list_domains():
        raise not_found("Domain")
    return name


async def account_or_404(backend: Backend, principal: Principal, address: str) -> Account:
    address = normalize_address(address)
    _, _, domain = address.rpartition("@")
    if not principal.can_manage_domain(domain):
        raise not_found("Account")
    account = await backend.directory.get_account(address)
    if account is None:
        raise not_found("Account")
    if not principal.can_manage_account(account):
        raise forbidden()
    return account


def alias_address(
    principal: Principal, alias: str, what: str = "Alias", location: Literal["body", "path"] = "path"
) -> tuple[str, str]:
    """The normalized alias address and its domain; 404 when the domain is not the caller's."""
    alias = normalize_address(alias)
    try:
        _, domain = split_address(alias)
    except DirectoryError:
        raise invalid("Not an address", "alias", "not an address", location) from None
    if not principal.can_manage_domain(domain):
        raise not_found(what)
    return alias, domain


async def checked_targets(backend: Backend, principal: Principal, targets: list[str], field: str) -> list[str]:
    """Normalized delivery targets; 422 for a malformed one, 404 for one of another tenant."""
    clean = [normalize_address(t) for t in targets]
    bad = [FieldError(field=f"{field}.{i}", detail="not an address")
           for i, t in enumerate(clean) if len(t) > MAX_ADDRESS or not _is_address(t)]
    if bad:
        raise ProblemError(422, "Invalid addresses", bad[:50])
    if principal.is_superadmin:
        return clean
    for target in clean:
        canonical = await backend.directory.canonical_domain(target.rpartition("@")[2])
        if canonical is not None and not principal.can_manage_domain(canonical):
            raise not_found("Target address")
    return clean


def _is_address(address: str) -> bool:
    try:
        local, domain = split_address(address)
    except DirectoryError:
        return False
    return not any(c.isspace() for c in address) and "@" not in local and "." in domain


async def check_scoped_settings(backend: Backend, principal: Principal, doc: dict[str, Any]) -> None:
    """The addresses inside a domain or account settings document obey the same confinement."""
    recipients = doc.get("recipients")
    if isinstance(recipients, dict) and isinstance(recipients.get("catch_all_address"), str):
        catch_all = recipients["catch_all_address"].strip()
        if catch_all:
            await checked_targets(backend, principal, [catch_all], "recipients.catch_all_address")


def visible_aliases(principal: Principal, aliases: list[str]) -> list[str]:
    """An account's aliases as the caller may see them: a domain admin sees its domain's only."""
    return [a for a in aliases if principal.can_manage_domain(a.rpartition("@")[2])]
