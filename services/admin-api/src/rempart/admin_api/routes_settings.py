"""Server settings (R-OPS-1): read with defaults, replace or deep-merge, validated and versioned.

Secret settings are write-only (R-ADM-3): answers show :class:`SecretSummary`; a summary sent
back means "unchanged", and a replace keeps a secret it leaves out (see
:func:`rempart.admin_api.redaction.keep_unchanged_secrets`). Every answer carries the ETag of
the stored server document; a write with a stale ``If-Match`` is a 412 (R-ADM-2).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Request, Response

from rempart.admin_api.backend import (
    AuditReady,
    Backend,
    BackendDep,
    Principal,
    RedactorDep,
    SuperadminDep,
    record_change,
)
from rempart.admin_api.models import Problem, SecretRotated, ServerSettingsOut, SettingsVersion, SrsRotation
from rempart.admin_api.preconditions import IfMatchHeader, with_etag
from rempart.admin_api.redaction import Redactor, SecretSummary, keep_unchanged_secrets
from rempart.admin_api.scopes import read_scope, write_scope
from rempart.admin_api.settings_bodies import MailSettingsPatch, as_document
from rempart.admin_api.settings_lists import (
    LISTS,
    MAX_ITEM,
    RULE_ID_HEX,
    HeloRuleIn,
    HeloRuleListOut,
    HeloRuleOut,
    ListItem,
    SettingsList,
    StringListOut,
    adding,
    clean_item,
    helo_rule,
    list_etag,
    removing,
    rule_id,
)
from rempart.common.config import MailSettings, deep_merge

router = APIRouter(tags=["settings"], dependencies=[AuditReady])
_P = {"model": Problem}
R_READ: dict[int | str, dict[str, Any]] = {401: _P, 403: _P}
R_WRITE: dict[int | str, dict[str, Any]] = {401: _P, 403: _P, 412: _P, 422: _P}
SettingsBody = Annotated[
    MailSettingsPatch,  # type: ignore[valid-type]
    Body(description="A partial settings document; omitted fields keep defaults. Secrets are write-only: "
         "send the new value, or the summary a GET showed to keep the stored one."),
]
SRS_KEY_BYTES = 32
SERVER = "server"


def effective(doc: dict[str, Any]) -> MailSettings:
    return MailSettings.model_validate(deep_merge(MailSettings().model_dump(), doc))


def server_out(redactor: Redactor, version: int, doc: dict[str, Any]) -> dict[str, Any]:
    return {"version": version, "settings": redactor.settings(effective(doc).model_dump())}


@router.get("/v1/settings", operation_id="getSettings", response_model=ServerSettingsOut, responses=R_READ)
async def get_settings(
    response: Response, principal: SuperadminDep, backend: BackendDep, redactor: RedactorDep
) -> dict[str, Any]:
    version, doc, tag = await read_scope(backend, redactor, SERVER)
    with_etag(response, tag)
    return server_out(redactor, version, doc)


@router.put("/v1/settings", operation_id="replaceSettings", response_model=ServerSettingsOut, responses=R_WRITE)
async def replace_settings(
    body: SettingsBody, request: Request, response: Response, principal: SuperadminDep, backend: BackendDep,
    redactor: RedactorDep, if_match: IfMatchHeader = None,
) -> dict[str, Any]:
    """Replace the stored server overrides with ``doc`` (anything omitted returns to its default,
    except secrets, which keep their value unless ``doc`` sets them)."""
    doc = as_document(body)
    before: dict[str, Any] = {}
    version, stored, tag = await write_scope(
        backend, redactor, SERVER, if_match, lambda current: keep_unchanged_secrets(doc, current, replace=True),
        before,
    )
    await record_change(backend, request, principal.address, "settings_replaced", SERVER, SERVER, before=before,
                        after=stored)
    with_etag(response, tag)
    return server_out(redactor, version, stored)


@router.patch("/v1/settings", operation_id="patchSettings", response_model=ServerSettingsOut, responses=R_WRITE)
async def patch_settings(
    body: SettingsBody, request: Request, response: Response, principal: SuperadminDep, backend: BackendDep,
    redactor: RedactorDep, if_match: IfMatchHeader = None,
) -> dict[str, Any]:
    """Deep-merge ``doc`` into the stored server overrides (atomically: two admins patching
    different settings at once both keep theirs)."""
    doc = as_document(body)
    before: dict[str, Any] = {}
    version, stored, tag = await write_scope(
        backend, redactor, SERVER, if_match,
        lambda current: deep_merge(current, keep_unchanged_secrets(doc, current, replace=False)), before,
    )
    await record_change(backend, request, principal.address, "settings_changed", SERVER, SERVER, before=before,
                        after=stored)
    with_etag(response, tag)
    return server_out(redactor, version, stored)


@router.post("/v1/settings/srs-secrets/rotation", operation_id="rotateSrsSecrets", response_model=SecretRotated,
             responses=R_WRITE, summary="A new random SRS key signs from now on; the newest old ones still verify")
async def rotate_srs_secrets(
    body: SrsRotation, request: Request, response: Response, principal: SuperadminDep, backend: BackendDep,
    redactor: RedactorDep, if_match: IfMatchHeader = None,
) -> SecretRotated:
    # Nobody needs to know an SRS key (every replica reads it from the settings), so the API
    # makes one instead of asking the administrator to invent and paste a secret.
    fresh = secrets.token_urlsafe(SRS_KEY_BYTES)

    def rotate(current: dict[str, Any]) -> dict[str, Any]:
        kept = effective(current).dns.srs_secrets[: body.keep_previous]
        return deep_merge(current, {"dns": {"srs_secrets": [fresh, *kept]}})

    before: dict[str, Any] = {}
    version, stored, tag = await write_scope(backend, redactor, SERVER, if_match, rotate, before)
    await record_change(backend, request, principal.address, "srs_secrets_rotated", SERVER, SERVER, before=before,
                        after=stored)
    with_etag(response, tag)
    summary = redactor.summary(effective(stored).dns.srs_secrets)
    return SecretRotated(version=version, srs_secrets=SecretSummary.model_validate(summary))


@router.get("/v1/settings/version", operation_id="getSettingsVersion", response_model=SettingsVersion,
            responses=R_READ)
async def get_settings_version(principal: SuperadminDep, backend: BackendDep) -> SettingsVersion:
    return SettingsVersion(version=await backend.store.version())


# The lists as sub-resources -------------------------------------------------------------------
R_LIST_WRITE: dict[int | str, dict[str, Any]] = {401: _P, 403: _P, 404: _P, 409: _P, 412: _P, 422: _P, 503: _P}
ItemPath = Annotated[str, Path(min_length=1, max_length=MAX_ITEM)]


async def _list_write(
    spec: SettingsList, request: Request, response: Response, principal: Principal, backend: Backend,
    redactor: Redactor, change: Callable[[list[Any]], Callable[[dict[str, Any]], dict[str, Any]]], action: str,
    item_id: str,
) -> tuple[int, list[Any]]:
    before: list[Any] = []
    version, stored, _ = await write_scope(backend, redactor, SERVER, None, change(before))
    items = spec.items(stored)
    await record_change(backend, request, principal.address, action, f"{spec.name}:{item_id}", SERVER,
                        kind="settings_list", before={spec.field: before}, after={spec.field: items})
    with_etag(response, list_etag(items))
    return version, items


def _string_list_routes(spec: SettingsList, singular: str, plural: str) -> None:
    path = f"/v1/settings/{spec.name}"

    async def get_list(response: Response, principal: SuperadminDep, backend: BackendDep) -> StringListOut:
        version = await backend.store.version()
        items = spec.items(await backend.store.get_doc(SERVER))
        with_etag(response, list_etag(items))
        return StringListOut(items=items, version=version)

    async def add_item(body: ListItem, request: Request, response: Response, principal: SuperadminDep,
                       backend: BackendDep, redactor: RedactorDep, if_match: IfMatchHeader = None) -> StringListOut:
        item = clean_item(spec, body.item)
        version, items = await _list_write(
            spec, request, response, principal, backend, redactor,
            lambda before: adding(spec, item, if_match, before), "settings_list_item_added", item)
        response.status_code = 201
        return StringListOut(items=items, version=version)

    async def delete_item(item: ItemPath, request: Request, response: Response, principal: SuperadminDep,
                          backend: BackendDep, redactor: RedactorDep, if_match: IfMatchHeader = None) -> StringListOut:
        wanted = clean_item(spec, item)
        version, items = await _list_write(
            spec, request, response, principal, backend, redactor,
            lambda before: removing(spec, lambda i: i == wanted, if_match, before), "settings_list_item_deleted",
            wanted)
        return StringListOut(items=items, version=version)

    router.add_api_route(path, get_list, methods=["GET"], operation_id=f"list{plural}", response_model=StringListOut,
                         responses=R_READ, summary=f"The {spec.what.lower()}s ({spec.section}.{spec.field})")
    router.add_api_route(path, add_item, methods=["POST"], operation_id=f"add{singular}", status_code=201,
                         response_model=StringListOut, responses=R_LIST_WRITE,
                         summary=f"Add one {spec.what.lower()} (409 if listed); the list as it is now")
    router.add_api_route(f"{path}/{{item:path}}", delete_item, methods=["DELETE"], operation_id=f"delete{singular}",
                         response_model=StringListOut, responses=R_LIST_WRITE,
                         summary=f"Remove one {spec.what.lower()}; the list as it is now")


_string_list_routes(LISTS["dnsbl-zones"], "DnsblZone", "DnsblZones")
_string_list_routes(LISTS["trusted-hosts"], "TrustedHost", "TrustedHosts")
_string_list_routes(LISTS["ip-whitelist"], "IpWhitelistEntry", "IpWhitelist")
HELO = LISTS["helo-rules"]


def _rules_out(items: list[dict[str, str]], version: int) -> HeloRuleListOut:
    return HeloRuleListOut(version=version, items=[
        HeloRuleOut(id=rule_id(r), match=r.get("match", "exact"), pattern=r.get("pattern", ""),  # type: ignore[arg-type]
                    action=r.get("action", "reject"))  # type: ignore[arg-type]
        for r in items
    ])


@router.get("/v1/settings/helo-rules", operation_id="listHeloRules", response_model=HeloRuleListOut,
            responses=R_READ, summary="The HELO rules (relay.helo_rules), in the order they are tried")
async def list_helo_rules(response: Response, principal: SuperadminDep, backend: BackendDep) -> HeloRuleListOut:
    version = await backend.store.version()
    items = HELO.items(await backend.store.get_doc(SERVER))
    with_etag(response, list_etag(items))
    return _rules_out(items, version)


@router.post("/v1/settings/helo-rules", operation_id="addHeloRule", status_code=201, response_model=HeloRuleListOut,
             responses=R_LIST_WRITE, summary="Add one HELO rule at the end (tried last); 409 if the same rule exists")
async def add_helo_rule(body: HeloRuleIn, request: Request, response: Response, principal: SuperadminDep,
                        backend: BackendDep, redactor: RedactorDep, if_match: IfMatchHeader = None) -> HeloRuleListOut:
    rule = helo_rule(body)
    version, items = await _list_write(HELO, request, response, principal, backend, redactor,
                                       lambda before: adding(HELO, rule, if_match, before), "settings_list_item_added",
                                       rule_id(rule))
    return _rules_out(items, version)


@router.delete("/v1/settings/helo-rules/{rule}", operation_id="deleteHeloRule", response_model=HeloRuleListOut,
               responses=R_LIST_WRITE, summary="Remove one HELO rule by its id")
async def delete_helo_rule(rule: Annotated[str, Path(min_length=RULE_ID_HEX, max_length=RULE_ID_HEX)],
                           request: Request, response: Response, principal: SuperadminDep, backend: BackendDep,
                           redactor: RedactorDep, if_match: IfMatchHeader = None) -> HeloRuleListOut:
    version, items = await _list_write(HELO, request, response, principal, backend, redactor,
                                       lambda before: removing(HELO, lambda r: rule_id(r) == rule, if_match, before),
                                       "settings_list_item_deleted", rule)
    return _rules_out(items, version)
