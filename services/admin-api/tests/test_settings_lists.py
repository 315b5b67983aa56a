"""R-OPS-1, R-ADM-2, R-ADM-5: the lists inside the server settings as sub-resources: one item
added or removed at a time, ETag/If-Match, validation naming the field, audited, and no lost
update when two administrators add at once."""

from __future__ import annotations

import asyncio

from .conftest import ADMIN, ADMIN_PASSWORD, Harness

GOOD_PASSWORD = "Corr3ct-Horse-Battery!"


async def test_r_ops_1_dnsbl_zones_one_at_a_time_with_etags(harness: Harness, admin_headers: dict[str, str]) -> None:
    http = harness.http
    assert (await http.patch("/v1/settings", json={"limits": {"max_hops": 7}}, headers=admin_headers)).status_code == 200
    empty = await http.get("/v1/settings/dnsbl-zones", headers=admin_headers)
    assert empty.status_code == 200 and empty.json()["items"] == []
    added = await http.post("/v1/settings/dnsbl-zones", json={"item": "Zen.Spamhaus.org."},
                            headers={**admin_headers, "If-Match": empty.headers["etag"]})
    assert added.status_code == 201 and added.json()["items"] == ["zen.spamhaus.org"]
    assert added.headers["etag"] != empty.headers["etag"]
    settings = (await http.get("/v1/settings", headers=admin_headers)).json()["settings"]
    assert settings["dns"]["dnsbl_zones"] == ["zen.spamhaus.org"] and settings["limits"]["max_hops"] == 7
    # A stale ETag: 412 with the current one, nothing written.
    stale = await http.post("/v1/settings/dnsbl-zones", json={"item": "bl.example.net"},
                            headers={**admin_headers, "If-Match": empty.headers["etag"]})
    assert stale.status_code == 412 and stale.headers["etag"] == added.headers["etag"]
    assert (await http.get("/v1/settings/dnsbl-zones", headers=admin_headers)).json()["items"] == ["zen.spamhaus.org"]
    duplicate = await http.post("/v1/settings/dnsbl-zones", json={"item": "zen.spamhaus.org"}, headers=admin_headers)
    assert duplicate.status_code == 409 and duplicate.headers["content-type"] == "application/problem+json"
    bad = await http.post("/v1/settings/dnsbl-zones", json={"item": "not a zone!"}, headers=admin_headers)
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "item"
    missing_field = await http.post("/v1/settings/dnsbl-zones", json={"zone": "x.example"}, headers=admin_headers)
    assert missing_field.status_code == 422
    deleted = await http.delete("/v1/settings/dnsbl-zones/zen.spamhaus.org", headers=admin_headers)
    assert deleted.status_code == 200 and deleted.json()["items"] == []
    assert (await http.delete("/v1/settings/dnsbl-zones/zen.spamhaus.org", headers=admin_headers)).status_code == 404


async def test_r_adm_2_two_admins_adding_different_zones_at_once_both_keep_theirs(
    harness: Harness, admin_headers: dict[str, str]
) -> None:
    await harness.add_account("second@example.org", GOOD_PASSWORD, "superadmin")
    other = await harness.login("second@example.org", GOOD_PASSWORD)
    first = await harness.login(ADMIN, ADMIN_PASSWORD)
    zones = [(first if n % 2 else other, f"z{n}.dnsbl.example") for n in range(20)]
    replies = await asyncio.gather(*(
        harness.http.post("/v1/settings/dnsbl-zones", json={"item": zone}, headers=headers)
        for headers, zone in zones
    ))
    assert [r.status_code for r in replies] == [201] * 20
    listed = (await harness.http.get("/v1/settings/dnsbl-zones", headers=admin_headers)).json()["items"]
    assert sorted(listed) == sorted(zone for _, zone in zones)


async def test_r_ops_1_trusted_hosts_whitelist_and_cidrs_in_paths(
    harness: Harness, admin_headers: dict[str, str]
) -> None:
    http = harness.http
    assert (await http.get("/v1/settings/trusted-hosts", headers=admin_headers)).json()["items"] == [
        "127.0.0.1", "::1"]  # the defaults are part of the list
    for item in ("192.0.2.9/24", "MX.Example.org"):
        assert (await http.post("/v1/settings/trusted-hosts", json={"item": item},
                                headers=admin_headers)).status_code == 201
    assert (await http.get("/v1/settings/trusted-hosts", headers=admin_headers)).json()["items"] == [
        "127.0.0.1", "::1", "192.0.2.0/24", "mx.example.org"]
    assert (await http.delete("/v1/settings/trusted-hosts/192.0.2.0%2F24", headers=admin_headers)).status_code == 200
    assert (await http.delete("/v1/settings/trusted-hosts/::1", headers=admin_headers)).status_code == 200
    assert (await http.get("/v1/settings", headers=admin_headers)).json()["settings"]["relay"]["trusted_hosts"] == [
        "127.0.0.1", "mx.example.org"]
    assert (await http.post("/v1/settings/ip-whitelist", json={"item": "2001:DB8::/32"},
                            headers=admin_headers)).json()["items"] == ["2001:db8::/32"]
    bad = await http.post("/v1/settings/ip-whitelist", json={"item": "300.1.1.1"}, headers=admin_headers)
    assert bad.status_code == 422 and bad.json()["errors"] == [
        {"field": "item", "location": "body", "detail": "not an IP address or network (CIDR)"}]
    assert (await http.delete("/v1/settings/ip-whitelist/2001:db8::/32", headers=admin_headers)).json()["items"] == []


async def test_r_rel_5_helo_rules_added_and_removed_by_id(harness: Harness, admin_headers: dict[str, str]) -> None:
    http = harness.http
    rule = {"match": "regex", "pattern": r"^\d+\.\d+\.\d+\.\d+$", "action": "reject"}
    added = await http.post("/v1/settings/helo-rules", json=rule, headers=admin_headers)
    assert added.status_code == 201
    [shown] = added.json()["items"]
    assert {k: shown[k] for k in rule} == rule and len(shown["id"]) == 16
    second = await http.post("/v1/settings/helo-rules", json={"match": "exact", "pattern": "LOCALHOST",
                                                              "action": "reject"}, headers=admin_headers)
    assert [r["pattern"] for r in second.json()["items"]] == [rule["pattern"], "localhost"]
    bad = await http.post("/v1/settings/helo-rules", json={**rule, "pattern": "(unclosed"}, headers=admin_headers)
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "pattern"
    wrong_action = await http.post("/v1/settings/helo-rules", json={**rule, "action": "maybe"}, headers=admin_headers)
    assert wrong_action.status_code == 422 and wrong_action.json()["errors"][0]["field"] == "action"
    left = await http.delete(f"/v1/settings/helo-rules/{shown['id']}", headers=admin_headers)
    assert [r["pattern"] for r in left.json()["items"]] == ["localhost"]
    assert (await http.get("/v1/settings", headers=admin_headers)).json()["settings"]["relay"]["helo_rules"] == [
        {"match": "exact", "pattern": "localhost", "action": "reject"}]
    assert (await http.delete(f"/v1/settings/helo-rules/{shown['id']}", headers=admin_headers)).status_code == 404


async def test_r_adm_5_list_changes_are_audited_and_superadmin_only(
    harness: Harness, admin_headers: dict[str, str]
) -> None:
    http = harness.http
    assert (await http.post("/v1/settings/dnsbl-zones", json={"item": "a.example"},
                            headers=admin_headers)).status_code == 201
    assert (await http.post("/v1/settings/dnsbl-zones", json={"item": "b.example"},
                            headers=admin_headers)).status_code == 201
    audit = (await http.get("/v1/audit", params={"kind": "settings_list"}, headers=admin_headers)).json()["events"]
    latest = audit[0]
    assert latest["action"] == "settings_list_item_added" and latest["object"]["id"] == "dnsbl-zones:b.example"
    assert latest["before"] == {"dnsbl_zones": ["a.example"]} and latest["after"] == {
        "dnsbl_zones": ["a.example", "b.example"]}
    await harness.add_account("boss@example.org", GOOD_PASSWORD, "domain_admin")
    boss = await harness.login("boss@example.org", GOOD_PASSWORD)
    assert (await http.get("/v1/settings/dnsbl-zones", headers=boss)).status_code == 403
    assert (await http.post("/v1/settings/dnsbl-zones", json={"item": "c.example"}, headers=boss)).status_code == 403
