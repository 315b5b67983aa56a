"""R-2FA-1: an admin without TOTP gets a session that can only enrol, until a code confirms it."""

from __future__ import annotations

from pathlib import Path

from rempart.common.audit import AUDIT_STREAM

from .conftest import ADMIN, ADMIN_PASSWORD, TOTP_CODE, Harness, private_nats


async def test_r_2fa_1_unenrolled_admin_session_reaches_only_enrolment(harness: Harness) -> None:
    harness.auth.must_enrol.add(ADMIN)
    reply = await harness.http.post("/v1/auth/login", json={"email": ADMIN, "password": ADMIN_PASSWORD})
    assert reply.status_code == 200
    assert reply.json()["second_factor_enrolment_required"] is True
    headers = {"Authorization": f"Bearer {reply.json()['token']}"}
    assert (await harness.http.get("/v1/me", headers=headers)).status_code == 200
    refused = await harness.http.get("/v1/domains", headers=headers)
    assert refused.status_code == 403
    assert refused.json()["detail"] == (
        "Two-step verification must be set up first: POST /v1/me/totp, then /v1/me/totp/confirm")
    wrong = await harness.http.post("/v1/me/totp/confirm", json={"code": "000000"}, headers=headers)
    assert (wrong.status_code, wrong.json()["detail"]) == (422, "The code is not valid (wrong, expired or already used)")
    assert (await harness.http.get("/v1/domains", headers=headers)).status_code == 403
    confirmed = await harness.http.post("/v1/me/totp/confirm", json={"code": "123456"}, headers=headers)
    assert confirmed.status_code == 200 and len(confirmed.json()["recovery_codes"]) == 10
    # The session that proved the second factor is now a full one.
    assert (await harness.http.get("/v1/domains", headers=headers)).status_code == 200


async def test_r_2fa_1_enrolled_admin_login_is_not_restricted(harness: Harness, admin_headers: dict[str, str]) -> None:
    assert (await harness.http.get("/v1/domains", headers=admin_headers)).status_code == 200


async def test_r_2fa_1_turning_totp_off_over_the_api_needs_a_current_code(
    harness: Harness, admin_headers: dict[str, str]
) -> None:
    http = harness.http
    off = await http.request("DELETE", "/v1/me/totp", json={"code": TOTP_CODE}, headers=admin_headers)
    assert (off.status_code, off.json()["detail"]) == (422, "The code is not valid (wrong, expired or already used)")
    assert (await http.post("/v1/me/totp", headers=admin_headers)).status_code == 200
    assert (await http.post("/v1/me/totp/confirm", json={"code": TOTP_CODE}, headers=admin_headers)).status_code == 200
    assert (await http.get("/v1/me/totp", headers=admin_headers)).json()["enabled"] is True
    wrong = await http.request("DELETE", "/v1/me/totp", json={"code": "000000"}, headers=admin_headers)
    assert wrong.status_code == 422
    assert (await http.get("/v1/me/totp", headers=admin_headers)).json()["enabled"] is True
    done = await http.request("DELETE", "/v1/me/totp", json={"code": TOTP_CODE}, headers=admin_headers)
    assert done.status_code == 204
    assert (await http.get("/v1/me/totp", headers=admin_headers)).json()["enabled"] is False


async def test_r_adm_5_self_service_writes_are_audited_without_their_secrets(
    harness: Harness, admin_headers: dict[str, str], tmp_path: Path
) -> None:
    """TOTP enrolment, confirmation and turning off, app password creation and revocation each
    leave an audit record (before: none) naming the account and, for an app password, its name;
    never the TOTP secret, a code, a recovery code or the app password."""
    http = harness.http
    enrolment = (await http.post("/v1/me/totp", headers=admin_headers)).json()
    codes = (await http.post("/v1/me/totp/confirm", json={"code": TOTP_CODE}, headers=admin_headers)).json()
    assert (await http.request("DELETE", "/v1/me/totp", json={"code": TOTP_CODE},
                               headers=admin_headers)).status_code == 204
    made = await http.post("/v1/me/app-passwords", json={"name": "phone"}, headers=admin_headers)
    assert made.status_code == 201
    assert (await http.delete("/v1/me/app-passwords/phone", headers=admin_headers)).status_code == 204
    audit = await http.get("/v1/audit", params={"object_id": ADMIN}, headers=admin_headers)
    events = audit.json()["events"]
    assert [e["action"] for e in events] == ["app_password_revoked", "app_password_created", "totp_disabled",
                                             "totp_enabled", "totp_enrolment_started"]
    assert all(e["actor"] == ADMIN and e["object"] == {"kind": "account", "id": ADMIN} for e in events)
    assert events[0]["details"] == {"app": "phone"} and events[1]["details"] == {"app": "phone"}
    secrets = [enrolment["secret"], made.json()["password"], TOTP_CODE, *codes["recovery_codes"]]
    first, last = await harness.backend.audit.bounds()
    for seq in range(first, last + 1):
        stored = (await harness.backend.js.get_msg(AUDIT_STREAM, seq=seq)).data.decode()
        assert not [s for s in secrets if s in stored]
    assert not [s for s in secrets[:2] + codes["recovery_codes"] if s in audit.text]
    # Fail closed (R-ADM-5): without the audit stream no app password is made.
    async with private_nats(harness, tmp_path / "nats") as own:
        own.stop()
        refused = await http.post("/v1/me/app-passwords", json={"name": "laptop"}, headers=admin_headers)
        assert refused.status_code == 503
    listed = (await http.get("/v1/me/app-passwords", headers=admin_headers)).json()["app_passwords"]
    assert [a["name"] for a in listed] == []
