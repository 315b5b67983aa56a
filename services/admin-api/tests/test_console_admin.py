"""The web console's administration pages over HTTP (issue 14): domains, accounts, aliases, the
helpdesk (R-ADM-4), blocked IPs (R-IPS-5), events, settings (R-OPS-1), status, and who may
reach what (R-ADM-1: a user no admin page, a domain admin only its own domain)."""

from __future__ import annotations

import json
import re
import time

from rempart.common import keys
from rempart.common.stats import StatsRecorder

from .conftest import ADMIN, ADMIN_PASSWORD, TOO_SHORT, Harness
from .console_support import Browser, TotpAuthService, auth_server, browsers, new_browser, session_cookie
from .queue_support import queued
from .test_cluster import FakeApiServer, kube_api, pod

__all__ = ["auth_server", "browsers", "kube_api"]  # fixtures used by name

GOOD_PASSWORD = "Corr3ct-Horse-Battery!"
NEW_PASSWORD = "Br4nd-New-Pass-Word!"
BOSS = "boss@example.org"
IVY = "ivy@example.org"
ZED = "zed@other.example"


async def _admin(harness: Harness, made: list[Browser]) -> Browser:
    browser = new_browser(harness, made)
    assert (await browser.login(ADMIN, ADMIN_PASSWORD)).status_code == 303
    return browser


async def _boss(harness: Harness, made: list[Browser]) -> Browser:
    await harness.add_account(BOSS, GOOD_PASSWORD, "domain_admin")
    await harness.add_account(IVY, GOOD_PASSWORD)
    await harness.add_account(ZED, GOOD_PASSWORD)
    browser = new_browser(harness, made)
    assert (await browser.login(BOSS, GOOD_PASSWORD)).status_code == 303
    return browser


def _location(reply: object) -> str:
    return reply.headers["location"]  # type: ignore[attr-defined, no-any-return]


# Roles (R-ADM-1) ---------------------------------------------------------------------------------------
async def test_r_adm_1_a_user_reaches_no_admin_page(harness: Harness, browsers: list[Browser]) -> None:
    await harness.add_account(IVY, GOOD_PASSWORD)
    browser = new_browser(harness, browsers)
    await browser.login(IVY, GOOD_PASSWORD)
    account = await browser.get("/account")
    assert "Domains" not in account.text and "Settings" not in account.text
    for path in ("/admin/domains", "/admin/domains/example.org", f"/admin/accounts/{ADMIN}", "/admin/blocks",
                 "/admin/events", "/admin/settings", "/admin/status", "/admin/aliases/a@example.org"):
        reply = await browser.get(path)
        assert reply.status_code == 403 and "Not allowed for this role" in reply.text, path
    for path, data in (("/admin/domains", {"name": "evil.example"}),
                       (f"/admin/accounts/{ADMIN}/password", {"password": NEW_PASSWORD}),
                       ("/admin/settings/ips", {"ips__block_minutes": "1"}),
                       ("/admin/blocks/unblock", {"ip": "192.0.2.1"})):
        assert (await browser.post(path, data)).status_code == 403, path
    assert "evil.example" not in await harness.backend.directory.list_domains()
    assert harness.auth.passwords[ADMIN] == ADMIN_PASSWORD


async def test_r_adm_1_a_domain_admin_sees_only_its_domain(harness: Harness, browsers: list[Browser]) -> None:
    boss = await _boss(harness, browsers)
    nav = (await boss.get("/account")).text
    assert "/admin/domains" in nav and "/admin/settings" not in nav and "/admin/blocks" not in nav
    domains = await boss.get("/admin/domains")
    assert "example.org" in domains.text and "other.example" not in domains.text
    assert 'action="/admin/domains"' not in domains.text  # only a superadmin creates domains
    mine = await boss.get("/admin/domains/example.org")
    assert IVY in mine.text and "managed by a superadmin" in mine.text  # the superadmin: listed, not opened
    assert f'href="/admin/accounts/{ADMIN}"' not in mine.text
    assert '<option value="domain_admin">' not in mine.text
    for path in ("/admin/domains/other.example", f"/admin/accounts/{ZED}", "/admin/aliases/x@other.example"):
        reply = await boss.get(path)
        assert reply.status_code == 404 and "not found" in reply.text, path
    assert (await boss.get(f"/admin/accounts/{ADMIN}")).status_code == 403
    for path in ("/admin/blocks", "/admin/events", "/admin/settings", "/admin/status"):
        assert (await boss.get(path)).status_code == 403, path
    # Writes are confined the same way.
    await boss.get("/admin/domains/example.org")
    refused = await boss.post(f"/admin/accounts/{ZED}/password", {"password": NEW_PASSWORD})
    assert refused.status_code == 404 and harness.auth.passwords[ZED] == GOOD_PASSWORD
    promoted = await boss.post("/admin/domains/example.org/accounts",
                               {"address": "sub", "password": GOOD_PASSWORD, "role": "domain_admin"})
    assert promoted.status_code == 403 and "Not allowed for this role" in promoted.text
    alias = await boss.post("/admin/domains/example.org/aliases", {"alias": "sales", "targets": ZED})
    assert alias.status_code == 404 and await harness.backend.directory.alias_targets("sales@example.org") is None
    created = await boss.post("/admin/domains/example.org/accounts",
                              {"address": "newbie", "password": GOOD_PASSWORD, "display_name": "New"})
    assert created.status_code == 303 and _location(created) == "/admin/accounts/newbie@example.org?notice=account_created"


# Domains, accounts, aliases ---------------------------------------------------------------------------
async def test_domain_lifecycle(harness: Harness, browsers: list[Browser]) -> None:
    admin = await _admin(harness, browsers)
    await admin.get("/admin/domains")
    bad = await admin.post("/admin/domains", {"name": "not a domain"})
    assert bad.status_code == 422 and "Not a domain name" in bad.text
    created = await admin.post("/admin/domains", {"name": "Shop.Example", "description": "the shop"})
    assert created.status_code == 303 and _location(created) == "/admin/domains/shop.example?notice=domain_created"
    page = await admin.get(_location(created))
    assert "The domain is created." in page.text and 'value="the shop"' in page.text
    tag = admin.etag
    saved = await admin.post("/admin/domains/shop.example", {"description": "the new shop", "etag": tag})
    assert saved.status_code == 303
    stale = await admin.post("/admin/domains/shop.example", {"description": "lost update", "etag": tag})
    assert stale.status_code == 412 and "changed since you read it" in stale.text
    assert 'value="the new shop"' in stale.text  # shown with the fresh state and ETag
    await admin.post("/admin/domains/shop.example/accounts", {"address": "al", "password": GOOD_PASSWORD})
    await admin.get("/admin/domains/shop.example")
    busy = await admin.post("/admin/domains/shop.example/delete", {"etag": admin.etag})
    assert busy.status_code == 409 and "still has accounts" in busy.text
    await admin.get("/admin/accounts/al@shop.example")
    assert (await admin.post("/admin/accounts/al@shop.example/delete", {"etag": admin.etag})).status_code == 303
    await admin.get("/admin/domains/shop.example")
    gone = await admin.post("/admin/domains/shop.example/delete", {"etag": admin.etag})
    assert gone.status_code == 303 and _location(gone) == "/admin/domains?notice=domain_deleted"
    assert "shop.example" not in await harness.backend.directory.list_domains()


async def test_account_create_edit_disable_and_reset_password(harness: Harness, browsers: list[Browser]) -> None:
    admin = await _admin(harness, browsers)
    await admin.get("/admin/domains/example.org")
    weak = await admin.post("/admin/domains/example.org/accounts", {"address": "ann", "password": "short"})
    assert weak.status_code == 422 and f"Password: {TOO_SHORT}" in weak.text
    assert await harness.backend.directory.get_account("ann@example.org") is None
    created = await admin.post("/admin/domains/example.org/accounts",
                               {"address": "ann", "password": GOOD_PASSWORD, "display_name": "Ann", "role": "user"})
    assert created.status_code == 303
    ann = new_browser(harness, browsers)
    await ann.login("ann@example.org", GOOD_PASSWORD)
    page = await admin.get("/admin/accounts/ann@example.org")
    assert 'value="Ann"' in page.text and "checked" in page.text
    edited = await admin.post("/admin/accounts/ann@example.org", {"display_name": "Ann B.", "etag": admin.etag,
                                                                   "role": "user"})  # enabled left unticked
    assert edited.status_code == 303
    account = await harness.backend.directory.get_account("ann@example.org")
    assert account is not None and account.display_name == "Ann B." and not account.enabled
    assert (await ann.get("/account")).headers["location"] == "/login"  # disabled: its session is gone
    await admin.get("/admin/accounts/ann@example.org")
    enabled = await admin.post("/admin/accounts/ann@example.org",
                               {"display_name": "Ann B.", "enabled": "on", "role": "user", "etag": admin.etag})
    assert enabled.status_code == 303
    reset = await admin.post("/admin/accounts/ann@example.org/password", {"password": NEW_PASSWORD})
    assert reset.status_code == 303 and harness.auth.passwords["ann@example.org"] == NEW_PASSWORD
    myself = await admin.post(f"/admin/accounts/{ADMIN}", {"display_name": "Admin", "role": "superadmin"})
    assert myself.status_code == 409 and "cannot disable or demote yourself" in myself.text


async def test_r_adm_4_helpdesk_unlock_reset_2fa_revoke_and_end_sessions(
    harness: Harness, browsers: list[Browser]
) -> None:
    admin = await _admin(harness, browsers)
    await harness.add_account(IVY, GOOD_PASSWORD)
    ivy = new_browser(harness, browsers)
    await ivy.login(IVY, GOOD_PASSWORD)
    await ivy.post("/account/app-passwords", {"name": "phone"})
    await ivy.get("/account/app-passwords")
    await ivy.post("/account/app-passwords", {"name": "laptop"})
    harness.auth.locked.add(IVY)
    page = await admin.get(f"/admin/accounts/{IVY}")
    assert "phone" in page.text and "laptop" in page.text
    unlocked = await admin.post(f"/admin/accounts/{IVY}/unlock")
    assert _location(unlocked) == f"/admin/accounts/{IVY}?notice=unlocked" and IVY not in harness.auth.locked
    again = await admin.post(f"/admin/accounts/{IVY}/unlock")
    assert _location(again) == f"/admin/accounts/{IVY}?notice=not_locked"
    assert "was not locked" in (await admin.get(_location(again))).text
    one = await admin.post(f"/admin/accounts/{IVY}/app-passwords/revoke", {"name": "phone"})
    assert one.status_code == 303 and list(harness.auth.app_passwords[IVY]) == ["laptop"]
    every = await admin.post(f"/admin/accounts/{IVY}/app-passwords/revoke")
    assert every.status_code == 303 and IVY not in harness.auth.app_passwords
    harness.auth.totp_secrets[IVY] = "JBSWY3DPEHPK3PXP"
    reset = await admin.post(f"/admin/accounts/{IVY}/totp-reset")
    assert _location(reset) == f"/admin/accounts/{IVY}?notice=totp_reset" and IVY not in harness.auth.totp_secrets
    assert (await ivy.get("/account")).headers["location"] == "/login"  # a lost phone may be a stolen one
    await ivy.login(IVY, GOOD_PASSWORD)
    ended = await admin.post(f"/admin/accounts/{IVY}/sessions/end")
    assert ended.status_code == 303 and (await ivy.get("/account")).headers["location"] == "/login"
    own = await admin.post(f"/admin/accounts/{ADMIN}/totp-reset")
    assert own.status_code == 403 and "current code" in own.text
    assert (await admin.get("/account")).status_code == 200


async def test_aliases_create_edit_delete(harness: Harness, browsers: list[Browser]) -> None:
    admin = await _admin(harness, browsers)
    await harness.add_account(IVY, GOOD_PASSWORD)
    await admin.get("/admin/domains/example.org")
    bad = await admin.post("/admin/domains/example.org/aliases", {"alias": "sales", "targets": "not an address"})
    assert bad.status_code == 422 and "not an address" in bad.text
    created = await admin.post("/admin/domains/example.org/aliases",
                               {"alias": "sales", "targets": f"{IVY}\nfriend@remote.example"})
    assert _location(created) == "/admin/aliases/sales@example.org?notice=alias_created"
    assert await harness.backend.directory.alias_targets("sales@example.org") == [IVY, "friend@remote.example"]
    page = await admin.get("/admin/aliases/sales@example.org")
    assert "friend@remote.example" in page.text
    tag = admin.etag
    assert (await admin.post("/admin/aliases/sales@example.org", {"targets": IVY, "etag": tag})).status_code == 303
    assert await harness.backend.directory.alias_targets("sales@example.org") == [IVY]
    stale = await admin.post("/admin/aliases/sales@example.org", {"targets": ADMIN, "etag": tag})
    assert stale.status_code == 412
    await admin.get("/admin/aliases/sales@example.org")
    deleted = await admin.post("/admin/aliases/sales@example.org/delete", {"etag": admin.etag})
    assert _location(deleted) == "/admin/domains/example.org?notice=alias_deleted"
    assert await harness.backend.directory.alias_targets("sales@example.org") is None


# Operations ------------------------------------------------------------------------------------------
async def _block(harness: Harness, ip: str, reason: str) -> None:
    now = time.time()
    record = {"reason": reason, "blocked_at": now, "expires_at": now + 3600, "client_ip": ip, "protocol": "smtp"}
    await harness.backend.redis.set(keys.ips_block(ip), json.dumps(record), ex=3600)
    await harness.backend.redis.zadd(keys.IPS_BLOCKS, {ip: now + 3600})


async def test_r_ips_5_blocked_ips_inspect_and_unblock(harness: Harness, browsers: list[Browser]) -> None:
    admin = await _admin(harness, browsers)
    await _block(harness, "192.0.2.7", "R-IPS-3 unknown recipients")
    await _block(harness, "198.51.100.3", "failed logins")
    listing = await admin.get("/admin/blocks")
    assert "192.0.2.7" in listing.text and "unknown recipients" in listing.text and "R-IPS-3" not in listing.text
    looked = await admin.get("/admin/blocks?ip=192.0.2.7")
    assert 'id="lookup-title">192.0.2.7' in looked.text
    missing = await admin.get("/admin/blocks?ip=203.0.113.1")
    assert missing.status_code == 404 and "Block not found" in missing.text
    reply = await admin.post("/admin/blocks/unblock", {"ip": "192.0.2.7"})
    assert _location(reply) == "/admin/blocks?notice=unblocked"
    assert await harness.backend.redis.get(keys.ips_block("192.0.2.7")) is None
    after = await admin.get("/admin/blocks")
    assert "192.0.2.7" not in after.text and "198.51.100.3" in after.text
    again = await admin.post("/admin/blocks/unblock", {"ip": "192.0.2.7"})
    assert again.status_code == 404


async def test_the_event_stream_filtered(harness: Harness, browsers: list[Browser]) -> None:
    admin = await _admin(harness, browsers)
    await harness.backend.events.publish("ips", "blocked", client_ip="192.0.2.7", reason="failed logins")
    await harness.backend.events.publish("auth", "login_failed", client_ip="203.0.113.5", account=IVY,
                                         reason="bad_password", password="must-not-show")
    for _ in range(50):
        if "ips/blocked" in (await admin.get("/admin/events")).text:
            break
    page = await admin.get("/admin/events")
    assert "ips/blocked" in page.text and "auth/login_failed" in page.text and "admin/login" in page.text
    assert "must-not-show" not in page.text and "password=[redacted]" in page.text
    filtered = await admin.get("/admin/events?area=ips")
    assert "ips/blocked" in filtered.text and "auth/login_failed" not in filtered.text
    by_ip = await admin.get("/admin/events?client_ip=203.0.113.5")
    assert "auth/login_failed" in by_ip.text and "ips/blocked" not in by_ip.text


async def test_r_ops_1_settings_grouped_with_defaults_and_saved(harness: Harness, browsers: list[Browser]) -> None:
    admin = await _admin(harness, browsers)
    page = await admin.get("/admin/settings")
    titles = re.findall(r'<h2 id="[a-z]+-title">([^<]+)</h2>', page.text)
    assert titles[:7] == ["Relay and senders", "Limits", "DNS checks", "Intrusion prevention", "Login policy",
                          "Passwords", "TLS"]
    assert 'name="ips__block_minutes" type="number" value="1440"' in page.text
    assert "How long a block lasts (R-IPS-4)." in page.text and "Default: 1440." in page.text
    assert "Default: 127.0.0.1, ::1." in page.text
    form = {"ips__block_minutes": "60", "ips__whitelist": "192.0.2.0/24\n2001:db8::/32"}
    for name in ("smtp", "imap_pop", "across_sessions", "known_ip_exempt_from_connection_rate", "block_dnsbl_listed",
                 "refuse_blocked", "close_blocked_connection"):
        form[f"ips__{name}"] = "on"  # ticked as the page shows them
    for name, value in (("max_connections_per_minute", "5"), ("ipv6_prefix_length", "64"),
                        ("max_failed_logins", "10"), ("failed_logins_window_minutes", "60"),
                        ("max_unknown_recipients", "3"), ("max_relay_denials", "5"), ("max_rset", "5"),
                        ("spam_score_threshold", "0.0"), ("max_message_size_mb", "0"),
                        ("max_simultaneous_connections", "0"), ("simultaneous_connection_ttl_seconds", "1800"),
                        ("counter_window_minutes", "60")):
        form[f"ips__{name}"] = value
    saved = await admin.post("/admin/settings/ips", {**form, "etag": admin.etag})
    assert saved.status_code == 303 and _location(saved) == "/admin/settings?notice=settings_saved#ips"
    stored = await harness.backend.store.get_doc("server")
    assert stored == {"ips": {"block_minutes": 60, "whitelist": ["192.0.2.0/24", "2001:db8::/32"]}}
    stale = await admin.post("/admin/settings/ips", {**form, "ips__block_minutes": "30", "etag": admin.etag})
    assert stale.status_code == 412
    await admin.get("/admin/settings")
    invalid = await admin.post("/admin/settings/ips", {**form, "ips__block_minutes": "0", "etag": admin.etag})
    assert invalid.status_code == 422 and "ips.block_minutes" in invalid.text
    assert (await harness.backend.store.get_doc("server"))["ips"]["block_minutes"] == 60
    await admin.get("/admin/settings")
    rotated = await admin.post("/admin/settings/srs-rotation", {"etag": admin.etag})
    assert rotated.status_code == 303
    assert "dns.srs_secrets</code>: 1 set" in (await admin.get("/admin/settings")).text


async def test_status_page_readiness_queue_and_the_last_hour(harness: Harness, browsers: list[Browser]) -> None:
    """Issue 14's status page: each dependency up or down with why in words, the outbound queue's
    depth and oldest message (R-OUT-2), and the last hour's counts (rempart.common.stats) drawn
    as an SVG in the page and given as a table."""
    admin = await _admin(harness, browsers)
    now = time.time()
    page = await admin.get("/admin/status")
    assert page.status_code == 200
    for part in ("Redis", "NATS JetStream", "Auth service"):
        assert re.search(rf'<tr class="ok"><th scope="row">{part}</th><td>up</td>', page.text), part
    assert "Empty: no message is waiting" in page.text
    assert "0 messages accepted, 0 SMTP commands refused" in page.text
    assert "The other services' pods: not running in Kubernetes" in page.text  # and so none to show

    # Two messages in the outbound queue, the oldest received two hours ago.
    await queued(harness.backend, "alice@example.org", ["bob@remote.test"], received_ms=int((now - 7260) * 1000))
    await queued(harness.backend, "alice@example.org", ["carol@remote.test"], received_ms=int(now * 1000))
    # Counted as the edge and the policy service count (every replica adds to the same buckets).
    for minutes_ago, accepted, refused in ((20, 3, 1), (2, 1, 4)):
        recorder = StatsRecorder(harness.backend.redis, clock=lambda m=minutes_ago: now - m * 60)
        for _ in range(accepted):
            recorder.message_accepted()
        for _ in range(refused):
            recorder.refusal("relay_denied")
        await recorder.close()
    page = await admin.get("/admin/status")
    assert "2 messages waiting for delivery to other domains; the oldest has waited 2 h 1 min" in page.text
    assert "4 messages accepted, 5 SMTP commands refused" in page.text
    rows = re.findall(r'<tr><th scope="row">(\d\d:\d\d) to \d\d:\d\d</th><td>(\d+)</td><td>(\d+)</td></tr>', page.text)
    assert len(rows) in (12, 13)  # the hour in 5-minute buckets, the current one included
    assert sorted((int(a), int(r)) for _, a, r in rows if a != "0" or r != "0") == [(1, 4), (3, 1)]
    # The chart is drawn here: the largest count (4) is a full bar; nothing for a script to do.
    bars = {(kind, int(count), int(height)) for height, kind, count in re.findall(
        r'height="(\d+)" class="bar (accepted|refused)"><title>[^<]*: (\d+) (?:accepted|refused)</title>', page.text)}
    assert {bar for bar in bars if bar[1]} == {("accepted", 3, 75), ("refused", 1, 25), ("accepted", 1, 25),
                                               ("refused", 4, 100)}, bars
    assert "<svg" in page.text and "<script" not in page.text.split("</head>")[1]

    # The auth service goes away: shown down, with why in words, and the rest still shown.
    assert isinstance(harness.auth, TotpAuthService) and harness.auth.server is not None
    await harness.auth.server.stop(0)
    page = await admin.get("/admin/status")
    assert page.status_code == 200
    down = re.search(r'<tr class="refused"><th scope="row">Auth service</th><td>DOWN</td><td>([^<]+)</td>', page.text)
    assert down and ("unavailable" in down.group(1) or "no answer within" in down.group(1)), page.text
    assert re.search(r'<tr class="ok"><th scope="row">Redis</th><td>up</td>', page.text)
    assert "2 messages waiting" in page.text


async def test_status_page_shows_each_services_pods_readiness(
    kube_api: FakeApiServer, harness: Harness, browsers: list[Browser]
) -> None:
    """In Kubernetes, every service's readiness is its pods' Ready condition (their /readyz or
    gRPC health probes as the kubelet runs them), read through the API's cluster view."""
    kube_api.items = [pod("rempart-smtp-edge-a", "smtp-edge", True), pod("rempart-smtp-edge-b", "smtp-edge", False,
                                                                         restarts=3),
                      pod("rempart-policy-a", "policy", False), pod("rempart-imap-pop-a", "imap-pop", True)]
    admin = await _admin(harness, browsers)
    page = await admin.get("/admin/status")
    pattern = r'<th scope="row">([a-z-]+ pods)</th><td>(up|DOWN)</td><td>([^<]*)</td>'
    rows = {name: (state, detail) for name, state, detail in re.findall(pattern, page.text)}
    assert rows == {
        "imap-pop pods": ("up", "1 of 1 pod ready"),
        "policy pods": ("DOWN", "0 of 1 pod ready; not ready: rempart-policy-a (0 of 1 containers ready)"),
        "smtp-edge pods": ("up", "1 of 2 pods ready; not ready: rempart-smtp-edge-b (0 of 1 containers ready, "
                                 "3 restarts)"),
    }, rows
    assert 'id="pods-note"' not in page.text
    kube_api.delay = 1.5  # beyond the cluster view's bound (1 s here): said, and the rest still shown
    page = await admin.get("/admin/status")
    assert "The other services' pods: the Kubernetes API did not answer within 1 s" in page.text
    assert re.search(r'<th scope="row">Redis</th><td>up</td>', page.text)


async def test_a_session_token_from_the_console_is_not_kept_after_logout(
    harness: Harness, browsers: list[Browser]
) -> None:
    admin = await _admin(harness, browsers)
    token = session_cookie(admin)
    assert token and token not in str(await harness.backend.redis.keys("*"))  # only its digest is stored
