"""R-ADM-1, R-ADM-3, R-ADM-5: API keys, scoped, hashed, revocable, with their last use, never
more than their creator may do, every key action audited."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

from rempart.admin_api.apikeys import ApiKeyStore
from rempart.common import keys

from .conftest import ADMIN, Harness

GOOD_PASSWORD = "Corr3ct-Horse-Battery!"
# Seconds between a short-lived key's creation and its expiry: at least this, more on a runner
# slow enough that making a key and using it once takes a good part of it.
EXPIRY_MARGIN = 1.5


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _make_key(harness: Harness, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    reply = await harness.http.post("/v1/api-keys", json={"name": "ci", **body}, headers=headers)
    assert reply.status_code == 201, reply.text
    created: dict[str, Any] = reply.json()
    return created


async def test_r_adm_1_a_write_key_works_on_every_route_and_records_its_last_use(
    harness: Harness, admin_headers: dict[str, str]
) -> None:
    http = harness.http
    created = await _make_key(harness, admin_headers, scope="write")
    key = created["key"]
    assert key.startswith("rpk_") and len(key) > 40
    assert created["owner"] == ADMIN and created["scope"] == "write" and created["domain"] is None
    assert created["last_used"] is None and created["expired"] is False
    assert (await http.get("/v1/domains", headers=bearer(key))).status_code == 200
    assert (await http.post("/v1/domains", json={"name": "bykey.example"}, headers=bearer(key))).status_code == 201
    assert (await http.get("/v1/settings", headers=bearer(key))).status_code == 200
    listing = await http.get("/v1/api-keys", headers=admin_headers)
    assert listing.status_code == 200 and key not in listing.text
    [shown] = listing.json()["api_keys"]
    assert shown["id"] == created["id"] and "key" not in shown
    assert shown["last_ip"] == "127.0.0.1"
    assert abs(dt.datetime.fromisoformat(shown["last_used"]).timestamp() - dt.datetime.now(dt.UTC).timestamp()) < 60
    # R-ADM-3: only a keyed hash is stored; the key is nowhere in Redis.
    async for name in harness.backend.redis.scan_iter(match="rp:admin:apikey*"):
        kind = await harness.backend.redis.type(name)
        values = await harness.backend.redis.hgetall(name) if kind == "hash" else {}
        # The secret is what follows "rpk_<id>_" (it may hold "_" itself: base64url).
        assert key not in str(values) and key.split("_", 2)[2] not in str(values)
    # R-ADM-5: the write made with the key names the key in the audit trail.
    audit = (await http.get("/v1/audit", params={"action": "domain_created"}, headers=admin_headers)).json()
    assert audit["events"][0]["api_key"] == created["id"] and audit["events"][0]["actor"] == ADMIN


async def test_r_adm_1_a_read_only_key_gets_403_on_every_write(harness: Harness, admin_headers: dict[str, str]) -> None:
    http = harness.http
    key = (await _make_key(harness, admin_headers))["key"]  # read is the default scope
    assert (await http.get("/v1/domains", headers=bearer(key))).status_code == 200
    refused = await http.post("/v1/domains", json={"name": "no.example"}, headers=bearer(key))
    assert refused.status_code == 403 and refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["detail"] == "This API key may only read"
    assert (await http.patch("/v1/settings", json={"limits": {"max_hops": 5}}, headers=bearer(key))).status_code == 403
    assert (await http.delete(f"/v1/accounts/{ADMIN}", headers=bearer(key))).status_code == 403
    assert "no.example" not in await harness.backend.directory.list_domains()


async def test_r_adm_1_revoked_and_expired_keys_get_401(harness: Harness, admin_headers: dict[str, str]) -> None:
    http = harness.http
    started = time.monotonic()
    created = await _make_key(harness, admin_headers)
    assert (await http.get("/v1/domains", headers=bearer(created["key"]))).status_code == 200
    margin = max(EXPIRY_MARGIN, 5 * (time.monotonic() - started))
    assert (await http.delete(f"/v1/api-keys/{created['id']}", headers=admin_headers)).status_code == 204
    gone = await http.get("/v1/domains", headers=bearer(created["key"]))
    assert gone.status_code == 401 and gone.headers["www-authenticate"] == "Bearer"
    assert (await http.delete(f"/v1/api-keys/{created['id']}", headers=admin_headers)).status_code == 404
    # Wide enough for this runner (the POST waits for a JetStream ack), then poll for the 401.
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=margin)).isoformat()
    short = await _make_key(harness, admin_headers, expires_at=soon)
    assert (await http.get("/v1/domains", headers=bearer(short["key"]))).status_code == 200
    deadline = time.monotonic() + margin + 10
    status = 200
    while status != 401 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        status = (await http.get("/v1/domains", headers=bearer(short["key"]))).status_code
        assert status in (200, 401)
    assert status == 401
    listed = {k["id"]: k for k in (await http.get("/v1/api-keys", headers=admin_headers)).json()["api_keys"]}
    assert listed[short["id"]]["expired"] is True
    # A forged key with a real id is refused too.
    forged = f"rpk_{short['id']}_" + "A" * 43
    assert (await http.get("/v1/domains", headers=bearer(forged))).status_code == 401
    past = await http.post("/v1/api-keys", json={"name": "old", "expires_at": "2020-01-01T00:00:00Z"},
                           headers=admin_headers)
    assert past.status_code == 422 and past.json()["errors"][0]["field"] == "expires_at"


async def test_r_adm_1_a_key_never_does_more_than_its_creator(harness: Harness, admin_headers: dict[str, str]) -> None:
    http = harness.http
    await harness.add_account("boss@example.net", GOOD_PASSWORD, "domain_admin")
    await harness.add_account("zed@example.org", GOOD_PASSWORD)
    boss = await harness.login("boss@example.net", GOOD_PASSWORD)
    # A domain admin's key is confined to its domain; another domain cannot even be named.
    assert (await http.post("/v1/api-keys", json={"name": "x", "domain": "example.org"},
                            headers=boss)).status_code == 404
    mine = await _make_key(harness, boss, scope="write")
    assert mine["domain"] == "example.net"
    key = bearer(mine["key"])
    assert (await http.get("/v1/domains", headers=key)).json()["domains"] == ["example.net"]
    assert (await http.get("/v1/accounts/zed@example.org", headers=key)).status_code == 404
    assert (await http.get("/v1/settings", headers=key)).status_code == 403
    # A superadmin's key confined to a domain acts as that domain's admin.
    confined = bearer((await _make_key(harness, admin_headers, scope="write", domain="example.net"))["key"])
    assert (await http.get("/v1/settings", headers=confined)).status_code == 403
    assert (await http.get("/v1/accounts/zed@example.org", headers=confined)).status_code == 404
    assert (await http.get("/v1/accounts/boss@example.net", headers=confined)).status_code == 200
    # The creator demoted: the key loses the admin rights at once; disabled: the key is dead.
    demoted = await http.patch("/v1/accounts/boss@example.net", json={"role": "user"}, headers=admin_headers)
    assert demoted.status_code == 200
    assert (await http.get("/v1/domains", headers=key)).status_code == 403
    assert (await http.patch("/v1/accounts/boss@example.net", json={"enabled": False},
                             headers=admin_headers)).status_code == 200
    assert (await http.get("/v1/domains", headers=key)).status_code == 401
    # Users make no keys.
    await harness.add_account("joe@example.net", GOOD_PASSWORD)
    joe = await harness.login("joe@example.net", GOOD_PASSWORD)
    assert (await http.post("/v1/api-keys", json={"name": "x"}, headers=joe)).status_code == 403


async def test_r_adm_1_a_key_makes_no_keys_and_reaches_no_self_service(
    harness: Harness, admin_headers: dict[str, str]
) -> None:
    http = harness.http
    key = bearer((await _make_key(harness, admin_headers, scope="write"))["key"])
    assert (await http.post("/v1/api-keys", json={"name": "child", "scope": "write"}, headers=key)).status_code == 403
    assert (await http.get("/v1/api-keys", headers=key)).status_code == 403
    assert (await http.get("/v1/me", headers=key)).status_code == 403
    assert (await http.post("/v1/me/password", json={"old_password": "x", "new_password": "y", "confirm": "y"},
                            headers=key)).status_code == 403


async def test_r_adm_5_key_actions_are_audited_and_listing_is_confined(
    harness: Harness, admin_headers: dict[str, str]
) -> None:
    http = harness.http
    await harness.add_account("boss@example.net", GOOD_PASSWORD, "domain_admin")
    boss = await harness.login("boss@example.net", GOOD_PASSWORD)
    theirs = await _make_key(harness, boss, name="theirs")
    ours = await _make_key(harness, admin_headers, name="ours")
    assert [k["name"] for k in (await http.get("/v1/api-keys", headers=boss)).json()["api_keys"]] == ["theirs"]
    assert (await http.get(f"/v1/api-keys/{ours['id']}", headers=boss)).status_code == 404
    assert (await http.delete(f"/v1/api-keys/{ours['id']}", headers=boss)).status_code == 404
    assert (await http.delete(f"/v1/api-keys/{theirs['id']}", headers=admin_headers)).status_code == 204
    audit = await http.get("/v1/audit", params={"kind": "api_key"}, headers=admin_headers)
    assert theirs["key"] not in audit.text and ours["key"] not in audit.text
    actions = [(e["action"], e["object"]["id"], e["actor"]) for e in audit.json()["events"]]
    assert actions == [("api_key_revoked", theirs["id"], ADMIN), ("api_key_created", ours["id"], ADMIN),
                       ("api_key_created", theirs["id"], "boss@example.net")]
    boss_view = (await http.get("/v1/audit", params={"kind": "api_key"}, headers=boss)).json()["events"]
    assert {e["object"]["id"] for e in boss_view} == {theirs["id"]}
    # Pages of the key list.
    for n in range(3):
        await _make_key(harness, admin_headers, name=f"k{n}")
    first = (await http.get("/v1/api-keys", params={"limit": 2}, headers=admin_headers)).json()
    second = (await http.get("/v1/api-keys", params={"limit": 2, "cursor": first["next_cursor"]},
                             headers=admin_headers)).json()
    assert [k["name"] for k in first["api_keys"] + second["api_keys"]] == ["ours", "k0", "k1", "k2"]
    assert second["next_cursor"] is None


async def _boss_key(harness: Harness) -> tuple[dict[str, str], dict[str, Any]]:
    """A domain admin's session and a write key it made (the phished-session scenario)."""
    await harness.add_account("boss@example.net", GOOD_PASSWORD, "domain_admin")
    boss = await harness.login("boss@example.net", GOOD_PASSWORD)
    key = await _make_key(harness, boss, scope="write")
    assert (await harness.http.get("/v1/domains", headers=bearer(key["key"]))).status_code == 200
    return boss, key


async def _assert_key_revoked(harness: Harness, admin_headers: dict[str, str], key: dict[str, Any],
                              action: str) -> None:
    refused = await harness.http.get("/v1/domains", headers=bearer(key["key"]))
    assert refused.status_code == 401, refused.text
    assert refused.json()["detail"] == "Invalid, expired or revoked API key"
    listed = (await harness.http.get("/v1/api-keys", headers=admin_headers)).json()["api_keys"]
    assert key["id"] not in [k["id"] for k in listed]
    assert (await harness.http.get(f"/v1/api-keys/{key['id']}", headers=admin_headers)).status_code == 404
    audit = (await harness.http.get("/v1/audit", params={"action": action}, headers=admin_headers)).json()
    assert audit["events"][0]["details"]["api_access_revoked"] == "1"


async def test_r_adm_4_a_password_reset_revokes_the_accounts_api_keys(
    harness: Harness, admin_headers: dict[str, str]
) -> None:
    """R-ADM-4: the helpdesk resets the password of a phished admin: the key made with the
    stolen session is a 401 and gone from the listing (it was 200 before this fix)."""
    _, key = await _boss_key(harness)
    reset = await harness.http.put("/v1/accounts/boss@example.net/password",
                                   json={"password": "An0ther-Long-Passw0rd!"}, headers=admin_headers)
    assert reset.status_code == 204, reset.text
    await _assert_key_revoked(harness, admin_headers, key, "password_reset")


async def test_r_adm_4_a_2fa_reset_revokes_the_accounts_api_keys(
    harness: Harness, admin_headers: dict[str, str]
) -> None:
    _, key = await _boss_key(harness)
    reset = await harness.http.delete("/v1/accounts/boss@example.net/totp", headers=admin_headers)
    assert reset.status_code == 200, reset.text
    await _assert_key_revoked(harness, admin_headers, key, "totp_reset")


async def test_r_adm_4_ending_sessions_revokes_the_accounts_api_keys(
    harness: Harness, admin_headers: dict[str, str]
) -> None:
    boss, key = await _boss_key(harness)
    mine = await _make_key(harness, admin_headers)  # another account's key is untouched
    ended = await harness.http.delete("/v1/accounts/boss@example.net/sessions", headers=admin_headers)
    assert ended.status_code == 204, ended.text
    assert (await harness.http.get("/v1/domains", headers=boss)).status_code == 401
    await _assert_key_revoked(harness, admin_headers, key, "sessions_ended")
    assert (await harness.http.get("/v1/domains", headers=bearer(mine["key"]))).status_code == 200


async def test_r_adm_4_a_key_is_refused_once_its_creators_epoch_moved_even_if_its_record_stays(
    harness: Harness, admin_headers: dict[str, str]
) -> None:
    """The epoch is checked on every use, so a key whose deletion was missed (made in the same
    instant as the reset, say) is still refused."""
    _, key = await _boss_key(harness)
    assert await harness.backend.directory.end_sessions("boss@example.net") is not None
    refused = await harness.http.get("/v1/domains", headers=bearer(key["key"]))
    assert refused.status_code == 401
    # A record without the epoch (damaged) is refused too: fail closed.
    other = await _make_key(harness, admin_headers)
    await harness.backend.redis.hdel(keys.admin_api_key(other["id"]), "owner_epoch")
    assert (await harness.http.get("/v1/domains", headers=bearer(other["key"]))).status_code == 401


async def test_r_adm_1_a_use_recorded_after_a_revocation_does_not_bring_the_key_back(
    harness: Harness, admin_headers: dict[str, str]
) -> None:
    """A request that passed the checks just before the key was revoked records its use after
    the revocation: no partial record without a TTL may appear (before: HSET recreated it)."""
    created = await _make_key(harness, admin_headers)
    store = api_keys_of(harness)
    assert await store.record_use(created["id"], "192.0.2.7") is True
    assert (await harness.http.delete(f"/v1/api-keys/{created['id']}", headers=admin_headers)).status_code == 204
    assert await store.record_use(created["id"], "192.0.2.7") is False
    assert await harness.backend.redis.exists(keys.admin_api_key(created["id"])) == 0
    assert (await harness.http.get(f"/v1/api-keys/{created['id']}", headers=admin_headers)).status_code == 404


def api_keys_of(harness: Harness) -> ApiKeyStore:
    return ApiKeyStore(harness.backend.redis, harness.settings.secret_key.get_secret_value())
