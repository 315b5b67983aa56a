"""The process around the app: OpenAPI, fail-closed auth, the bootstrap admin, uvicorn and SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from openapi_spec_validator import validate

from rempart.admin_api.app import create_app
from rempart.admin_api.backend import Backend
from rempart.admin_api.bootstrap import bootstrap_superadmin
from rempart.admin_api.service import serve
from rempart.admin_api.sessions import SessionStore
from rempart.common.audit import AUDIT_STREAM
from rempart.common.clients import AuthClient
from rempart.common.events import EventBus
from rempart.common.redisconn import connect_redis
from rempart.common.testing.localstack import free_port

from .conftest import ADMIN, ADMIN_PASSWORD, TOO_SHORT, Harness, InTestAuthService, make_settings, private_nats
from .test_audit import shorten_audit_wait


async def test_openapi_document_is_valid_and_generator_friendly(harness: Harness) -> None:
    spec = (await harness.http.get("/v1/openapi.json")).json()
    validate(spec)
    operation_ids = []
    described = {tag["name"] for tag in spec["tags"]}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert operation.get("operationId"), (method, path)
            assert operation.get("tags"), (method, path)
            assert set(operation["tags"]) <= described, (method, path, operation["tags"])  # each tag described
            operation_ids.append(operation["operationId"])
            if path != "/v1/auth/login":
                assert operation.get("security") == [{"HTTPBearer": []}], (method, path)
                assert "401" in operation["responses"]
            for code, response in operation["responses"].items():
                if code.startswith(("4", "5")):
                    # RFC 9457: every error is application/problem+json, and says so.
                    assert list(response["content"]) == ["application/problem+json"], (method, path, code)
                    schema = response["content"]["application/problem+json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Problem"}, (method, path, code)
    assert len(operation_ids) == len(set(operation_ids))
    # No response schema can carry a password (R-PWD-2); only login carries the token, and only
    # a new app password is shown, once, when it is created (R-2FA-2).
    shown_once = {("AppPasswordCreated", "password")}
    for name, schema in spec["components"]["schemas"].items():
        for prop, definition in schema.get("properties", {}).items():
            if (name, prop) in shown_once:
                continue
            if ("password" in prop or prop == "confirm") and definition.get("type") == "string":
                assert definition.get("writeOnly") is True, (name, prop)
            # R-ADM-2: a point in time is an RFC 3339 string, never a Unix number.
            if prop in ("created", "last_used", "time") or prop.endswith("_at"):
                kinds = definition.get("anyOf", [definition])
                assert any(k.get("format") == "date-time" for k in kinds), (name, prop, definition)
                assert all(k.get("type") in ("string", "null") for k in kinds), (name, prop, definition)


@pytest.fixture
async def dead_auth_harness(redis_url: str, nats_url: str, redis: aioredis.Redis, nats_conn: NATS) -> AsyncIterator[
    httpx.AsyncClient
]:
    settings = make_settings(redis_url, nats_url, auth_target=f"127.0.0.1:{free_port()}")
    auth = AuthClient(settings.auth_target, timeout=1.0)
    backend = Backend(redis, nats_conn.jetstream(), EventBus(nats_conn, "admin-api"), auth,
                      SessionStore(redis, settings.session_ttl_seconds))
    app = create_app(settings, backend)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://admin.test") as client:
        yield client
    await auth.close()


async def test_auth_service_down_gives_503_not_401(dead_auth_harness: httpx.AsyncClient) -> None:
    reply = await dead_auth_harness.post("/v1/auth/login", json={"email": ADMIN, "password": ADMIN_PASSWORD})
    assert reply.status_code == 503
    assert reply.json()["detail"] == "Authentication service unavailable, try again later"


async def test_bootstrap_superadmin_created_once(harness: Harness) -> None:
    directory = harness.backend.directory
    await directory.delete_account(ADMIN)
    weak = make_settings("redis://unused", "nats://unused", bootstrap_admin_email="root@boot.example",
                         bootstrap_admin_password="short")
    assert await bootstrap_superadmin(weak, harness.backend) is True
    assert await directory.get_account("root@boot.example") is None  # rolled back
    assert "boot.example" not in await directory.list_domains()

    settings = make_settings("redis://unused", "nats://unused", bootstrap_admin_email="Root@Boot.Example",
                             bootstrap_admin_password="B00tstrap-Admin-Pw!")
    assert await bootstrap_superadmin(settings, harness.backend) is True
    account = await directory.get_account("root@boot.example")
    assert account is not None and account.role == "superadmin"
    assert harness.auth.passwords["root@boot.example"] == "B00tstrap-Admin-Pw!"
    login = await harness.login("root@boot.example", "B00tstrap-Admin-Pw!")
    assert (await harness.http.get("/v1/domains", headers=login)).status_code == 200
    # R-ADM-5: in the audit trail, without the password.
    audit = await harness.http.get("/v1/audit", params={"action": "bootstrap_superadmin"}, headers=login)
    [record] = audit.json()["events"]
    assert (record["actor"], record["object"], record["after"]["role"]) == (
        "bootstrap", {"kind": "account", "id": "root@boot.example"}, "superadmin")
    assert "B00tstrap-Admin-Pw!" not in audit.text

    harness.auth.passwords["root@boot.example"] = "changed-by-the-admin-since"
    assert await bootstrap_superadmin(settings, harness.backend) is True  # a superadmin exists: nothing done
    assert harness.auth.passwords["root@boot.example"] == "changed-by-the-admin-since"
    assert TOO_SHORT



async def _bootstrap_records(harness: Harness, headers: dict[str, str]) -> list[dict[str, object]]:
    audit = await harness.http.get("/v1/audit", params={"action": "bootstrap_superadmin"}, headers=headers)
    assert audit.status_code == 200, audit.text
    events: list[dict[str, object]] = audit.json()["events"]
    return events


async def test_r_adm_5_bootstrap_waits_for_the_audit_stream_and_never_loses_its_record(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JetStream down at the first attempt: nothing is created (before: the superadmin was made,
    the record refused, and the retry, finding the superadmin, never wrote it). JetStream refusing
    the record after the creation: the next attempt writes it, once."""
    directory = harness.backend.directory
    await directory.delete_account(ADMIN)
    settings = make_settings("redis://unused", "nats://unused", bootstrap_admin_email="root@boot.example",
                             bootstrap_admin_password="B00tstrap-Admin-Pw!")
    async with private_nats(harness, tmp_path / "down") as own:
        own.stop()
        with monkeypatch.context() as patch:  # the same refusal, without waiting out the product's 3 s
            shorten_audit_wait(patch)
            assert await bootstrap_superadmin(settings, harness.app.state.backend) is False
    assert await directory.get_account("root@boot.example") is None
    assert "boot.example" not in await directory.list_domains()

    async with private_nats(harness, tmp_path / "sealed"):
        # The stream answers (the check passes) but takes no record: a failure after the check.
        await harness.app.state.backend.audit.ensure()
        sealed_js = harness.app.state.backend.js
        info = await sealed_js.stream_info(AUDIT_STREAM)
        await sealed_js.update_stream(info.config.evolve(sealed=True))
        assert await bootstrap_superadmin(settings, harness.app.state.backend) is False
    account = await directory.get_account("root@boot.example")
    assert account is not None and account.role == "superadmin"

    assert await bootstrap_superadmin(settings, harness.backend) is True  # JetStream back
    login = await harness.login("root@boot.example", "B00tstrap-Admin-Pw!")
    [record] = await _bootstrap_records(harness, login)
    assert record["actor"] == "bootstrap" and record["object"] == {"kind": "account", "id": "root@boot.example"}
    assert await bootstrap_superadmin(settings, harness.backend) is True  # nothing more to do
    assert len(await _bootstrap_records(harness, login)) == 1

async def test_service_serves_http_and_drains_on_sigterm(
    redis_url: str, nats_url: str, auth_server: tuple[InTestAuthService, int], caplog: pytest.LogCaptureFixture
) -> None:
    servicer, auth_port = auth_server
    http_port, ops_port = free_port(), free_port()
    password = "Serv1ce-Boot-Pw!"
    settings = make_settings(
        redis_url, nats_url, auth_target=f"127.0.0.1:{auth_port}", http_host="127.0.0.1", http_port=http_port,
        ops_host="127.0.0.1", ops_port=ops_port, bootstrap_admin_email="ops@svc.example",
        bootstrap_admin_password=password, log_format="text", shutdown_grace_seconds=2,
    )
    started = asyncio.Event()
    task = asyncio.create_task(serve(settings, started))
    await asyncio.wait_for(started.wait(), 15)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as client:
        for _ in range(100):  # the bootstrap runs beside the server
            if "ops@svc.example" in servicer.passwords:
                break
            await asyncio.sleep(0.05)
        reply = await client.post("/v1/auth/login", json={"email": "ops@svc.example", "password": password})
        assert reply.status_code == 200, reply.text
        me = await client.get("/v1/me", headers={"Authorization": f"Bearer {reply.json()['token']}"})
        assert me.json()["role"] == "superadmin"
        assert (await client.get("/v1/domains")).status_code == 401
        ops = await client.get(f"http://127.0.0.1:{ops_port}/readyz")
        assert ops.status_code == 200 and "auth: ok" in ops.text
    assert password not in caplog.text
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, 15)
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as client:
            await client.get(f"http://127.0.0.1:{http_port}/v1/me")


async def test_r_ops_3_redis_down_gives_503(harness: Harness, admin_headers: dict[str, str]) -> None:
    dead = connect_redis(f"redis://127.0.0.1:{free_port()}/0")
    harness.backend.redis = dead
    harness.backend.sessions = SessionStore(dead, 60)
    try:
        reply = await harness.http.get("/v1/domains", headers=admin_headers)
        assert reply.status_code == 503
        assert reply.json()["detail"] == "A backing service is unavailable, try again later"
    finally:
        await dead.aclose()


async def test_settings_bodies_are_typed(harness: Harness, admin_headers: dict[str, str]) -> None:
    spec = (await harness.http.get("/v1/openapi.json")).json()
    bodies = {}
    for operations in spec["paths"].values():
        for operation in operations.values():
            if "requestBody" in operation:
                bodies[operation["operationId"]] = operation["requestBody"]["content"]["application/json"]["schema"]
    for operation_id, schema in (("replaceSettings", "MailSettingsPatch"), ("patchSettings", "MailSettingsPatch"),
                                 ("putDomainSettings", "ScopedSettingsPatch"),
                                 ("putAccountSettings", "ScopedSettingsPatch")):
        assert bodies[operation_id]["$ref"] == f"#/components/schemas/{schema}", operation_id
    schemas = spec["components"]["schemas"]
    # Only what a domain or an account may override is offered at those scopes.
    assert set(schemas["ScopedSettingsPatch"]["properties"]) == {"recipients", "limits", "login"}
    block_minutes = schemas["IntrusionSettingsPatch"]["properties"]["block_minutes"]["anyOf"][0]
    assert block_minutes == {"type": "integer", "minimum": 1}
    bad = await harness.http.patch("/v1/settings", json={"ips": {"block_minutes": 0, "no_such": 1}},
                                   headers=admin_headers)
    assert bad.status_code == 422
    assert sorted(e["field"] for e in bad.json()["errors"]) == ["ips.block_minutes", "ips.no_such"]
