"""Server settings (R-OPS-1): read with defaults, replace or deep-merge, validated and versioned."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request

from rempart.admin_api.backend import BackendDep, SuperadminDep, record_change
from rempart.admin_api.models import Problem, ServerSettingsOut, SettingsVersion
from rempart.admin_api.routes_directory import put_scoped
from rempart.common.config import MailSettings, deep_merge

router = APIRouter(tags=["settings"])
_P = {"model": Problem}
R_READ: dict[int | str, dict[str, Any]] = {401: _P, 403: _P}
R_WRITE: dict[int | str, dict[str, Any]] = {401: _P, 403: _P, 422: _P}
SettingsBody = Annotated[dict[str, Any], Body(description="A partial settings document; omitted fields keep defaults.")]


def effective(doc: dict[str, Any]) -> MailSettings:
    return MailSettings.model_validate(deep_merge(MailSettings().model_dump(), doc))


@router.get("/v1/settings", operation_id="getSettings", response_model=ServerSettingsOut, responses=R_READ)
async def get_settings(principal: SuperadminDep, backend: BackendDep) -> ServerSettingsOut:
    version = await backend.store.version()
    return ServerSettingsOut(version=version, settings=effective(await backend.store.get_doc("server")))


@router.put("/v1/settings", operation_id="replaceSettings", response_model=ServerSettingsOut, responses=R_WRITE)
async def replace_settings(
    doc: SettingsBody, request: Request, principal: SuperadminDep, backend: BackendDep
) -> ServerSettingsOut:
    """Replace the stored server overrides with ``doc`` (anything omitted returns to its default)."""
    version = await put_scoped(backend, "server", doc)
    await record_change(backend, request, principal.address, "settings_replaced", "server", "server")
    return ServerSettingsOut(version=version, settings=effective(doc))


@router.patch("/v1/settings", operation_id="patchSettings", response_model=ServerSettingsOut, responses=R_WRITE)
async def patch_settings(
    doc: SettingsBody, request: Request, principal: SuperadminDep, backend: BackendDep
) -> ServerSettingsOut:
    """Deep-merge ``doc`` into the stored server overrides."""
    merged = deep_merge(await backend.store.get_doc("server"), doc)
    version = await put_scoped(backend, "server", merged)
    await record_change(backend, request, principal.address, "settings_changed", "server", "server")
    return ServerSettingsOut(version=version, settings=effective(merged))


@router.get("/v1/settings/version", operation_id="getSettingsVersion", response_model=SettingsVersion,
            responses=R_READ)
async def get_settings_version(principal: SuperadminDep, backend: BackendDep) -> SettingsVersion:
    return SettingsVersion(version=await backend.store.version())
