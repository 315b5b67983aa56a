"""R-OUT-5 / R-ADM-3 / R-ADM-1: DKIM keys through the admin API: generated on the server, listed
with the TXT record to publish, rotated, deleted, each an audit event; the private key is in no
answer and no log line; a domain admin manages its own domain's keys and no other's."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import re

import pytest
from nats.aio.client import Client as NATS

from rempart.common import dkim
from rempart.common.secretbox import SecretBox

from .conftest import Harness

GOOD_PASSWORD = "Corr3ct-Horse-Battery!"
BOSS = "boss@example.org"  # domain admin of example.org
KEYS = "/v1/domains/example.org/dkim-keys"


def store(harness: Harness) -> dkim.DkimKeyStore:
    return dkim.DkimKeyStore(harness.backend.redis, SecretBox(harness.settings.secret_key.get_secret_value()))


def private_material(key: bytes) -> set[str]:
    """What would give a private key away in a text: its base64 (or PEM lines), and its seal."""
    text = key.decode()
    lines = {line for line in text.splitlines() if len(line) >= 40 and "PRIVATE KEY" not in line}
    raw = base64.b64decode("".join(line for line in text.splitlines() if "PRIVATE KEY" not in line))
    return lines | {text.strip(), base64.b64encode(raw).decode()[:40], raw.hex()[:40]}


async def private_keys(harness: Harness, domain: str = "example.org") -> set[str]:
    found = set()
    for key in await store(harness).signing_keys(domain):
        found |= private_material(key.private_key)
    raw = await harness.backend.redis.hgetall(f"rp:dkim:keys:{domain}")
    for value in raw.values():
        found.add(json.loads(value)["private_sealed"])
    return found


async def test_r_out_5_dkim_keys_generate_list_rotate_delete_never_show_the_private_key(
        harness: Harness, admin_headers: dict[str, str], nats_conn: NATS, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    http = harness.http
    month = dt.datetime.now(dt.UTC).strftime("%Y%m")
    secrets: set[str] = set()

    made = await http.post(KEYS, json={}, headers=admin_headers)
    assert made.status_code == 201, made.text
    rsa_key = made.json()
    assert (rsa_key["selector"], rsa_key["algorithm"], rsa_key["key_type"], rsa_key["bits"], rsa_key["status"]) == (
        f"rp{month}", "rsa-sha256", "rsa", 2048, "active")
    assert rsa_key["dns_name"] == f"rp{month}._domainkey.example.org"
    assert rsa_key["txt_value"] == f"v=DKIM1; k=rsa; p={rsa_key['public_key']}"
    record = rsa_key["txt_record"].removeprefix(f"rp{month}._domainkey.example.org. IN TXT ")
    strings = re.findall(r'"([^"]*)"', record)  # a 2048-bit key needs two strings (RFC 1035 3.3.14)
    assert len(strings) == 2 and "".join(strings) == rsa_key["txt_value"] and made.headers["ETag"]
    assert record == " ".join(f'"{s}"' for s in strings) and all(len(s) <= 255 for s in strings)
    secrets |= await private_keys(harness)

    ed = await http.post(KEYS, json={"algorithm": "ed25519-sha256"}, headers=admin_headers)
    assert ed.status_code == 201, ed.text
    assert (ed.json()["selector"], ed.json()["bits"]) == (f"rp{month}e", 256)
    assert ed.json()["txt_record"] == f'rp{month}e._domainkey.example.org. IN TXT "{ed.json()["txt_value"]}"'
    assert ed.json()["txt_value"].startswith("v=DKIM1; k=ed25519; p=")
    secrets |= await private_keys(harness)

    # One active key per algorithm: a second is a rotation; a taken or malformed selector is refused.
    again = await http.post(KEYS, json={"algorithm": "rsa-sha256", "selector": "other"}, headers=admin_headers)
    assert again.status_code == 409 and "rotate" in again.json()["detail"]
    taken = await http.post(KEYS, json={"algorithm": "ed25519-sha256", "selector": f"rp{month}"},
                            headers=admin_headers)
    assert taken.status_code == 409
    bad = await http.post(KEYS, json={"selector": "bad_selector!"}, headers=admin_headers)
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "selector"
    assert (await http.post(KEYS, json={"algorithm": "rsa-sha1"}, headers=admin_headers)).status_code == 422

    listed = await http.get(KEYS, headers=admin_headers)
    assert [(k["selector"], k["status"]) for k in listed.json()["keys"]] == [(f"rp{month}", "active"),
                                                                            (f"rp{month}e", "active")]
    one = await http.get(f"{KEYS}/rp{month}", headers=admin_headers)
    assert one.status_code == 200 and one.json() == rsa_key and one.headers["ETag"] == made.headers["ETag"]

    stale = await http.post(f"{KEYS}/rp{month}/rotation", json={}, headers={**admin_headers, "If-Match": '"0"'})
    assert stale.status_code == 412
    rotated = await http.post(f"{KEYS}/rp{month}/rotation", json={},
                              headers={**admin_headers, "If-Match": one.headers["ETag"]})
    assert rotated.status_code == 200, rotated.text
    new, old = rotated.json()["active"], rotated.json()["retired"]
    assert (new["selector"], new["status"], new["algorithm"]) == (f"rp{month}-2", "active", "rsa-sha256")
    assert (old["selector"], old["status"]) == (f"rp{month}", "retired") and old["retired_at"]
    assert old["txt_value"] == rsa_key["txt_value"]  # still to be published
    assert new["public_key"] != rsa_key["public_key"]
    secrets |= await private_keys(harness)
    # The retired key cannot be rotated again; the relays sign with the two active ones.
    assert (await http.post(f"{KEYS}/rp{month}/rotation", json={}, headers=admin_headers)).status_code == 409
    signing = await store(harness).signing_keys("example.org")
    assert sorted(k.selector for k in signing) == [f"rp{month}-2", f"rp{month}e"]
    assert not [s for k in signing for s in private_material(k.private_key) if s in repr(k)]

    assert (await http.delete(f"{KEYS}/rp{month}", headers={**admin_headers, "If-Match": '"0"'})).status_code == 412
    assert (await http.delete(f"{KEYS}/rp{month}", headers=admin_headers)).status_code == 204
    assert (await http.get(f"{KEYS}/rp{month}", headers=admin_headers)).status_code == 404
    assert (await http.delete(f"{KEYS}/rp{month}", headers=admin_headers)).status_code == 404
    assert [k["selector"] for k in (await http.get(KEYS, headers=admin_headers)).json()["keys"]] == [
        f"rp{month}e", f"rp{month}-2"]

    await asyncio.sleep(0.1)  # the audit events reach the EVENTS stream
    events = (await http.get("/v1/events", params={"area": "admin"}, headers=admin_headers)).json()["events"]
    kinds = [e["what"] for e in events if e["what"].startswith("dkim_")]
    assert sorted(kinds) == ["dkim_key_created", "dkim_key_created", "dkim_key_deleted", "dkim_key_rotated"]
    # R-ADM-3: no answer, event or log line carried a private key, its base64 or its seal.
    assert len(secrets) >= 9
    for body in harness.bodies:
        for secret in secrets:
            assert secret.encode() not in body, secret[:12]
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "dkim_key_rotated" in logged or "admin change" in logged
    for secret in secrets:
        assert secret not in logged, secret[:12]


async def test_r_adm_1_domain_admin_manages_only_its_own_domains_dkim_keys(
        harness: Harness, admin_headers: dict[str, str]) -> None:
    http = harness.http
    await harness.add_account("frank@other.example", GOOD_PASSWORD)
    await harness.add_account(BOSS, GOOD_PASSWORD, "domain_admin")
    await harness.add_account("gina@example.org", GOOD_PASSWORD)
    theirs = await http.post("/v1/domains/other.example/dkim-keys", json={"selector": "s1"}, headers=admin_headers)
    assert theirs.status_code == 201
    before = await harness.backend.redis.hgetall("rp:dkim:keys:other.example")
    boss = await harness.login(BOSS, GOOD_PASSWORD)
    # Its own domain: the whole cycle.
    mine = await http.post(KEYS, json={"selector": "s1", "algorithm": "ed25519-sha256"}, headers=boss)
    assert mine.status_code == 201, mine.text
    assert (await http.get(KEYS, headers=boss)).json()["keys"][0]["selector"] == "s1"
    assert (await http.post(f"{KEYS}/s1/rotation", json={"selector": "s2"}, headers=boss)).status_code == 200
    assert (await http.delete(f"{KEYS}/s1", headers=boss)).status_code == 204
    # Another tenant's domain, existing or not: the same 404, and nothing changes there.
    for method, path, body in (("GET", "/v1/domains/{d}/dkim-keys", None),
                               ("POST", "/v1/domains/{d}/dkim-keys", {"selector": "s9"}),
                               ("GET", "/v1/domains/{d}/dkim-keys/s1", None),
                               ("POST", "/v1/domains/{d}/dkim-keys/s1/rotation", {}),
                               ("DELETE", "/v1/domains/{d}/dkim-keys/s1", None)):
        answers = []
        for domain in ("other.example", "ghost.example"):
            reply = await http.request(method, path.format(d=domain), json=body, headers=boss)
            assert reply.status_code == 404, (method, path, domain, reply.text)
            answers.append({k: v for k, v in reply.json().items() if k != "instance"})
        assert answers[0] == answers[1], (method, path)
    assert await harness.backend.redis.hgetall("rp:dkim:keys:other.example") == before
    # A user has no say over keys, even of its own domain.
    gina = await harness.login("gina@example.org", GOOD_PASSWORD)
    assert (await http.get(KEYS, headers=gina)).status_code == 403
    assert (await http.post(KEYS, json={}, headers=gina)).status_code == 403

