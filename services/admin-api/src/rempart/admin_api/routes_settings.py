"""Server settings (R-OPS-1): read with defaults, replace or deep-merge, validated and versioned.

Secret settings are write-only (R-ADM-3): answers show :class:`SecretSummary`; a summary sent
back means "unchanged", and a replace keeps a secret it leaves out (see
:func:`rempart.admin_api.redaction.keep_unchanged_secrets`).
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request

from rempart.admin_api.backend import BackendDep, RedactorDep, SuperadminDep, record_change
from rempart.admin_api.models import Problem, SecretRotated, ServerSettingsOut, SettingsVersion, SrsRotation
from rempart.admin_api.redaction import Redactor, SecretSummary, keep_unchanged_secrets
from rempart.admin_api.routes_directory import put_scoped
from rempart.common.config import MailSettings, deep_merge

router = APIRouter(tags=["settings"])
_P = {"model": Problem}
R_READ: dict[int | str, dict[str, Any]] = {401: _P, 403: _P}
R_WRITE: dict[int | str, dict[str, Any]] = {401: _P, 403: _P, 422: _P}
SettingsBody = Annotated[
    dict[str, Any],
    Body(description="A partial settings document; omitted fields keep defaults. Secrets are write-only: "
         "send the new value, or the summary a GET showed to keep the stored one."),
]
SRS_KEY_BYTES = 32


def effective(doc: dict[str, Any]) -> MailSettings:
    return MailSettings.model_validate(deep_merge(MailSettings().model_dump(), doc))


def server_out(redactor: Redactor, version: int, doc: dict[str, Any]) -> dict[str, Any]:
    return {"version": version, "settings": redactor.settings(effective(doc).model_dump())}


@router.get("/v1/settings", operation_id="getSettings", response_model=ServerSettingsOut, responses=R_READ)
async def get_settings(principal: SuperadminDep, backend: BackendDep, redactor: RedactorDep) -> dict[str, Any]:
    version = await backend.store.version()
    return server_out(redactor, version, await backend.store.get_doc("server"))


@router.put("/v1/settings", operation_id="replaceSettings", response_model=ServerSettingsOut, responses=R_WRITE)
async def replace_settings(
    doc: SettingsBody, request: Request, principal: SuperadminDep, backend: BackendDep, redactor: RedactorDep
) -> dict[str, Any]:
    """Replace the stored server overrides with ``doc`` (anything omitted returns to its default,
    except secrets, which keep their value unless ``doc`` sets them)."""
    stored = await backend.store.get_doc("server")
    doc = keep_unchanged_secrets(doc, stored, replace=True)
    version = await put_scoped(backend, "server", doc)
    await record_change(backend, request, principal.address, "settings_replaced", "server", "server")
    return server_out(redactor, version, doc)


@router.patch("/v1/settings", operation_id="patchSettings", response_model=ServerSettingsOut, responses=R_WRITE)
async def patch_settings(
    doc: SettingsBody, request: Request, principal: SuperadminDep, backend: BackendDep, redactor: RedactorDep
) -> dict[str, Any]:
    """Deep-merge ``doc`` into the stored server overrides."""
    stored = await backend.store.get_doc("server")
    merged = deep_merge(stored, keep_unchanged_secrets(doc, stored, replace=False))
    version = await put_scoped(backend, "server", merged)
    await record_change(backend, request, principal.address, "settings_changed", "server", "server")
    return server_out(redactor, version, merged)


@router.post("/v1/settings/srs-secrets/rotation", operation_id="rotateSrsSecrets", response_model=SecretRotated,
             responses=R_WRITE, summary="A new random SRS key signs from now on; the newest old ones still verify")
async def rotate_srs_secrets(
    body: SrsRotation, request: Request, principal: SuperadminDep, backend: BackendDep, redactor: RedactorDep
) -> SecretRotated:
    # Nobody needs to know an SRS key (every replica reads it from the settings), so the API
    # makes one instead of asking the administrator to invent and paste a secret.
    stored = await backend.store.get_doc("server")
    current = effective(stored).dns.srs_secrets
    rotated = [secrets.token_urlsafe(SRS_KEY_BYTES), *current[: body.keep_previous]]
    merged = deep_merge(stored, {"dns": {"srs_secrets": rotated}})
    version = await put_scoped(backend, "server", merged)
    await record_change(backend, request, principal.address, "srs_secrets_rotated", "server", "server")
    return SecretRotated(version=version, srs_secrets=SecretSummary.model_validate(redactor.summary(rotated)))


@router.get("/v1/settings/version", operation_id="getSettingsVersion", response_model=SettingsVersion,
            responses=R_READ)
async def get_settings_version(principal: SuperadminDep, backend: BackendDep) -> SettingsVersion:
    return SettingsVersion(version=await backend.store.version())
