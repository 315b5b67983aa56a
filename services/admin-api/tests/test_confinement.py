"""R-ADM-1: a domain admin is confined to its domain on every resource; another's is a 404."""

from __future__ import annotations

import re
from typing import Any

from rempart.admin_api.apikeys import ApiKeyStore
from rempart.common import keys
from rempart.common.outqueue import OutboundQueue

from .conftest import ADMIN, Harness
from .queue_support import queued

GOOD_PASSWORD = "Corr3ct-Horse-Battery!"
BOSS = "boss@example.org"  # domain admin of example.org
FRANK = "frank@other.example"  # a user of another tenant

# Another tenant's resources, and names in that tenant that do not exist: both must answer alike.
OTHER = {"domain": "other.example", "address": FRANK, "alias": "sales@other.example", "domain_alias": "oth.example",
         "name": "phone", "selector": "rp202601", "queue_id": "0190000000000000f4a4c0f4a4c0f4a4",
         "key_id": "", "item": "zen.example", "rule": "0123456789abcdef"}  # key_id: made by _tenants
MISSING = {"domain": "ghost.example", "address": "nobody@other.example", "alias": "nothing@other.example",
           "domain_alias": "ghost-alias.example", "name": "phone", "selector": "rp202601",
           "queue_id": "0190000000000000deadbeefdeadbeef", "key_id": "0123456789abcdef", "item": "ghost.example",
           "rule": "fedcba9876543210"}
# A valid body for every write that names a resource, so that the handler (not validation) answers.
BODIES: dict[str, dict[str, Any]] = {
    "updateDomain": {"description": "taken over"},
    "putDomainSettings": {"recipients": {"unknown_recipient_action": "discard"}},
    "createAccount": {"address": "mallory", "password": GOOD_PASSWORD},
    "updateAccount": {"display_name": "taken over", "enabled": False},
    "resetAccountPassword": {"password": "Takeover-Pass-1!"},
    "putAccountSettings": {"limits": {"max_messages_per_day": 1}},
    "importPasswordHash": {"hash": "{SSHA512}dGFrZW4tb3Zlci1oYXNoLXZhbHVlcw=="},
    "replaceAliasTargets": {"targets": [BOSS]},
    "putDomainAlias": {"target": "example.org"},
    "unlockAccount": {},
    "createDkimKey": {"algorithm": "ed25519-sha256"},
    "rotateDkimKey": {},
    "retryQueuedMessage": {},
}
# Writes no domain admin may make anywhere: refused by role before any lookup, alike for all names.
SUPERADMIN_ONLY = {"putDomainAlias", "deleteDnsblZone", "deleteTrustedHost", "deleteIpWhitelistEntry",
                   "deleteHeloRule"}


async def _tenants(harness: Harness) -> dict[str, str]:
    await harness.add_account(FRANK, GOOD_PASSWORD)
    await harness.add_account(BOSS, GOOD_PASSWORD, "domain_admin")
    await harness.add_account("gina@example.org", GOOD_PASSWORD)
    directory = harness.backend.directory
    await directory.add_alias("sales@other.example", [FRANK])
    await directory.add_domain_alias("oth.example", "other.example")
    await harness.backend.store.put_doc("domain:other.example", {"limits": {"max_messages_per_day": 50}})
    await harness.backend.store.put_doc(f"account:{FRANK}", {"limits": {"max_messages_per_day": 5}})
    harness.auth.locked.add(FRANK)
    harness.auth.totp_secrets[FRANK] = "FRANKSSECRET"
    harness.auth.app_passwords[FRANK] = {"phone": "frank-app-password"}
    await queued(harness.backend, FRANK, ["someone@remote.test"], transaction_id=OTHER["queue_id"])
    # Another tenant's API key (a superadmin's, confined to other.example).
    store = ApiKeyStore(harness.backend.redis, harness.settings.secret_key.get_secret_value())
    _, key = await store.create(name="theirs", owner=ADMIN, owner_created=0.0, owner_epoch=0, scope="write",
                                domain="other.example", expires=0.0)
    OTHER["key_id"] = key.id
    return await harness.login(BOSS, GOOD_PASSWORD)


async def _other_tenant_state(harness: Harness) -> tuple[Any, ...]:
    redis, store = harness.backend.redis, harness.backend.store
    return (
        await redis.hgetall(keys.account(FRANK)),
        await redis.hgetall(keys.domain("other.example")),
        await harness.backend.directory.alias_targets("sales@other.example"),
        await harness.backend.directory.domain_aliases(),
        await store.get_doc("domain:other.example"),
        await store.get_doc(f"account:{FRANK}"),
        await harness.backend.directory.list_accounts("other.example"),
        harness.auth.passwords[FRANK],
        FRANK in harness.auth.locked,
        dict(harness.auth.totp_secrets),
        dict(harness.auth.app_passwords.get(FRANK, {})),
        await OutboundQueue(redis).get(OTHER["queue_id"]),
        await redis.hgetall(f"rp:admin:apikey:{OTHER['key_id']}"),
        await store.get_doc("server"),
    )


async def test_r_adm_1_matrix_every_route_hides_another_tenant(harness: Harness) -> None:
    boss = await _tenants(harness)
    before = await _other_tenant_state(harness)
    spec = (await harness.http.get("/v1/openapi.json")).json()
    checked = []
    for path, operations in spec["paths"].items():
        names = set(re.findall(r"\{([^}]+)\}", path))
        if not names or not names <= set(OTHER):
            continue
        for method, operation in operations.items():
            body = BODIES.get(operation["operationId"])
            assert method in ("get", "delete") or body is not None, f"add a body for {operation['operationId']}"
            answers = []
            for values in (OTHER, MISSING):
                reply = await harness.http.request(method.upper(), path.format(**values), json=body, headers=boss)
                expected = 403 if operation["operationId"] in SUPERADMIN_ONLY else 404
                assert reply.status_code == expected, (method, path, values, reply.text)
                answers.append({k: v for k, v in reply.json().items() if k != "instance"})
            # Existing or not, the same answer: confinement tells nothing about another tenant.
            assert answers[0] == answers[1], (method, path)
            checked.append(operation["operationId"])
    assert len(checked) >= 20, checked
    assert await _other_tenant_state(harness) == before


async def test_r_adm_1_alias_targets_stay_in_the_tenant(harness: Harness) -> None:
    boss = await _tenants(harness)
    before = await _other_tenant_state(harness)
    http = harness.http
    for target in (FRANK, "Frank@Other.Example", "frank@oth.example", "nobody@other.example"):
        refused = await http.post("/v1/aliases", json={"alias": "grab@example.org", "targets": [BOSS, target]},
                                  headers=boss)
        assert refused.status_code == 404, (target, refused.text)
    assert await harness.backend.directory.alias_targets("grab@example.org") is None
    other_alias = await http.post("/v1/aliases", json={"alias": "x@other.example", "targets": [BOSS]}, headers=boss)
    assert other_alias.status_code == 404
    made = await http.post("/v1/aliases", json={"alias": "team@example.org",
                                                "targets": ["gina@example.org", "friend@remote.example"]},
                           headers=boss)
    assert made.status_code == 201, made.text
    assert (await http.put("/v1/aliases/team@example.org", json={"targets": [FRANK]}, headers=boss)).status_code == 404
    edited = await http.put("/v1/aliases/team@example.org", json={"targets": [BOSS]}, headers=boss)
    assert edited.json() == {"alias": "team@example.org", "targets": [BOSS]}
    # Editing moves the back-reference: gina no longer lists it, boss does.
    assert (await http.get("/v1/accounts/gina@example.org", headers=boss)).json()["aliases"] == []
    assert (await http.get(f"/v1/accounts/{BOSS}", headers=boss)).json()["aliases"] == ["team@example.org"]
    listed = await http.get("/v1/domains/example.org/aliases", headers=boss)
    assert listed.json() == {"aliases": [{"alias": "team@example.org", "targets": [BOSS]}], "next_cursor": None}
    # A catch-all is an address the tenant writes too.
    settings = await http.put("/v1/accounts/gina@example.org/settings",
                              json={"recipients": {"catch_all_address": FRANK}}, headers=boss)
    assert settings.status_code == 404
    # A new local name is the superadmin's to make.
    assert (await http.put("/v1/domain-aliases/new.example", json={"target": "other.example"},
                           headers=boss)).status_code == 403
    assert (await http.put("/v1/domain-aliases/new.example", json={"target": "example.org"},
                           headers=boss)).status_code == 403
    assert await _other_tenant_state(harness) == before


async def test_r_adm_1_deleting_an_account_leaves_other_tenants_aliases(
    harness: Harness, admin_headers: dict[str, str]
) -> None:
    boss = await _tenants(harness)
    http = harness.http
    # A superadmin forwards another tenant's address to gina, and gina's own tenant's address.
    assert (await http.post("/v1/aliases", json={"alias": "fwd@other.example", "targets": ["gina@example.org"]},
                            headers=admin_headers)).status_code == 201
    assert (await http.post("/v1/aliases", json={"alias": "desk@example.org", "targets": ["gina@example.org"]},
                            headers=boss)).status_code == 201
    gina = await http.get("/v1/accounts/gina@example.org", headers=boss)
    assert gina.json()["aliases"] == ["desk@example.org"]  # the other tenant's alias is not shown
    superadmin_view = await http.get("/v1/accounts/gina@example.org", headers=admin_headers)
    assert superadmin_view.json()["aliases"] == ["fwd@other.example", "desk@example.org"]
    assert (await http.delete("/v1/accounts/gina@example.org", headers=boss)).status_code == 204
    assert await harness.backend.directory.alias_targets("desk@example.org") is None
    # The other tenant's alias lost its target but was not deleted by someone who cannot see it.
    assert await harness.backend.directory.alias_targets("fwd@other.example") == []
    assert await harness.backend.directory.resolve("fwd@other.example") == []


async def test_r_adm_1_superadmin_manages_domain_aliases(harness: Harness, admin_headers: dict[str, str]) -> None:
    boss = await _tenants(harness)
    http = harness.http
    made = await http.put("/v1/domain-aliases/example.net", json={"target": "example.org"}, headers=admin_headers)
    assert made.status_code == 200 and made.json() == {"name": "example.net", "target": "example.org"}
    assert await harness.backend.directory.canonical_domain("example.net") == "example.org"
    assert (await http.put("/v1/domain-aliases/other.example", json={"target": "example.org"},
                           headers=admin_headers)).status_code == 409
    assert (await http.post("/v1/domains", json={"name": "example.net"}, headers=admin_headers)).status_code == 409
    # The domain admin sees the aliases of its domain, never another's.
    mine = await http.get("/v1/domains/example.org/domain-aliases", headers=boss)
    assert mine.json() == {"domain_aliases": [{"name": "example.net", "target": "example.org"}], "next_cursor": None}
    assert (await http.get("/v1/domain-aliases/example.net", headers=boss)).status_code == 200
    assert (await http.delete("/v1/domain-aliases/example.net", headers=boss)).status_code == 403
    assert (await http.delete("/v1/domain-aliases/example.net", headers=admin_headers)).status_code == 204
    assert await harness.backend.directory.canonical_domain("example.net") is None
    updated = await http.patch("/v1/domains/example.org", json={"description": "main"}, headers=boss)
    assert updated.status_code == 200 and updated.json()["description"] == "main"
    assert (await http.get(f"/v1/accounts/{ADMIN}", headers=boss)).status_code == 403  # own domain, not allowed
