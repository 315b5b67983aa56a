"""R-ADM-3: no answer carries a secret. Secret settings are write-only, shown as summaries."""

from __future__ import annotations

import asyncio
import re

from nats.aio.client import Client as NATS

from rempart.admin_api.redaction import Redactor, secret_paths
from rempart.common import keys
from rempart.common.config import MailSettings
from rempart.common.dkim import DkimKeyStore
from rempart.common.events import EventBus
from rempart.common.secretbox import SecretBox

from .conftest import ADMIN_PASSWORD, Harness
from .queue_support import queued

GOOD_PASSWORD = "Corr3ct-Horse-Battery!"
SRS_ONE = "srs-key-one-4b1d9f0e7a"
SRS_TWO = "srs-key-two-93c2aa81ff"
IMPORTED_HASH = "{SSHA512}c2VjcmV0LWhhc2gtdmFsdWUtbm90LXRvLWJlLXNlZW4="
EVENT_SECRET = "leaked-in-an-event-attr-77"
BLOCKED_IP = "192.0.2.44"
QUEUE_ID = "0190000000000000c0ffeec0ffeec0ff"


async def _stored_srs(harness: Harness) -> list[str]:
    return list((await harness.backend.store.get_doc("server")).get("dns", {}).get("srs_secrets", []))


async def test_r_adm_3_srs_secrets_are_write_only(harness: Harness, admin_headers: dict[str, str]) -> None:
    http = harness.http
    patched = await http.patch("/v1/settings", json={"dns": {"srs_enabled": True, "srs_secrets": [SRS_ONE, SRS_TWO]}},
                               headers=admin_headers)
    assert patched.status_code == 200, patched.text
    assert SRS_ONE not in patched.text and SRS_TWO not in patched.text
    summary = patched.json()["settings"]["dns"]["srs_secrets"]
    assert summary["count"] == 2 and len(summary["fingerprints"]) == 2
    assert summary["fingerprints"][0] != summary["fingerprints"][1]
    got = (await http.get("/v1/settings", headers=admin_headers)).json()
    assert got["settings"]["dns"]["srs_secrets"] == summary
    assert await _stored_srs(harness) == [SRS_ONE, SRS_TWO]

    # Read-modify-write: the summary sent back keeps the secret; so does a replace that omits it.
    got["settings"]["limits"]["max_hops"] = 25
    replaced = await http.put("/v1/settings", json=got["settings"], headers=admin_headers)
    assert replaced.status_code == 200, replaced.text
    assert await _stored_srs(harness) == [SRS_ONE, SRS_TWO]
    assert (await http.put("/v1/settings", json={"limits": {"max_hops": 24}}, headers=admin_headers)).status_code == 200
    assert await _stored_srs(harness) == [SRS_ONE, SRS_TWO]
    assert (await http.patch("/v1/settings", json={"dns": {"srs_secrets": summary}},
                             headers=admin_headers)).status_code == 200
    assert await _stored_srs(harness) == [SRS_ONE, SRS_TWO]

    # Rotation: a new key nobody sees signs; the newest old one still verifies.
    rotated = await http.post("/v1/settings/srs-secrets/rotation", json={"keep_previous": 1}, headers=admin_headers)
    assert rotated.status_code == 200, rotated.text
    after = rotated.json()["srs_secrets"]
    assert after["count"] == 2 and after["fingerprints"][1] == summary["fingerprints"][0]
    stored = await _stored_srs(harness)
    assert stored[1] == SRS_ONE and len(stored[0]) >= 40 and stored[0] not in rotated.text

    # Clearing is explicit.
    cleared = await http.patch("/v1/settings", json={"dns": {"srs_secrets": []}}, headers=admin_headers)
    assert cleared.json()["settings"]["dns"]["srs_secrets"] == {"count": 0, "fingerprints": []}
    assert await _stored_srs(harness) == []


async def test_r_adm_3_openapi_marks_secrets(harness: Harness) -> None:
    spec = (await harness.http.get("/v1/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    assert secret_paths(MailSettings) == [("dns", "srs_secrets")]
    # Answers type a secret as its summary, never as its value.
    assert schemas["DnsSettingsView"]["properties"]["srs_secrets"]["$ref"] == "#/components/schemas/SecretSummary"
    assert schemas["ServerSettingsOut"]["properties"]["settings"]["$ref"] == "#/components/schemas/MailSettingsView"


def test_r_adm_3_fingerprints_are_keyed() -> None:
    assert Redactor("one").fingerprint(SRS_ONE) != Redactor("two").fingerprint(SRS_ONE)
    assert Redactor("one").fingerprint(SRS_ONE) == Redactor("one").fingerprint(SRS_ONE)
    assert Redactor("k").attributes({"password": "x", "app_password_name": "y", "reason": "z"}) == {
        "password": "[redacted]", "app_password_name": "[redacted]", "reason": "z"}


async def _seed_every_kind_of_secret(harness: Harness, admin_headers: dict[str, str], nats_conn: NATS) -> set[str]:
    """Real data behind every GET, holding every kind of secret the API handles."""
    http = harness.http
    secrets_used: set[str] = {ADMIN_PASSWORD, GOOD_PASSWORD, SRS_ONE, SRS_TWO, IMPORTED_HASH, EVENT_SECRET}
    assert (await http.patch("/v1/settings", json={"dns": {"srs_secrets": [SRS_ONE, SRS_TWO]}},
                             headers=admin_headers)).status_code == 200
    rotated = await http.post("/v1/settings/srs-secrets/rotation", json={}, headers=admin_headers)
    assert rotated.status_code == 200
    secrets_used.update(await _stored_srs(harness))
    assert (await http.put("/v1/domains/example.org/settings",
                           json={"recipients": {"unknown_recipient_action": "discard"}},
                           headers=admin_headers)).status_code == 200
    made = await http.post("/v1/domains/example.org/accounts", json={"address": "ursula", "password": GOOD_PASSWORD},
                           headers=admin_headers)
    assert made.status_code == 201, made.text
    assert (await http.put("/v1/accounts/ursula@example.org/settings", json={"limits": {"max_messages_per_day": 9}},
                           headers=admin_headers)).status_code == 200
    assert (await http.post("/v1/aliases", json={"alias": "team@example.org", "targets": ["ursula@example.org"]},
                            headers=admin_headers)).status_code == 201
    assert (await http.put("/v1/domain-aliases/example.net", json={"target": "example.org"},
                           headers=admin_headers)).status_code == 200
    assert (await http.post("/v1/accounts/ursula@example.org/password-hash", json={"hash": IMPORTED_HASH},
                            headers=admin_headers)).status_code == 204
    ursula = await harness.login("ursula@example.org", GOOD_PASSWORD)
    secrets_used.add(ursula["Authorization"].removeprefix("Bearer "))
    secrets_used.add(admin_headers["Authorization"].removeprefix("Bearer "))
    totp = await http.post("/v1/me/totp", headers=ursula)
    assert totp.status_code == 200
    secrets_used.add(totp.json()["secret"])
    app_password = await http.post("/v1/me/app-passwords", json={"name": "phone"}, headers=ursula)
    assert app_password.status_code == 201
    secrets_used.add(app_password.json()["password"])
    await harness.backend.redis.set(keys.ips_block(BLOCKED_IP), '{"reason": "R-IPS-2 failed logins"}', ex=600)
    await harness.backend.redis.zadd(keys.IPS_BLOCKS, {BLOCKED_IP: 1e10})
    dkim_key = await http.post("/v1/domains/example.org/dkim-keys", json={"selector": "rp202601"},
                               headers=admin_headers)
    assert dkim_key.status_code == 201
    for signing_key in await DkimKeyStore(harness.backend.redis, SecretBox(
            harness.settings.secret_key.get_secret_value())).signing_keys("example.org"):
        pem_lines = [line for line in signing_key.private_key.decode().splitlines() if "PRIVATE KEY" not in line]
        secrets_used.update(pem_lines[1:-1])  # R-OUT-5: the DKIM private key, line by line
    await queued(harness.backend, "ursula@example.org", ["friend@remote.test"], transaction_id=QUEUE_ID)
    # R-ADM-1: an API key, and the keyed hash Redis holds of it; neither is ever shown again.
    api_key = await http.post("/v1/api-keys", json={"name": "ci", "scope": "write"}, headers=admin_headers)
    assert api_key.status_code == 201
    secrets_used.add(api_key.json()["key"])
    secrets_used.add(str(await harness.backend.redis.hget(f"rp:admin:apikey:{api_key.json()['id']}", "hash")))
    harness.api_key_id = api_key.json()["id"]  # type: ignore[attr-defined]
    assert (await http.get("/v1/domains", headers={"Authorization": f"Bearer {api_key.json()['key']}"})).status_code \
        == 200  # its last use shows in the listing
    await EventBus(nats_conn, "auth").publish("auth", "login_failed", account="ursula@example.org",
                                              password=EVENT_SECRET, client_ip=BLOCKED_IP)
    await nats_conn.flush()
    return secrets_used


async def test_r_adm_3_no_get_of_the_openapi_shows_a_secret(
    harness: Harness, admin_headers: dict[str, str], nats_conn: NATS
) -> None:
    secrets_used = await _seed_every_kind_of_secret(harness, admin_headers, nats_conn)
    await asyncio.sleep(0.1)  # the event reaches the EVENTS stream
    values = {"domain": "example.org", "address": "ursula@example.org", "alias": "team@example.org",
              "ip": BLOCKED_IP, "domain_alias": "example.net", "selector": "rp202601", "queue_id": QUEUE_ID,
              "key_id": harness.api_key_id}  # type: ignore[attr-defined]
    spec = (await harness.http.get("/v1/openapi.json")).json()
    walked = []
    for path, operations in spec["paths"].items():
        if "get" not in operations:
            continue
        names = re.findall(r"\{([^}]+)\}", path)
        assert set(names) <= set(values), f"give {path} a real value to read"
        concrete = path.format(**{name: values[name] for name in names})
        for headers in (admin_headers, await harness.login("ursula@example.org", GOOD_PASSWORD)):
            reply = await harness.http.get(concrete, headers=headers)
            for secret in secrets_used:
                assert secret not in reply.text, (path, secret)
        reply = await harness.http.get(concrete, headers=admin_headers)
        if path.startswith("/v1/me/"):
            continue  # the superadmin's own (empty) 2FA state; ursula read hers above
        assert reply.status_code == 200, (path, reply.text)
        walked.append(path)
    assert len(walked) >= 12
    events = (await harness.http.get("/v1/events", params={"area": "auth"}, headers=admin_headers)).json()["events"]
    assert events[0]["attributes"]["password"] == "[redacted]"
