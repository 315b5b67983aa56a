"""R-ADM-5: every admin write leaves a durable audit record (JetStream ``AUDIT``, acknowledged
before the answer) with actor, source IP, time, object and a redacted before/after; without the
audit stream a write is refused (503) and changes nothing; ``GET /v1/audit`` is filtered, paged
and confined."""

from __future__ import annotations

import datetime as dt
import functools
import time
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from rempart.admin_api import backend as backend_module
from rempart.admin_api.redaction import Redactor
from rempart.common.audit import AUDIT_STREAM, AUDIT_TIMEOUT_SECONDS, AuditLog, AuditRetention

from .conftest import ADMIN, Harness, private_nats

GOOD_PASSWORD = "Corr3ct-Horse-Battery!"
SRS_SECRET = "srs-key-that-must-never-be-shown-0123456789"
SHORT_AUDIT_WAIT = 0.1  # seconds a refused write waits for the stream once shortened


def shorten_audit_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on the API waits ``SHORT_AUDIT_WAIT`` (not ``AUDIT_TIMEOUT_SECONDS``, a constant)
    for the audit stream before its 503: the same check, the same refusal, only sooner."""
    monkeypatch.setattr(backend_module, "AuditLog", functools.partial(AuditLog, timeout=SHORT_AUDIT_WAIT))


async def _audit(harness: Harness, headers: dict[str, str], **params: Any) -> dict[str, Any]:
    reply = await harness.http.get("/v1/audit", params=params, headers=headers)
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


async def test_r_adm_5_a_change_shows_in_the_audit_trail_with_before_and_after(
    harness: Harness, admin_headers: dict[str, str]
) -> None:
    http = harness.http
    assert (await http.post("/v1/domains", json={"name": "example.net"}, headers=admin_headers)).status_code == 201
    created = await http.post("/v1/domains/example.net/accounts",
                              json={"address": "ann", "password": GOOD_PASSWORD, "display_name": "Ann"},
                              headers=admin_headers)
    assert created.status_code == 201
    assert (await http.patch("/v1/accounts/ann@example.net", json={"display_name": "Ann Smith"},
                             headers=admin_headers)).status_code == 200
    # The record is on the stream before the answer: no waiting here.
    page = await _audit(harness, admin_headers, object_id="ann@example.net")
    update, creation = page["events"]
    assert update["action"] == "account_updated" and creation["action"] == "account_created"
    assert update["object"] == {"kind": "account", "id": "ann@example.net"} and update["domain"] == "example.net"
    assert update["actor"] == ADMIN and update["actor_ip"] == "127.0.0.1" and update["api_key"] == ""
    assert update["before"]["display_name"] == "Ann" and update["after"]["display_name"] == "Ann Smith"
    assert creation["before"] is None and creation["after"]["role"] == "user"
    when = dt.datetime.fromisoformat(update["time"])
    assert update["time"].endswith("Z") and abs(when.timestamp() - time.time()) < 60
    assert update["seq"] > creation["seq"]
    # Filters: action, kind, actor, a time range.
    assert [e["object"]["id"] for e in (await _audit(harness, admin_headers, action="domain_created"))["events"]] == [
        "example.net"]
    assert {e["object"]["kind"] for e in (await _audit(harness, admin_headers, kind="account"))["events"]} == {
        "account"}
    assert (await _audit(harness, admin_headers, actor="someone@else.example"))["events"] == []
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)).isoformat()
    assert (await _audit(harness, admin_headers, since=later))["events"] == []
    assert len((await _audit(harness, admin_headers, until=later))["events"]) == 3
    naive = await http.get("/v1/audit", params={"since": "2026-01-01T00:00:00"}, headers=admin_headers)
    assert naive.status_code == 422 and naive.json()["errors"][0]["field"] == "since"


async def test_r_adm_5_audit_pages_by_cursor(harness: Harness, admin_headers: dict[str, str]) -> None:
    for n in range(5):
        reply = await harness.http.post("/v1/domains", json={"name": f"d{n}.example"}, headers=admin_headers)
        assert reply.status_code == 201
    seen: list[str] = []
    cursor = None
    for _ in range(4):
        params: dict[str, Any] = {"limit": 2, "action": "domain_created"}
        if cursor:
            params["cursor"] = cursor
        page = await _audit(harness, admin_headers, **params)
        seen += [e["object"]["id"] for e in page["events"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"d{n}.example" for n in range(4, -1, -1)]
    bad = await harness.http.get("/v1/audit", params={"cursor": "garbage!"}, headers=admin_headers)
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
    too_many = await harness.http.get("/v1/audit", params={"limit": 100000}, headers=admin_headers)
    assert too_many.status_code == 422


async def test_r_adm_5_r_adm_3_secrets_are_redacted_in_the_audit_trail(
    harness: Harness, admin_headers: dict[str, str]
) -> None:
    http = harness.http
    patched = await http.patch("/v1/settings", json={"dns": {"srs_secrets": [SRS_SECRET]}}, headers=admin_headers)
    assert patched.status_code == 200
    await harness.add_account("bob@example.org", GOOD_PASSWORD)
    reset = await http.put("/v1/accounts/bob@example.org/password", json={"password": "An0ther-Good-Passw0rd"},
                           headers=admin_headers)
    assert reset.status_code == 204
    reply = await http.get("/v1/audit", headers=admin_headers)
    assert SRS_SECRET not in reply.text and "An0ther-Good-Passw0rd" not in reply.text
    events = {e["action"]: e for e in reply.json()["events"]}
    secrets = events["settings_changed"]["after"]["dns"]["srs_secrets"]
    assert secrets["count"] == 1 and len(secrets["fingerprints"][0]) == 12  # a keyed fingerprint only
    assert events["settings_changed"]["before"] == {}
    assert events["password_reset"]["after"] == {"password": "[redacted]"}
    # The stream itself holds no secret either (a backup of it is no leak).
    first, last = await harness.backend.audit.bounds()
    for seq in range(first, last + 1):
        raw = await harness.backend.js.get_msg(AUDIT_STREAM, seq=seq)
        assert SRS_SECRET.encode() not in raw.data


async def test_r_adm_5_without_the_audit_stream_a_write_is_refused_and_changes_nothing(
    harness: Harness, admin_headers: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await harness.add_account("cat@example.org", GOOD_PASSWORD)
    async with private_nats(harness, tmp_path / "nats") as own:
        ok = await harness.http.patch("/v1/accounts/cat@example.org", json={"display_name": "Cat"},
                                      headers=admin_headers)
        assert ok.status_code == 200  # audited on the new server's stream
        own.stop()
        started = time.monotonic()
        refused = await harness.http.patch("/v1/accounts/cat@example.org", json={"display_name": "Changed"},
                                           headers=admin_headers)
        assert refused.status_code == 503 and refused.headers["content-type"] == "application/problem+json"
        assert refused.headers["retry-after"]
        assert time.monotonic() - started < 10  # with the product's own wait (AUDIT_TIMEOUT_SECONDS)
        account = await harness.backend.directory.get_account("cat@example.org")
        assert account is not None and account.display_name == "Cat"
        shorten_audit_wait(monkeypatch)  # the next refusals, the same but sooner
        started = time.monotonic()
        domain = await harness.http.post("/v1/domains", json={"name": "never.example"}, headers=admin_headers)
        assert domain.status_code == 503 and time.monotonic() - started < AUDIT_TIMEOUT_SECONDS
        assert "never.example" not in await harness.backend.directory.list_domains()
        settings = await harness.http.patch("/v1/settings", json={"limits": {"max_hops": 9}}, headers=admin_headers)
        assert settings.status_code == 503
        assert await harness.backend.store.get_doc("server") == {}
        # Reads still work without NATS.
        assert (await harness.http.get("/v1/accounts/cat@example.org", headers=admin_headers)).status_code == 200


async def test_r_adm_5_r_adm_1_a_domain_admin_sees_only_its_domains_changes(
    harness: Harness, admin_headers: dict[str, str]
) -> None:
    http = harness.http
    await harness.add_account("boss@example.net", GOOD_PASSWORD, "domain_admin")
    await harness.add_account("dan@example.net", GOOD_PASSWORD)
    await harness.add_account("eve@example.org", GOOD_PASSWORD)
    boss = await harness.login("boss@example.net", GOOD_PASSWORD)
    for address in ("dan@example.net", "eve@example.org"):
        reply = await http.patch(f"/v1/accounts/{address}", json={"display_name": "x"}, headers=admin_headers)
        assert reply.status_code == 200
    assert (await http.patch("/v1/settings", json={"limits": {"max_hops": 9}}, headers=admin_headers)).status_code == 200
    assert (await http.patch("/v1/accounts/dan@example.net", json={"display_name": "Dan"},
                             headers=boss)).status_code == 200
    mine = await _audit(harness, boss)
    assert [(e["actor"], e["object"]["id"]) for e in mine["events"]] == [
        ("boss@example.net", "dan@example.net"), (ADMIN, "dan@example.net")]
    assert (await _audit(harness, boss, object_id="eve@example.org"))["events"] == []
    assert (await _audit(harness, boss, kind="settings"))["events"] == []
    everything = await _audit(harness, admin_headers)
    assert {e["object"]["id"] for e in everything["events"]} >= {"dan@example.net", "eve@example.org", "server"}
    await harness.add_account("joe@example.net", GOOD_PASSWORD)
    user = await harness.login("joe@example.net", GOOD_PASSWORD)
    assert (await http.get("/v1/audit", headers=user)).status_code == 403


def test_r_adm_3_audit_states_lose_every_secret_field() -> None:
    redactor = Redactor("k")
    state = {"address": "a@example.org", "password": "pw-123456", "key": "rpk_x", "key_hash": "abc",
             "private_key": "-----BEGIN", "totp_secret": "JBSW", "key_type": "rsa", "recovery_codes": ["1"],
             "nested": [{"app_password": "zzz", "name": "phone"}],
             "dns": {"srs_secrets": ["s3cr3t"], "dnsbl_zones": ["zen.example"]}}
    out = redactor.audit_state(state)
    assert out["address"] == "a@example.org" and out["key_type"] == "rsa"
    for name in ("password", "key", "key_hash", "private_key", "totp_secret", "recovery_codes"):
        assert out[name] == "[redacted]", name
    assert out["nested"] == [{"app_password": "[redacted]", "name": "phone"}]
    assert out["dns"]["srs_secrets"]["count"] == 1 and "s3cr3t" not in str(out)
    assert out["dns"]["dnsbl_zones"] == ["zen.example"]


async def test_r_adm_5_the_audit_streams_retention_is_a_setting(nats_conn: NATS) -> None:
    js = nats_conn.jetstream()
    await AuditLog(js, AuditRetention(max_age_days=7, max_bytes=1 << 20)).ensure()
    config = (await js.stream_info(AUDIT_STREAM)).config
    assert (config.max_age, config.max_bytes, config.subjects) == (7 * 86400, 1 << 20, ["rempart.audit.>"])
    # Changed settings are applied to the existing stream at the next start.
    await AuditLog(js, AuditRetention(max_age_days=400, max_bytes=0)).ensure()
    config = (await js.stream_info(AUDIT_STREAM)).config
    assert (config.max_age, config.max_bytes) == (400 * 86400, -1)
