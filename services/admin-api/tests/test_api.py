"""The admin API as a client sees it: status codes and bodies, over real Redis, NATS and gRPC."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import time

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from rempart.common import keys
from rempart.common.events import CONFIG_CHANGED, EVENTS_STREAM, EventBus
from rempart.common.pb.events.v1 import events_pb2

from .conftest import ADMIN, TOO_SHORT, Harness

GOOD_PASSWORD = "Corr3ct-Horse-Battery!"


async def _next_message(nc: NATS, subject: str) -> tuple[asyncio.Future[Msg], object]:
    future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()

    async def on_msg(msg: Msg) -> None:
        if not future.done():
            future.set_result(msg)

    sub = await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    return future, sub


async def test_r_log_5_every_route_requires_auth(harness: Harness) -> None:
    spec = (await harness.http.get("/v1/openapi.json")).json()
    checked = 0
    for path, operations in spec["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", "x@example.org", path)
        for method in operations:
            if path == "/v1/auth/login":
                continue
            reply = await harness.http.request(method.upper(), concrete, json={})
            assert reply.status_code == 401, (method, path, reply.text)
            assert reply.headers["www-authenticate"] == "Bearer"
            assert reply.json()["detail"] == "Not authenticated"
            bad = await harness.http.request(
                method.upper(), concrete, json={}, headers={"Authorization": "Bearer not-a-session"}
            )
            assert bad.status_code == 401, (method, path, bad.text)
            checked += 1
    assert checked >= 25


async def test_r_log_4_login_same_answer_for_unknown_user_and_wrong_password(harness: Harness) -> None:
    ok = await harness.http.post("/v1/auth/login", json={"email": ADMIN, "password": "Adm1n-Secret-Pw!"})
    assert ok.status_code == 200
    body = ok.json()
    assert body["account"] == ADMIN and body["role"] == "superadmin" and body["token_type"] == "bearer"
    assert len(body["token"]) >= 40
    # Only the digest is stored: the token itself is nowhere in Redis.
    stored = [k async for k in harness.backend.redis.scan_iter(match="rp:admin:session:*")]
    assert len(stored) == 1 and body["token"] not in stored[0]

    wrong = await harness.http.post("/v1/auth/login", json={"email": ADMIN, "password": "Wrong-Password-1"})
    unknown = await harness.http.post("/v1/auth/login", json={"email": "nobody@example.org", "password": "Wrong-Password-1"})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.content == unknown.content
    assert wrong.headers["content-type"] == "application/problem+json"
    assert wrong.json() == {"type": "about:blank", "title": "Unauthorized", "status": 401,
                            "detail": "Unknown user or incorrect password", "instance": "/v1/auth/login", "errors": []}
    request = harness.auth.requests[-1]
    assert (request.protocol, request.mechanism, request.client_ip) == ("admin", "password", "127.0.0.1")


async def test_r_log_5_logout_ends_the_session(harness: Harness, admin_headers: dict[str, str]) -> None:
    assert (await harness.http.get("/v1/me", headers=admin_headers)).status_code == 200
    assert (await harness.http.post("/v1/auth/logout", headers=admin_headers)).status_code == 204
    assert (await harness.http.get("/v1/me", headers=admin_headers)).status_code == 401


async def test_r_log_5_disabled_account_loses_its_session(harness: Harness, admin_headers: dict[str, str]) -> None:
    await harness.add_account("carol@example.org", GOOD_PASSWORD, "domain_admin")
    carol = await harness.login("carol@example.org", GOOD_PASSWORD)
    reply = await harness.http.patch("/v1/accounts/carol@example.org", json={"enabled": False}, headers=admin_headers)
    assert reply.status_code == 200 and reply.json()["enabled"] is False
    assert (await harness.http.get("/v1/me", headers=carol)).status_code == 401


async def test_domain_and_account_lifecycle(harness: Harness, admin_headers: dict[str, str]) -> None:
    http = harness.http
    created = await http.post("/v1/domains", json={"name": "Shop.Example", "description": "the shop"}, headers=admin_headers)
    assert created.status_code == 201
    assert created.json() == {
        "name": "shop.example", "description": "the shop", "created": created.json()["created"], "accounts": 0
    }
    assert (await http.post("/v1/domains", json={"name": "shop.example"}, headers=admin_headers)).status_code == 409
    assert (await http.post("/v1/domains", json={"name": "not a domain"}, headers=admin_headers)).status_code == 422
    domains = (await http.get("/v1/domains", headers=admin_headers)).json()["domains"]
    assert domains == ["example.org", "shop.example"]

    account = await http.post(
        "/v1/domains/shop.example/accounts",
        json={"address": "Alice", "password": GOOD_PASSWORD, "display_name": "Alice A."},
        headers=admin_headers,
    )
    assert account.status_code == 201, account.text
    assert account.json()["address"] == "alice@shop.example" and account.json()["role"] == "user"
    assert harness.auth.passwords["alice@shop.example"] == GOOD_PASSWORD
    duplicate = await http.post(
        "/v1/domains/shop.example/accounts", json={"address": "alice@shop.example", "password": GOOD_PASSWORD},
        headers=admin_headers,
    )
    assert duplicate.status_code == 409
    other_domain = await http.post(
        "/v1/domains/shop.example/accounts", json={"address": "eve@example.org", "password": GOOD_PASSWORD},
        headers=admin_headers,
    )
    assert other_domain.status_code == 422
    listed = await http.get("/v1/domains/shop.example/accounts", headers=admin_headers)
    assert listed.json() == {"accounts": ["alice@shop.example"], "next_cursor": None}
    got = await http.get("/v1/accounts/alice@shop.example", headers=admin_headers)
    assert got.status_code == 200 and got.json()["display_name"] == "Alice A."
    assert "password" not in got.text

    patched = await http.patch(
        "/v1/accounts/alice@shop.example", json={"display_name": "Alice B.", "role": "domain_admin"}, headers=admin_headers
    )
    assert patched.json()["display_name"] == "Alice B." and patched.json()["role"] == "domain_admin"

    reset = await http.put("/v1/accounts/alice@shop.example/password", json={"password": "N3w-Passw0rd-X!"},
                           headers=admin_headers)
    assert reset.status_code == 204
    assert harness.auth.passwords["alice@shop.example"] == "N3w-Passw0rd-X!"

    assert (await http.delete("/v1/domains/shop.example", headers=admin_headers)).status_code == 409
    assert (await http.delete("/v1/accounts/alice@shop.example", headers=admin_headers)).status_code == 204
    assert (await http.get("/v1/accounts/alice@shop.example", headers=admin_headers)).status_code == 404
    assert (await http.delete("/v1/domains/shop.example", headers=admin_headers)).status_code == 204
    assert (await http.get("/v1/domains/shop.example", headers=admin_headers)).status_code == 404


async def test_r_pwd_1_weak_password_refused_and_no_account_left(harness: Harness, admin_headers: dict[str, str]) -> None:
    reply = await harness.http.post(
        "/v1/domains/example.org/accounts", json={"address": "bob", "password": "short1!"}, headers=admin_headers
    )
    assert reply.status_code == 422
    assert reply.json()["detail"] == "Password refused by the password policy"
    assert reply.json()["errors"] == [{"field": "password", "location": "body", "detail": TOO_SHORT}]
    assert await harness.backend.directory.get_account("bob@example.org") is None
    assert "bob@example.org" not in await harness.backend.directory.list_accounts("example.org")
    reset = await harness.http.put(f"/v1/accounts/{ADMIN}/password", json={"password": "tiny"}, headers=admin_headers)
    assert reset.status_code == 422 and [e["detail"] for e in reset.json()["errors"]] == [TOO_SHORT]


async def test_r_ops_1_settings_put_bumps_version_and_announces_it(
    harness: Harness, admin_headers: dict[str, str], nats_conn: NATS
) -> None:
    http = harness.http
    before = (await http.get("/v1/settings/version", headers=admin_headers)).json()["version"]
    current = (await http.get("/v1/settings", headers=admin_headers)).json()
    assert current["settings"]["ips"]["block_minutes"] == 1440  # SPEC default, full document
    changed, sub = await _next_message(nats_conn, CONFIG_CHANGED)
    reply = await http.patch("/v1/settings", json={"ips": {"block_minutes": 60}}, headers=admin_headers)
    assert reply.status_code == 200, reply.text
    assert reply.json()["version"] == before + 1
    assert reply.json()["settings"]["ips"]["block_minutes"] == 60
    message = await asyncio.wait_for(changed, 5)
    assert message.data.decode() == f"server {before + 1}"
    await sub.unsubscribe()  # type: ignore[attr-defined]

    patched = await http.patch("/v1/settings", json={"limits": {"max_hops": 30}}, headers=admin_headers)
    assert patched.json()["settings"]["ips"]["block_minutes"] == 60  # deep-merged, kept
    replaced = await http.put("/v1/settings", json={"limits": {"max_hops": 25}}, headers=admin_headers)
    assert replaced.json()["settings"]["ips"]["block_minutes"] == 1440  # replaced: back to default
    assert replaced.json()["version"] == before + 3
    assert (await http.get("/v1/settings/version", headers=admin_headers)).json() == {"version": before + 3}


async def test_r_ops_1_invalid_settings_refused(harness: Harness, admin_headers: dict[str, str]) -> None:
    http = harness.http
    version = (await http.get("/v1/settings/version", headers=admin_headers)).json()["version"]
    bad = await http.patch("/v1/settings", json={"ips": {"block_minutes": -1}}, headers=admin_headers)
    assert bad.status_code == 422
    assert bad.json()["detail"] == "Invalid request"
    assert [e["field"] for e in bad.json()["errors"]] == ["ips.block_minutes"]
    unknown = await http.put("/v1/settings", json={"no_such_section": {}}, headers=admin_headers)
    assert unknown.status_code == 422
    server_only = await http.put("/v1/domains/example.org/settings", json={"ips": {"block_minutes": 5}},
                                 headers=admin_headers)
    assert server_only.status_code == 422
    assert (await http.get("/v1/settings/version", headers=admin_headers)).json()["version"] == version
    ok = await http.put("/v1/domains/example.org/settings",
                        json={"recipients": {"unknown_recipient_action": "discard"}}, headers=admin_headers)
    assert ok.status_code == 200 and ok.json()["version"] == version + 1
    got = await http.get("/v1/domains/example.org/settings", headers=admin_headers)
    assert got.json()["settings"] == {"recipients": {"unknown_recipient_action": "discard"}}
    account = await http.put(f"/v1/accounts/{ADMIN}/settings", json={"limits": {"max_messages_per_day": 7}},
                             headers=admin_headers)
    assert account.status_code == 200
    assert (await http.get(f"/v1/accounts/{ADMIN}/settings", headers=admin_headers)).json()["settings"] == {
        "limits": {"max_messages_per_day": 7}
    }


async def _wait_for_stream(harness: Harness, count: int) -> None:
    for _ in range(100):
        info = await harness.backend.js.stream_info(EVENTS_STREAM)
        if info.state.messages >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("events did not reach the stream")


async def test_audit_events_listed_newest_first_and_filtered(
    harness: Harness, admin_headers: dict[str, str], nats_conn: NATS
) -> None:
    bus = EventBus(nats_conn, "auth")
    await bus.publish("auth", "login_failed", client_ip="198.51.100.1", account="a@example.org", protocol="imap")
    await bus.publish("auth", "login_failed", client_ip="198.51.100.2", account="b@example.org", protocol="pop3")
    await bus.publish("relay", "denied", client_ip="198.51.100.1")
    await _wait_for_stream(harness, 4)  # the admin's own login event too
    reply = await harness.http.get("/v1/events", params={"area": "auth"}, headers=admin_headers)
    assert reply.status_code == 200
    events = reply.json()["events"]
    assert [e["client_ip"] for e in events] == ["198.51.100.2", "198.51.100.1"]
    assert events[0]["what"] == "login_failed" and events[0]["protocol"] == "pop3"
    assert events[0]["seq"] > events[1]["seq"]
    assert abs(dt.datetime.fromisoformat(events[0]["time"]).timestamp() - time.time()) < 60
    by_ip = await harness.http.get("/v1/events", params={"client_ip": "198.51.100.1"}, headers=admin_headers)
    assert [(e["area"], e["what"]) for e in by_ip.json()["events"]] == [("relay", "denied"), ("auth", "login_failed")]
    one = await harness.http.get("/v1/events", params={"area": "auth", "limit": 1}, headers=admin_headers)
    assert one.json()["events"][0]["account"] == "b@example.org"
    older = await harness.http.get(
        "/v1/events", params={"area": "auth", "before": one.json()["next_before"]}, headers=admin_headers
    )
    assert [e["account"] for e in older.json()["events"]] == ["a@example.org"]
    assert older.json()["next_before"] is None
    by_account = await harness.http.get("/v1/events", params={"area": "admin", "account": ADMIN}, headers=admin_headers)
    assert by_account.json()["events"][0]["what"] == "login"


async def test_r_ips_5_list_inspect_and_remove_block(
    harness: Harness, admin_headers: dict[str, str], nats_conn: NATS
) -> None:
    redis = harness.backend.redis
    now = time.time()
    # The record as rempart.policy.intrusion writes it.
    record = {"reason": "R-IPS-3 unknown recipients", "blocked_at": now, "expires_at": now + 3600,
              "protocol": "PROTOCOL_SMTP", "session_id": "s1", "client_ip": "192.0.2.7"}
    await redis.set(keys.ips_block("192.0.2.7"), json.dumps(record), ex=3600)
    await redis.zadd(keys.IPS_BLOCKS, {"192.0.2.7": now + 3600})
    listed = await harness.http.get("/v1/ips/blocks", headers=admin_headers)
    assert listed.status_code == 200
    (block,) = listed.json()["blocks"]
    # In words, not a requirement id; times as RFC 3339.
    assert (block["ip"], block["reason"], block["protocol"]) == ("192.0.2.7", "unknown recipients", "PROTOCOL_SMTP")
    assert dt.datetime.fromisoformat(block["blocked_at"]).timestamp() == pytest.approx(now, abs=0.001)
    assert block["expires_at"].endswith("Z") and "R-IPS" not in listed.text
    assert 3500 < block["expires_in_seconds"] <= 3600
    one = (await harness.http.get("/v1/ips/blocks/192.0.2.7", headers=admin_headers)).json()
    # The same block; only the seconds left may have ticked between the two reads.
    assert {**one, "expires_in_seconds": 0} == {**block, "expires_in_seconds": 0}
    assert (await harness.http.get("/v1/ips/blocks/192.0.2.8", headers=admin_headers)).status_code == 404
    assert (await harness.http.get("/v1/ips/blocks/not-an-ip", headers=admin_headers)).status_code == 422

    unblocked, sub = await _next_message(nats_conn, "rempart.events.ips.unblocked")
    assert (await harness.http.delete("/v1/ips/blocks/192.0.2.7", headers=admin_headers)).status_code == 204
    event = events_pb2.Event.FromString((await asyncio.wait_for(unblocked, 5)).data)
    assert (event.area, event.what, event.client_ip, event.account) == ("ips", "unblocked", "192.0.2.7", ADMIN)
    await sub.unsubscribe()  # type: ignore[attr-defined]
    assert not await redis.exists(keys.ips_block("192.0.2.7"))
    assert await redis.zscore(keys.IPS_BLOCKS, "192.0.2.7") is None
    assert (await harness.http.get("/v1/ips/blocks", headers=admin_headers)).json()["blocks"] == []
    assert (await harness.http.delete("/v1/ips/blocks/192.0.2.7", headers=admin_headers)).status_code == 404


async def test_r_pwd_3_user_changes_own_password(harness: Harness) -> None:
    await harness.add_account("dave@example.org", GOOD_PASSWORD)
    dave = await harness.login("dave@example.org", GOOD_PASSWORD)
    me = await harness.http.get("/v1/me", headers=dave)
    assert me.json()["address"] == "dave@example.org" and me.json()["role"] == "user"
    url = "/v1/me/password"
    wrong_old = await harness.http.post(
        url, json={"old_password": "Not-The-Old-1", "new_password": "Br4nd-New-Pass!", "confirm": "Br4nd-New-Pass!"},
        headers=dave,
    )
    assert wrong_old.status_code == 403 and wrong_old.json()["detail"] == "The old password is incorrect"
    mismatch = await harness.http.post(
        url, json={"old_password": GOOD_PASSWORD, "new_password": "Br4nd-New-Pass!", "confirm": "Br4nd-New-Pass?"},
        headers=dave,
    )
    assert mismatch.status_code == 422
    weak = await harness.http.post(
        url, json={"old_password": GOOD_PASSWORD, "new_password": "weak", "confirm": "weak"}, headers=dave
    )
    assert weak.status_code == 422
    assert weak.json()["errors"] == [{"field": "new_password", "location": "body", "detail": TOO_SHORT}]
    assert harness.auth.passwords["dave@example.org"] == GOOD_PASSWORD
    ok = await harness.http.post(
        url, json={"old_password": GOOD_PASSWORD, "new_password": "Br4nd-New-Pass!", "confirm": "Br4nd-New-Pass!"},
        headers=dave,
    )
    assert ok.status_code == 204
    assert harness.auth.passwords["dave@example.org"] == "Br4nd-New-Pass!"


async def test_user_role_reaches_only_self_service(harness: Harness) -> None:
    await harness.add_account("erin@example.org", GOOD_PASSWORD)
    erin = await harness.login("erin@example.org", GOOD_PASSWORD)
    for method, path in [
        ("GET", "/v1/domains"),
        ("GET", "/v1/accounts/erin@example.org"),
        ("GET", "/v1/settings"),
        ("GET", "/v1/events"),
        ("GET", "/v1/ips/blocks"),
        ("PUT", "/v1/accounts/erin@example.org/password"),
    ]:
        reply = await harness.http.request(method, path, headers=erin, json={"password": "Whatever-123!"})
        assert reply.status_code == 403, (method, path, reply.text)
        assert (reply.json()["status"], reply.json()["detail"]) == (403, "Not allowed for this role")


async def test_domain_admin_manages_only_its_domain(harness: Harness, admin_headers: dict[str, str]) -> None:
    await harness.add_account("frank@other.example", GOOD_PASSWORD)
    await harness.add_account("boss@example.org", GOOD_PASSWORD, "domain_admin")
    boss = await harness.login("boss@example.org", GOOD_PASSWORD)
    http = harness.http
    assert (await http.get("/v1/domains", headers=boss)).json() == {"domains": ["example.org"], "next_cursor": None}
    # R-ADM-1: another domain's resource is not found (the matrix is in test_confinement.py).
    assert (await http.get("/v1/domains/other.example/accounts", headers=boss)).status_code == 404
    assert (await http.get("/v1/accounts/frank@other.example", headers=boss)).status_code == 404
    made = await http.post("/v1/domains/example.org/accounts", json={"address": "gina", "password": GOOD_PASSWORD},
                           headers=boss)
    assert made.status_code == 201
    promote = await http.patch("/v1/accounts/gina@example.org", json={"role": "superadmin"}, headers=boss)
    assert promote.status_code == 403
    # A domain admin cannot take over the superadmin of its own domain.
    assert (await http.put(f"/v1/accounts/{ADMIN}/password", json={"password": "Takeover-Pass-1!"},
                           headers=boss)).status_code == 403
    assert (await http.post("/v1/domains", json={"name": "new.example"}, headers=boss)).status_code == 403
    assert (await http.put("/v1/domains/example.org/settings", json={}, headers=boss)).status_code == 403


async def test_r_lim_3_sent_external_counter(harness: Harness, admin_headers: dict[str, str]) -> None:
    http = harness.http
    await http.patch("/v1/settings", json={"limits": {"counter_timezone": "Pacific/Kiritimati"}}, headers=admin_headers)
    reply = await http.get(f"/v1/accounts/{ADMIN}/counters", headers=admin_headers)
    body = reply.json()
    assert body["timezone"] == "Pacific/Kiritimati" and body["sent_external"] == 0
    await harness.backend.redis.set(keys.sent_external(ADMIN, body["day"]), 17)
    again = await http.get(f"/v1/accounts/{ADMIN}/counters", headers=admin_headers)
    assert again.json()["sent_external"] == 17


async def test_r_dom_2_aliases(harness: Harness, admin_headers: dict[str, str]) -> None:
    http = harness.http
    made = await http.post("/v1/aliases", json={"alias": "Sales@example.org", "targets": [ADMIN, "x@remote.example"]},
                           headers=admin_headers)
    assert made.status_code == 201
    assert made.json() == {"alias": "sales@example.org", "targets": [ADMIN, "x@remote.example"]}
    assert (await http.post("/v1/aliases", json={"alias": "sales@example.org", "targets": [ADMIN]},
                            headers=admin_headers)).status_code == 409
    assert (await http.post("/v1/aliases", json={"alias": "x@unknown.example", "targets": [ADMIN]},
                            headers=admin_headers)).status_code == 404
    assert (await http.post("/v1/aliases", json={"alias": "y@example.org", "targets": ["t@x.org"] * 101},
                            headers=admin_headers)).status_code == 422
    assert (await http.get(f"/v1/accounts/{ADMIN}", headers=admin_headers)).json()["aliases"] == ["sales@example.org"]
    assert (await http.get("/v1/aliases/sales@example.org", headers=admin_headers)).status_code == 200
    assert (await http.delete("/v1/aliases/sales@example.org", headers=admin_headers)).status_code == 204
    assert (await http.get("/v1/aliases/sales@example.org", headers=admin_headers)).status_code == 404
    assert (await http.get(f"/v1/accounts/{ADMIN}", headers=admin_headers)).json()["aliases"] == []


async def test_admin_changes_are_audited(harness: Harness, admin_headers: dict[str, str], nats_conn: NATS) -> None:
    audited, sub = await _next_message(nats_conn, "rempart.events.admin.domain_created")
    assert (await harness.http.post("/v1/domains", json={"name": "audit.example"}, headers=admin_headers)).status_code == 201
    event = events_pb2.Event.FromString((await asyncio.wait_for(audited, 5)).data)
    assert event.attributes["actor"] == ADMIN and event.attributes["target"] == "audit.example"
    await sub.unsubscribe()  # type: ignore[attr-defined]


async def test_request_body_size_is_limited(harness: Harness, admin_headers: dict[str, str]) -> None:
    huge = {"relay": {"helo_bypass": ["x" * 1000] * 1100}}
    reply = await harness.http.put("/v1/settings", json=huge, headers=admin_headers)
    assert reply.status_code == 413


async def test_validation_errors_never_echo_input(harness: Harness) -> None:
    secret = "S3cret-" + "z" * 2000
    reply = await harness.http.post("/v1/auth/login", json={"email": ADMIN, "password": secret})
    assert reply.status_code == 422
    assert "S3cret" not in reply.text
    (error,) = reply.json()["errors"]
    assert (error["field"], error["location"]) == ("password", "body") and "1024" in error["detail"]


async def test_r_log_5_recreated_account_does_not_inherit_sessions(
    harness: Harness, admin_headers: dict[str, str]
) -> None:
    await harness.add_account("hal@example.org", GOOD_PASSWORD, "domain_admin")
    hal = await harness.login("hal@example.org", GOOD_PASSWORD)
    assert (await harness.http.delete("/v1/accounts/hal@example.org", headers=admin_headers)).status_code == 204
    await asyncio.sleep(0.01)
    await harness.add_account("hal@example.org", GOOD_PASSWORD, "domain_admin")
    assert (await harness.http.get("/v1/me", headers=hal)).status_code == 401
