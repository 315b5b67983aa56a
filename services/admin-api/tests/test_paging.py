"""R-ADM-2: every list pages the same way (``limit`` bounded, an opaque ``cursor`` and
``next_cursor``) and filters; the older parameters (``offset``, ``before``) keep working."""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.client import Client as NATS

from rempart.admin_api.paging import encode_cursor
from rempart.common.events import EVENTS_STREAM, EventBus

from .conftest import Harness

GOOD_PASSWORD = "Corr3ct-Horse-Battery!"


async def _walk(harness: Harness, path: str, key: str, headers: dict[str, str], **params: Any) -> list[Any]:
    """Every item of a list, two at a time, following next_cursor."""
    items: list[Any] = []
    cursor = None
    for _ in range(50):
        page_params = {"limit": 2, **params, **({"cursor": cursor} if cursor else {})}
        reply = await harness.http.get(path, params=page_params, headers=headers)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert len(body[key]) <= 2
        items += body[key]
        cursor = body["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("the cursor never ended")


async def test_r_adm_2_domains_accounts_aliases_page_by_cursor_and_filter(
    harness: Harness, admin_headers: dict[str, str]
) -> None:
    http = harness.http
    for name in ("d3.example", "d1.example", "x2.example", "d2.example"):
        assert (await http.post("/v1/domains", json={"name": name}, headers=admin_headers)).status_code == 201
    assert await _walk(harness, "/v1/domains", "domains", admin_headers) == [
        "d1.example", "d2.example", "d3.example", "example.org", "x2.example"]
    assert await _walk(harness, "/v1/domains", "domains", admin_headers, q="D") == [
        "d1.example", "d2.example", "d3.example"]
    for local in ("carl", "anna", "bert", "dana", "abe"):
        await harness.add_account(f"{local}@d1.example", GOOD_PASSWORD)
    assert await _walk(harness, "/v1/domains/d1.example/accounts", "accounts", admin_headers) == [
        "abe@d1.example", "anna@d1.example", "bert@d1.example", "carl@d1.example", "dana@d1.example"]
    assert await _walk(harness, "/v1/domains/d1.example/accounts", "accounts", admin_headers, q="an") == [
        "anna@d1.example", "dana@d1.example"]
    # The console's and older clients' offset still works.
    old = await http.get("/v1/domains/d1.example/accounts", params={"offset": 3, "limit": 10}, headers=admin_headers)
    assert old.json() == {"accounts": ["carl@d1.example", "dana@d1.example"], "next_cursor": None}
    for alias in ("sales", "info", "help"):
        reply = await http.post("/v1/aliases", json={"alias": f"{alias}@d1.example", "targets": ["anna@d1.example"]},
                                headers=admin_headers)
        assert reply.status_code == 201
    aliases = await _walk(harness, "/v1/domains/d1.example/aliases", "aliases", admin_headers)
    assert [a["alias"] for a in aliases] == ["help@d1.example", "info@d1.example", "sales@d1.example"]
    assert aliases[0]["targets"] == ["anna@d1.example"]
    for name in ("alias-c.example", "alias-a.example", "alias-b.example"):
        assert (await http.put(f"/v1/domain-aliases/{name}", json={"target": "d1.example"},
                               headers=admin_headers)).status_code == 200
    domain_aliases = await _walk(harness, "/v1/domains/d1.example/domain-aliases", "domain_aliases", admin_headers)
    assert [d["name"] for d in domain_aliases] == ["alias-a.example", "alias-b.example", "alias-c.example"]


async def test_r_adm_2_cursors_are_checked_and_limits_bounded(harness: Harness, admin_headers: dict[str, str]) -> None:
    http = harness.http
    first = (await http.get("/v1/domains", params={"limit": 1}, headers=admin_headers)).json()
    assert first["next_cursor"] is None  # one domain: nothing more
    await harness.add_account("x@other.example", GOOD_PASSWORD)
    first = (await http.get("/v1/domains", params={"limit": 1}, headers=admin_headers)).json()
    # A cursor of one list is refused by another, and garbage too, naming the parameter.
    for path in ("/v1/domains/example.org/accounts", "/v1/events", "/v1/audit", "/v1/ips/blocks", "/v1/api-keys"):
        reply = await http.get(path, params={"cursor": first["next_cursor"]}, headers=admin_headers)
        assert reply.status_code == 422, path
        assert reply.json()["errors"] == [{"field": "cursor", "location": "query",
                                           "detail": "not a next_cursor from this list"}]
    for path in ("/v1/domains", "/v1/domains/example.org/accounts", "/v1/domains/example.org/aliases",
                 "/v1/domains/example.org/domain-aliases", "/v1/ips/blocks", "/v1/api-keys", "/v1/queue"):
        for bad in (0, 1001):
            reply = await http.get(path, params={"limit": bad}, headers=admin_headers)
            assert reply.status_code == 422 and reply.json()["errors"][0]["field"] == "limit", (path, bad)


async def test_r_adm_2_a_domain_admin_pages_only_its_own(harness: Harness, admin_headers: dict[str, str]) -> None:
    await harness.add_account("boss@example.net", GOOD_PASSWORD, "domain_admin")
    await harness.add_account("a@example.net", GOOD_PASSWORD)
    boss = await harness.login("boss@example.net", GOOD_PASSWORD)
    assert await _walk(harness, "/v1/domains", "domains", boss) == ["example.net"]
    assert (await harness.http.get("/v1/domains/example.org/accounts", headers=boss)).status_code == 404


async def test_r_adm_2_events_page_by_cursor_and_by_before(
    harness: Harness, admin_headers: dict[str, str], nats_conn: NATS
) -> None:
    bus = EventBus(nats_conn, "auth")
    for n in range(5):
        await bus.publish("auth", "login_failed", client_ip=f"198.51.100.{n}", protocol="imap")
    for _ in range(100):
        if (await harness.backend.js.stream_info(EVENTS_STREAM)).state.messages >= 6:
            break
        await asyncio.sleep(0.02)
    by_cursor = await _walk(harness, "/v1/events", "events", admin_headers, area="auth")
    assert [e["client_ip"] for e in by_cursor] == [f"198.51.100.{n}" for n in range(4, -1, -1)]
    first = (await harness.http.get("/v1/events", params={"area": "auth", "limit": 2},
                                    headers=admin_headers)).json()
    older = (await harness.http.get("/v1/events", params={"area": "auth", "limit": 2, "before": first["next_before"]},
                                    headers=admin_headers)).json()
    assert [e["client_ip"] for e in older["events"]] == ["198.51.100.2", "198.51.100.1"]


SCORE_LISTS = (("/v1/ips/blocks", "ip-blocks"), ("/v1/api-keys", "api-keys"))
SEQ_LISTS = (("/v1/events", "events"), ("/v1/audit", "audit"))


async def test_r_adm_2_crafted_cursors_are_a_422_naming_cursor_never_a_503(
    harness: Harness, admin_headers: dict[str, str]
) -> None:
    """A cursor made by hand with nan or inf as its score reached Redis, which refused it (503);
    a sequence of other digits than ASCII ones made int() fail. Each is a 422 naming ``cursor``."""
    crafted = {
        SCORE_LISTS: ["nan x", "inf x", "-inf x", "NaN", "garbage", "1e999 x", "12"],
        SEQ_LISTS: ["nan", "inf", "0", "-3", "1e3", "\u00b2", "\u0663", "9" * 40, ""],
    }
    for lists, values in crafted.items():
        for path, kind in lists:
            for value in values:
                reply = await harness.http.get(path, params={"cursor": encode_cursor(kind, value)},
                                               headers=admin_headers)
                assert reply.status_code == 422, (path, value, reply.text)
                assert reply.json()["errors"][0]["field"] == "cursor", (path, value)


async def test_r_adm_2_q_filters_aliases_and_domain_aliases_as_it_does_domains(
    harness: Harness, admin_headers: dict[str, str]
) -> None:
    """One name filter (paging.NameFilter, paging.containing) behind ``q`` on the four lists of
    names: trimmed, case-insensitive, at most 254 characters."""
    http = harness.http
    assert (await http.post("/v1/domains", json={"name": "d1.example"}, headers=admin_headers)).status_code == 201
    await harness.add_account("ann@d1.example", GOOD_PASSWORD)
    for alias in ("sales@d1.example", "support@d1.example", "info@d1.example"):
        made = await http.post("/v1/aliases", json={"alias": alias, "targets": ["ann@d1.example"]},
                               headers=admin_headers)
        assert made.status_code == 201, made.text
    for name in ("d1-old.example", "legacy.example"):
        made = await http.put(f"/v1/domain-aliases/{name}", json={"target": "d1.example"}, headers=admin_headers)
        assert made.status_code in (200, 201), made.text
    aliases = await _walk(harness, "/v1/domains/d1.example/aliases", "aliases", admin_headers, q=" S ")
    assert [a["alias"] for a in aliases] == ["sales@d1.example", "support@d1.example"]
    found = await _walk(harness, "/v1/domains/d1.example/domain-aliases", "domain_aliases", admin_headers, q="OLD")
    assert [d["name"] for d in found] == ["d1-old.example"]
    too_long = await http.get("/v1/domains/d1.example/aliases", params={"q": "x" * 255}, headers=admin_headers)
    assert too_long.status_code == 422 and too_long.json()["errors"][0]["field"] == "q"
