"""R-ADM-4: unlock, reset 2FA, revoke app passwords and sessions; password changes end sessions."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NATS

from rempart.common.pb.events.v1 import events_pb2

from .conftest import ADMIN, Harness

GOOD_PASSWORD = "Corr3ct-Horse-Battery!"
NEW_PASSWORD = "Br4nd-New-Pass-Word!"
BOSS = "boss@example.org"
IVY = "ivy@example.org"


async def _people(harness: Harness) -> dict[str, str]:
    await harness.add_account(BOSS, GOOD_PASSWORD, "domain_admin")
    await harness.add_account(IVY, GOOD_PASSWORD)
    return await harness.login(BOSS, GOOD_PASSWORD)


async def _alive(harness: Harness, headers: dict[str, str]) -> bool:
    return (await harness.http.get("/v1/me", headers=headers)).status_code == 200


async def test_r_adm_4_unlock_a_locked_account(harness: Harness, nats_conn: NATS) -> None:
    boss = await _people(harness)
    harness.auth.locked.add(IVY)
    refused = await harness.http.post("/v1/auth/login", json={"email": IVY, "password": GOOD_PASSWORD})
    assert refused.status_code == 401
    audited: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def on_audit(msg: object) -> None:
        if not audited.done():
            audited.set_result(msg.data)  # type: ignore[attr-defined]

    sub = await nats_conn.subscribe("rempart.events.admin.account_unlocked", cb=on_audit)
    await nats_conn.flush()
    reply = await harness.http.post(f"/v1/accounts/{IVY}/unlock", headers=boss)
    assert reply.status_code == 200 and reply.json() == {"account": IVY, "was_locked": True}
    event = events_pb2.Event.FromString(await asyncio.wait_for(audited, 5))
    assert (event.attributes["actor"], event.attributes["target"]) == (BOSS, IVY)
    await sub.unsubscribe()
    assert await _alive(harness, await harness.login(IVY, GOOD_PASSWORD))
    again = await harness.http.post(f"/v1/accounts/{IVY}/unlock", headers=boss)
    assert again.json()["was_locked"] is False
    # Never a superadmin's account for a domain admin; never another tenant's (a 404).
    assert (await harness.http.post(f"/v1/accounts/{ADMIN}/unlock", headers=boss)).status_code == 403
    await harness.add_account("zed@other.example", GOOD_PASSWORD)
    assert (await harness.http.post("/v1/accounts/zed@other.example/unlock", headers=boss)).status_code == 404


async def test_r_adm_4_reset_2fa_ends_the_sessions(harness: Harness) -> None:
    boss = await _people(harness)
    ivy = await harness.login(IVY, GOOD_PASSWORD)
    assert (await harness.http.post("/v1/me/totp", headers=ivy)).status_code == 200
    assert (await harness.http.get("/v1/me/totp", headers=ivy)).json()["enabled"] is True
    reply = await harness.http.delete(f"/v1/accounts/{IVY}/totp", headers=boss)
    assert reply.status_code == 200 and reply.json() == {"account": IVY, "was_enabled": True}
    assert IVY not in harness.auth.totp_secrets
    assert not await _alive(harness, ivy)  # a lost phone may be a stolen one
    assert await _alive(harness, boss)
    own = await harness.http.delete(f"/v1/accounts/{BOSS}/totp", headers=boss)
    assert own.status_code == 403
    assert own.json()["detail"] == "Turn off your own two-step verification with a current code: DELETE /v1/me/totp"


async def test_r_adm_4_revoke_app_passwords(harness: Harness) -> None:
    boss = await _people(harness)
    ivy = await harness.login(IVY, GOOD_PASSWORD)
    for name in ("phone", "laptop"):
        assert (await harness.http.post("/v1/me/app-passwords", json={"name": name}, headers=ivy)).status_code == 201
    listed = await harness.http.get(f"/v1/accounts/{IVY}/app-passwords", headers=boss)
    assert [p["name"] for p in listed.json()["app_passwords"]] == ["phone", "laptop"]
    assert "password" not in listed.json()["app_passwords"][0]
    assert (await harness.http.delete(f"/v1/accounts/{IVY}/app-passwords/phone", headers=boss)).status_code == 204
    assert (await harness.http.delete(f"/v1/accounts/{IVY}/app-passwords/phone", headers=boss)).status_code == 404
    everything = await harness.http.delete(f"/v1/accounts/{IVY}/app-passwords", headers=boss)
    assert everything.status_code == 200 and everything.json() == {"account": IVY, "revoked": 1}
    assert (await harness.http.get(f"/v1/accounts/{IVY}/app-passwords", headers=boss)).json() == {"app_passwords": []}


async def test_r_adm_4_end_a_users_sessions(harness: Harness) -> None:
    boss = await _people(harness)
    first, second = await harness.login(IVY, GOOD_PASSWORD), await harness.login(IVY, GOOD_PASSWORD)
    assert (await harness.http.delete(f"/v1/accounts/{IVY}/sessions", headers=boss)).status_code == 204
    assert not await _alive(harness, first) and not await _alive(harness, second)
    assert await _alive(harness, await harness.login(IVY, GOOD_PASSWORD))  # a new login works


async def test_r_adm_4_own_password_change_ends_the_other_sessions(harness: Harness) -> None:
    await _people(harness)
    here, elsewhere = await harness.login(IVY, GOOD_PASSWORD), await harness.login(IVY, GOOD_PASSWORD)
    changed = await harness.http.post(
        "/v1/me/password",
        json={"old_password": GOOD_PASSWORD, "new_password": NEW_PASSWORD, "confirm": NEW_PASSWORD}, headers=here)
    assert changed.status_code == 204
    assert await _alive(harness, here)
    assert not await _alive(harness, elsewhere)


async def test_r_adm_4_password_reset_ends_the_sessions(harness: Harness, admin_headers: dict[str, str]) -> None:
    boss = await _people(harness)
    ivy = await harness.login(IVY, GOOD_PASSWORD)
    reset = await harness.http.put(f"/v1/accounts/{IVY}/password", json={"password": NEW_PASSWORD}, headers=boss)
    assert reset.status_code == 204
    assert not await _alive(harness, ivy)
    assert await _alive(harness, await harness.login(IVY, NEW_PASSWORD))
    # A superadmin resetting its own password through the account route keeps this session only.
    other_admin_session = await harness.login(ADMIN, harness.auth.passwords[ADMIN])
    mine = await harness.http.put(f"/v1/accounts/{ADMIN}/password", json={"password": NEW_PASSWORD},
                                  headers=admin_headers)
    assert mine.status_code == 204
    assert await _alive(harness, admin_headers) and not await _alive(harness, other_admin_session)
