"""R-OUT-5: a local domain's DKIM signing keys (RFC 6376, RFC 8463), confined like every
resource (R-ADM-1: a domain admin manages its own domain's keys; another domain is a 404).

A key is generated on the server and its private half never leaves it (R-ADM-3): it is sealed
with ``REMPART_SECRET_KEY`` in Redis for the relays, and no answer, log line or audit event
carries it. What the API shows is what to publish: ``<selector>._domainkey.<domain> IN TXT
"v=DKIM1; k=rsa; p=..."``. Per algorithm one key is active (the relays sign with it); a
rotation makes a new selector active and retires the old one, which stays listed, so that its
record stays published until mail signed with it has arrived, and is then deleted.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from rempart.admin_api.backend import (
    AdminDep,
    AuditReady,
    Backend,
    BackendDep,
    Principal,
    ProblemError,
    invalid,
    not_found,
    record_change,
)
from rempart.admin_api.confinement import domain_or_404
from rempart.admin_api.models import MAX_DOMAIN, Problem, Timestamp
from rempart.admin_api.preconditions import IfMatchHeader, check_if_match, etag_of, with_etag
from rempart.common import dkim
from rempart.common.secretbox import SecretBox

router = APIRouter(tags=["dkim"], dependencies=[AuditReady])
DomainPath = Annotated[str, Path(min_length=1, max_length=MAX_DOMAIN)]
SelectorPath = Annotated[str, Path(min_length=1, max_length=63)]
SELECTOR_HELP = ("One or more DNS labels (letters, digits, hyphens), at most 63 characters; default "
                 "rp<yyyymm> (rp<yyyymm>e for Ed25519), with -2, -3... when taken.")

_P = {"model": Problem}
R_READ: dict[int | str, dict[str, Any]] = {401: _P, 403: _P, 404: _P}
R_WRITE: dict[int | str, dict[str, Any]] = {401: _P, 403: _P, 404: _P, 409: _P, 412: _P, 422: _P, 503: _P}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DkimKeyCreate(_Body):
    algorithm: dkim.Algorithm = Field(
        default="rsa-sha256", description="rsa-sha256 (2048-bit RSA) or ed25519-sha256 (RFC 8463)")
    selector: str | None = Field(default=None, min_length=1, max_length=63, description=SELECTOR_HELP)


class DkimKeyRotate(_Body):
    selector: str | None = Field(default=None, min_length=1, max_length=63,
                                 description="The new key's selector. " + SELECTOR_HELP)


class DkimKeyOut(BaseModel):
    domain: str
    selector: str
    algorithm: dkim.Algorithm
    key_type: Literal["rsa", "ed25519"]
    bits: int
    status: Literal["active", "retired"] = Field(
        description="active: the relays sign with it; retired: replaced by a rotation, keep it published "
                    "until mail signed with it has arrived, then delete it")
    created: Timestamp
    retired_at: Timestamp | None
    dns_name: str = Field(description="Where to publish the record: <selector>._domainkey.<domain>")
    txt_value: str = Field(description='The TXT record\'s value: "v=DKIM1; k=rsa; p=<public key>"')
    txt_record: str = Field(description="The record as a zone-file line, split into strings of at most 255 bytes")
    public_key: str = Field(description="The p= value: the public key, base64")


class DkimKeyList(BaseModel):
    keys: list[DkimKeyOut]


class DkimRotation(BaseModel):
    active: DkimKeyOut
    retired: DkimKeyOut


def key_out(key: dkim.DkimKey) -> DkimKeyOut:
    return DkimKeyOut(
        domain=key.domain, selector=key.selector, algorithm=key.algorithm, key_type=dkim.key_type(key.algorithm),
        bits=key.bits, status="active" if key.active else "retired", created=key.created,  # type: ignore[arg-type]
        retired_at=key.retired_at or None,  # type: ignore[arg-type]
        dns_name=key.dns_name, txt_value=key.txt_value, txt_record=key.zone_line, public_key=key.public_key,
    )


def key_store(request: Request, backend: Backend) -> dkim.DkimKeyStore:
    return dkim.DkimKeyStore(backend.redis, SecretBox(request.app.state.settings.secret_key.get_secret_value()))


def checked_selector(selector: str | None, location: Literal["body", "path"] = "body") -> str | None:
    if selector is None:
        return None
    selector = selector.strip().lower()
    if not dkim.valid_selector(selector):
        raise invalid("Not a selector", "selector", "not DNS labels of letters, digits and hyphens", location)
    return selector


async def _key_or_404(request: Request, backend: Backend, principal: Principal, domain: str,
                      selector: str) -> tuple[str, dkim.DkimKey]:
    name = await domain_or_404(backend, principal, domain)
    key = await key_store(request, backend).get(name, selector.strip().lower())
    if key is None:
        raise not_found("DKIM key")
    return name, key


@router.get("/v1/domains/{domain}/dkim-keys", operation_id="listDkimKeys", response_model=DkimKeyList,
            responses=R_READ)
async def list_keys(domain: DomainPath, request: Request, principal: AdminDep, backend: BackendDep) -> DkimKeyList:
    name = await domain_or_404(backend, principal, domain)
    return DkimKeyList(keys=[key_out(k) for k in await key_store(request, backend).list_keys(name)])


@router.post("/v1/domains/{domain}/dkim-keys", operation_id="createDkimKey", response_model=DkimKeyOut,
             status_code=201, responses=R_WRITE)
async def create_key(domain: DomainPath, body: DkimKeyCreate, request: Request, response: Response,
                     principal: AdminDep, backend: BackendDep) -> DkimKeyOut:
    """A new key pair, made on the server; active at once when the domain has no active key of
    this algorithm (otherwise 409: rotate that one). Publish its TXT record before mail leaves."""
    name = await domain_or_404(backend, principal, domain)
    selector = checked_selector(body.selector)
    try:
        key = await key_store(request, backend).generate(name, body.algorithm, selector, time.time())
    except dkim.DkimError as exc:
        raise ProblemError(409, str(exc)) from None
    out = key_out(key)
    await record_change(backend, request, principal.address, "dkim_key_created", f"{key.selector}._domainkey.{name}",
                        f"domain:{name}", kind="dkim_key", after=out)
    with_etag(response, etag_of(out))
    return out


@router.get("/v1/domains/{domain}/dkim-keys/{selector}", operation_id="getDkimKey", response_model=DkimKeyOut,
            responses=R_READ)
async def get_key(domain: DomainPath, selector: SelectorPath, request: Request, response: Response,
                  principal: AdminDep, backend: BackendDep) -> DkimKeyOut:
    _, key = await _key_or_404(request, backend, principal, domain, selector)
    out = key_out(key)
    with_etag(response, etag_of(out))
    return out


@router.post("/v1/domains/{domain}/dkim-keys/{selector}/rotation", operation_id="rotateDkimKey",
             response_model=DkimRotation, responses=R_WRITE)
async def rotate_key(domain: DomainPath, selector: SelectorPath, body: DkimKeyRotate, request: Request,
                     principal: AdminDep, backend: BackendDep, if_match: IfMatchHeader = None) -> DkimRotation:
    """A new active key of the same algorithm under a new selector; this one is retired and stays
    listed (keep its record published until mail signed with it has arrived)."""
    name, key = await _key_or_404(request, backend, principal, domain, selector)
    check_if_match(if_match, etag_of(key_out(key)))
    new_selector = checked_selector(body.selector)
    try:
        new, retired = await key_store(request, backend).rotate(name, key.selector, new_selector, time.time())
    except KeyError:
        raise not_found("DKIM key") from None
    except dkim.DkimError as exc:
        raise ProblemError(409, str(exc)) from None
    await record_change(backend, request, principal.address, "dkim_key_rotated",
                        f"{key.selector}._domainkey.{name} -> {new.selector}._domainkey.{name}", f"domain:{name}",
                        kind="dkim_key", before=key_out(key), after=key_out(new))
    return DkimRotation(active=key_out(new), retired=key_out(retired))


@router.delete("/v1/domains/{domain}/dkim-keys/{selector}", operation_id="deleteDkimKey", status_code=204,
               response_class=Response, responses=R_WRITE)
async def delete_key(domain: DomainPath, selector: SelectorPath, request: Request, principal: AdminDep,
                     backend: BackendDep, if_match: IfMatchHeader = None) -> Response:
    """Deleted at once: an active key's algorithm is no longer signed with. Remove its TXT record
    only after mail signed with it has arrived."""
    name, key = await _key_or_404(request, backend, principal, domain, selector)
    check_if_match(if_match, etag_of(key_out(key)))
    if not await key_store(request, backend).delete(name, key.selector):
        raise not_found("DKIM key")
    await record_change(backend, request, principal.address, "dkim_key_deleted", f"{key.selector}._domainkey.{name}",
                        f"domain:{name}", kind="dkim_key", before=key_out(key))
    return Response(status_code=204)
