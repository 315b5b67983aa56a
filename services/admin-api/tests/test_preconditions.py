"""R-ADM-2: ETag and If-Match on every writable resource; 412 on a stale tag, nothing written."""

from __future__ import annotations

import asyncio

from .conftest import ADMIN, Harness

GOOD_PASSWORD = "Corr3ct-Horse-Battery!"


async def test_r_adm_2_settings_patch_with_a_stale_etag_is_412(harness: Harness, admin_headers: dict[str, str]) -> None:
    http = harness.http
    first = await http.get("/v1/settings", headers=admin_headers)
    tag = first.headers["etag"]
    assert tag.startswith('"') and tag == (await http.get("/v1/settings", headers=admin_headers)).headers["etag"]
    # Admin A writes with the tag it read ...
    a = await http.patch("/v1/settings", json={"ips": {"block_minutes": 60}},
                         headers={**admin_headers, "If-Match": tag})
    assert a.status_code == 200 and a.headers["etag"] != tag
    # ... admin B, who read the same version, is refused and told the current tag.
    b = await http.patch("/v1/settings", json={"ips": {"block_minutes": 5}}, headers={**admin_headers, "If-Match": tag})
    assert b.status_code == 412
    assert b.headers["content-type"] == "application/problem+json" and b.headers["etag"] == a.headers["etag"]
    assert b.json()["status"] == 412 and b.json()["title"] == "Precondition Failed"
    now = await http.get("/v1/settings", headers=admin_headers)
    assert now.json()["settings"]["ips"]["block_minutes"] == 60 and now.json()["version"] == a.json()["version"]
    for stale in (tag, f"W/{a.headers['etag']}", '"nonsense"'):
        replaced = await http.put("/v1/settings", json={}, headers={**admin_headers, "If-Match": stale})
        assert replaced.status_code == 412, stale
    listed = await http.put("/v1/settings", json={"ips": {"block_minutes": 7}},
                            headers={**admin_headers, "If-Match": f'"other", {now.headers["etag"]}'})
    assert listed.status_code == 200
    anything = await http.patch("/v1/settings", json={"limits": {"max_hops": 21}}, headers={**admin_headers, "If-Match": "*"})
    assert anything.status_code == 200
    # A secret is part of the state: rotating it moves the tag.
    rotated = await http.post("/v1/settings/srs-secrets/rotation", json={}, headers=admin_headers)
    assert rotated.headers["etag"] != anything.headers["etag"]


async def test_r_adm_2_concurrent_patches_both_survive(harness: Harness, admin_headers: dict[str, str]) -> None:
    # No If-Match at all: the deep merge is atomic on the server, so no patch loses another's.
    changes = [{"ips": {"block_minutes": 61}}, {"limits": {"max_hops": 31}}, {"dns": {"require_rdns": True}},
               {"login": {"lock_minutes": 11}}, {"smtp": {"error_budget": 9}}, {"tls": {"received_add_rdns": False}}]
    replies = await asyncio.gather(*(harness.http.patch("/v1/settings", json=c, headers=admin_headers)
                                     for c in changes))
    assert [r.status_code for r in replies] == [200] * len(changes)
    stored = await harness.backend.store.get_doc("server")
    for change in changes:
        (section, values), = change.items()
        for name, value in values.items():
            assert stored[section][name] == value, (section, name)


async def test_r_adm_2_scoped_settings_etags(harness: Harness, admin_headers: dict[str, str]) -> None:
    http = harness.http
    for url, doc in ((f"/v1/accounts/{ADMIN}/settings", {"limits": {"max_messages_per_day": 3}}),
                     ("/v1/domains/example.org/settings", {"recipients": {"unknown_recipient_action": "discard"}})):
        tag = (await http.get(url, headers=admin_headers)).headers["etag"]
        ok = await http.put(url, json=doc, headers={**admin_headers, "If-Match": tag})
        assert ok.status_code == 200 and ok.headers["etag"] != tag
        assert (await http.get(url, headers=admin_headers)).headers["etag"] == ok.headers["etag"]
        stale = await http.put(url, json={}, headers={**admin_headers, "If-Match": tag})
        assert stale.status_code == 412
        assert (await http.get(url, headers=admin_headers)).json()["settings"] == doc


async def test_r_adm_2_account_alias_domain_etags(harness: Harness, admin_headers: dict[str, str]) -> None:
    http = harness.http
    await harness.add_account("jo@example.org", GOOD_PASSWORD)
    url = "/v1/accounts/jo@example.org"
    tag = (await http.get(url, headers=admin_headers)).headers["etag"]
    renamed = await http.patch(url, json={"display_name": "Jo"}, headers={**admin_headers, "If-Match": tag})
    assert renamed.status_code == 200 and renamed.headers["etag"] != tag
    stale = await http.patch(url, json={"display_name": "Joe"}, headers={**admin_headers, "If-Match": tag})
    assert stale.status_code == 412
    assert (await http.get(url, headers=admin_headers)).json()["display_name"] == "Jo"
    assert (await http.delete(url, headers={**admin_headers, "If-Match": tag})).status_code == 412
    assert (await http.delete(url, headers={**admin_headers, "If-Match": renamed.headers["etag"]})).status_code == 204

    made = await http.post("/v1/aliases", json={"alias": "desk@example.org", "targets": [ADMIN]}, headers=admin_headers)
    assert made.status_code == 201
    alias_tag = (await http.get("/v1/aliases/desk@example.org", headers=admin_headers)).headers["etag"]
    edited = await http.put("/v1/aliases/desk@example.org", json={"targets": ["a@remote.example"]},
                            headers={**admin_headers, "If-Match": alias_tag})
    assert edited.status_code == 200
    lost = await http.put("/v1/aliases/desk@example.org", json={"targets": ["b@remote.example"]},
                          headers={**admin_headers, "If-Match": alias_tag})
    assert lost.status_code == 412
    assert (await http.get("/v1/aliases/desk@example.org", headers=admin_headers)).json()["targets"] == [
        "a@remote.example"]

    domain_tag = (await http.get("/v1/domains/example.org", headers=admin_headers)).headers["etag"]
    assert (await http.patch("/v1/domains/example.org", json={"description": "one"},
                             headers={**admin_headers, "If-Match": domain_tag})).status_code == 200
    assert (await http.patch("/v1/domains/example.org", json={"description": "two"},
                             headers={**admin_headers, "If-Match": domain_tag})).status_code == 412
    # If-Match on something that does not exist fails too (RFC 9110 13.1.1).
    assert (await http.put("/v1/domain-aliases/example.net", json={"target": "example.org"},
                           headers={**admin_headers, "If-Match": "*"})).status_code == 412


async def test_r_adm_2_openapi_documents_if_match(harness: Harness) -> None:
    spec = (await harness.http.get("/v1/openapi.json")).json()
    writes = 0
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if operation["operationId"] in ("replaceSettings", "patchSettings", "putDomainSettings", "updateAccount",
                                            "deleteAccount", "putAccountSettings", "replaceAliasTargets",
                                            "deleteAlias", "updateDomain", "deleteDomain", "putDomainAlias"):
                headers = [p["name"] for p in operation.get("parameters", []) if p["in"] == "header"]
                assert headers == ["If-Match"], (method, path)
                assert "412" in operation["responses"], (method, path)
                writes += 1
    assert writes == 11
