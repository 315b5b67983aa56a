"""R-2FA-1: an admin without TOTP gets a session that can only enrol, until a code confirms it."""

from __future__ import annotations

from .conftest import ADMIN, ADMIN_PASSWORD, TOTP_CODE, Harness


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
