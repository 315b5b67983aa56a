"""Server settings (R-OPS-1): read with defaults, replace or deep-merge, validated and versioned.

Secret settings are write-only (R-ADM-3): answers show :class:`SecretSummary`; a summary sent
back means "unchanged", and a replace keeps a secret it leaves out (see
:func:`rempart.admin_api.redaction.keep_unchanged_secrets`). Every answer carries the ETag of
the stored server document; a write with a stale ``If-Match`` is a 412 (R-ADM-2).
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request, Response

from rempart.admin_api.backend import AuditReady, BackendDep, RedactorDep, SuperadminDep, record_change
from rempart.admin_api.models import Problem, SecretRotated, ServerSettingsOut, SettingsVersion, SrsRotation
from rempart.admin_api.preconditions import IfMatchHeader, with_etag
from rempart.admin_api.redaction import Redactor, SecretSummary, keep_unchanged_secrets
from rempart.admin_api.scopes import read_scope, write_scope
from rempart.admin_api.settings_bodies import MailSettingsPatch, as_document
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
