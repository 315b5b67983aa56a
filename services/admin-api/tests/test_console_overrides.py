"""A domain's and an account's settings overrides in the console (R-OPS-1 at domain and account
scope, issue 14): the value that applies and where it comes from, set and clear through the API's
own routes, with R-ADM-1 (a domain admin only its own domain's accounts, never a domain's own
overrides), R-ADM-2 (a stale page is a 412) and CSRF on every form."""

from __future__ import annotations

import re

import httpx

from rempart.common.config import MailSettings

from .conftest import ADMIN, ADMIN_PASSWORD, Harness
from .console_support import Browser, auth_server, browsers, new_browser

__all__ = ["auth_server", "browsers"]  # fixtures used by name

GOOD_PASSWORD = "Corr3ct-Horse-Battery!"
BOSS = "boss@example.org"
IVY = "ivy@example.org"
ZED = "zed@other.example"
SIZE = "limits.max_message_size"
QUOTA = "limits.mailbox_quota_mb"
CATCH_ALL = "recipients.catch_all_address"


def row(page: httpx.Response, key: str) -> tuple[str, str]:
    """What a row says applies, and where it comes from."""
    section, name = key.split(".")
    found = re.search(rf'<tr id="row-{section}-{name}">.*?<td class="effective">([^<]*)</td>\s*'
                      rf'<td class="source">([^<]*)</td>', page.text, re.S)
    assert found, (key, page.text[:2000])
    return found.group(1), found.group(2)


async def _signed_in(harness: Harness, made: list[Browser], address: str, password: str) -> Browser:
    browser = new_browser(harness, made)
    assert (await browser.login(address, password)).status_code == 303
    return browser


async def _people(harness: Harness) -> None:
    await harness.add_account(BOSS, GOOD_PASSWORD, "domain_admin")
    await harness.add_account(IVY, GOOD_PASSWORD)
    await harness.add_account(ZED, GOOD_PASSWORD)


async def _set(browser: Browser, path: str, key: str, value: str, **extra: str) -> httpx.Response:
    await browser.get(path)
    field = key.replace(".", "__")
    return await browser.post(path, {"key": key, field: value, "action": "set", "etag": browser.etag, **extra})


async def test_r_ops_1_overrides_show_what_applies_and_where_it_comes_from(
    harness: Harness, browsers: list[Browser]
) -> None:
    await _people(harness)
    store = harness.backend.store
    await store.put_doc("server", {"limits": {"mailbox_quota_mb": 500}})
    admin = await _signed_in(harness, browsers, ADMIN, ADMIN_PASSWORD)
    domain_page = "/admin/domains/example.org/settings"
    account_page = f"/admin/accounts/{IVY}/settings"
    assert domain_page in (await admin.get("/admin/domains/example.org")).text  # linked from the domain
    assert account_page in (await admin.get(f"/admin/accounts/{IVY}")).text

    page = await admin.get(domain_page)
    assert page.status_code == 200
    assert row(page, QUOTA) == ("500", "server settings")
    assert row(page, SIZE) == (str(MailSettings().limits.max_message_size), "default")
    assert "ips.block_minutes" not in page.text  # only what a domain may override

    saved = await _set(admin, domain_page, SIZE, "10000000")
    assert saved.status_code == 303 and saved.headers["location"] == f"{domain_page}?notice=override_saved"
    assert await store.get_doc("domain:example.org") == {"limits": {"max_message_size": 10000000}}
    page = await admin.get(saved.headers["location"])
    assert row(page, SIZE) == ("10000000", "this domain") and "The override is saved" in page.text

    # The account sees the domain's value, then its own wins, then clearing it gives the domain's back.
    page = await admin.get(account_page)
    assert row(page, SIZE) == ("10000000", "the domain example.org")
    assert row(page, QUOTA) == ("500", "server settings")
    assert (await _set(admin, account_page, QUOTA, "50")).status_code == 303
    assert (await _set(admin, account_page, "login.allowed_ips", "192.0.2.0/24\n2001:db8::/32")).status_code == 303
    assert await store.get_doc(f"account:{IVY}") == {
        "limits": {"mailbox_quota_mb": 50}, "login": {"allowed_ips": ["192.0.2.0/24", "2001:db8::/32"]}}
    page = await admin.get(account_page)
    assert row(page, QUOTA) == ("50", "this account")
    assert row(page, "login.allowed_ips") == ("192.0.2.0/24\n2001:db8::/32", "this account")
    cleared = await admin.post(account_page, {"key": QUOTA, "action": "clear", "etag": admin.etag})
    assert cleared.status_code == 303 and cleared.headers["location"].endswith("notice=override_cleared")
    assert await store.get_doc(f"account:{IVY}") == {"login": {"allowed_ips": ["192.0.2.0/24", "2001:db8::/32"]}}
    assert row(await admin.get(account_page), QUOTA) == ("500", "server settings")

    # Every change is the API's audited write.
    events = await admin.get("/admin/events?area=admin")
    assert "account_settings_changed" in events.text and "domain_settings_changed" in events.text


async def test_r_ops_1_a_bad_override_is_refused_with_the_field_named(harness: Harness, browsers: list[Browser]) -> None:
    await _people(harness)
    admin = await _signed_in(harness, browsers, ADMIN, ADMIN_PASSWORD)
    path = f"/admin/accounts/{IVY}/settings"
    bad = await _set(admin, path, SIZE, "-5")
    assert bad.status_code == 422 and SIZE in bad.text and "greater than or equal" in bad.text
    words = await _set(admin, path, SIZE, "lots")
    assert words.status_code == 422 and SIZE in words.text
    choice = await _set(admin, path, "recipients.unknown_recipient_action", "shred")
    assert choice.status_code == 422 and "recipients.unknown_recipient_action" in choice.text
    server_only = await _set(admin, path, "ips.block_minutes", "5")
    assert server_only.status_code == 422 and "Not a setting this scope may override" in server_only.text
    assert await harness.backend.store.get_doc(f"account:{IVY}") == {}

    # R-ADM-2: a page read before someone else's change may not overwrite it.
    await admin.get(path)
    stale = admin.etag
    assert (await _set(admin, path, QUOTA, "10")).status_code == 303
    late = await admin.post(path, {"key": QUOTA, "limits__mailbox_quota_mb": "20", "action": "set", "etag": stale})
    assert late.status_code == 412 and "changed since you read it" in late.text
    assert await harness.backend.store.get_doc(f"account:{IVY}") == {"limits": {"mailbox_quota_mb": 10}}

    # CSRF: a form without this session's token changes nothing.
    for token in ("", "forged"):
        refused = await admin.post(path, {"key": QUOTA, "limits__mailbox_quota_mb": "30", "action": "set",
                                          "etag": admin.etag}, csrf=token)
        assert refused.status_code == 403 and "did not come from this console" in refused.text
    assert await harness.backend.store.get_doc(f"account:{IVY}") == {"limits": {"mailbox_quota_mb": 10}}


async def test_r_adm_1_a_domain_admin_overrides_its_own_accounts_only(harness: Harness, browsers: list[Browser]) -> None:
    await _people(harness)
    store = harness.backend.store
    await store.put_doc("server", {"recipients": {"unknown_recipient_action": "catch_all",
                                                  "catch_all_address": "postmaster@other.example"}})
    admin = await _signed_in(harness, browsers, ADMIN, ADMIN_PASSWORD)
    assert row(await admin.get("/admin/domains/example.org/settings"), CATCH_ALL) == (
        "postmaster@other.example", "server settings")
    boss = await _signed_in(harness, browsers, BOSS, GOOD_PASSWORD)

    # Its domain's overrides: shown, not changeable (they bind the domain's admins too).
    page = await boss.get("/admin/domains/example.org/settings")
    assert page.status_code == 200 and 'id="read-only"' in page.text and "<form method=\"post\" action=\"/admin/domains" \
        not in page.text
    assert row(page, CATCH_ALL) == ("set server-wide", "server settings")  # another tenant's address stays hidden
    refused = await _set(boss, "/admin/domains/example.org/settings", SIZE, "100000")
    assert refused.status_code == 403 and await store.get_doc("domain:example.org") == {}

    # Its own domain's accounts: yes. Another tenant's: not found, whether read or written.
    saved = await _set(boss, f"/admin/accounts/{IVY}/settings", "limits.max_messages_per_day", "40")
    assert saved.status_code == 303
    assert await store.get_doc(f"account:{IVY}") == {"limits": {"max_messages_per_day": 40}}
    for path in ("/admin/domains/other.example/settings", f"/admin/accounts/{ZED}/settings"):
        assert (await boss.get(path)).status_code == 404, path
    await boss.get(f"/admin/accounts/{IVY}/settings")
    other = await boss.post(f"/admin/accounts/{ZED}/settings", {"key": SIZE, "limits__max_message_size": "1",
                                                                "action": "set", "etag": boss.etag})
    assert other.status_code == 404 and await store.get_doc(f"account:{ZED}") == {}
    # A catch-all in another tenant's domain is refused as in the API (R-ADM-1).
    catch_all = await _set(boss, f"/admin/accounts/{IVY}/settings", CATCH_ALL, ZED)
    assert catch_all.status_code == 404 and "Target address not found" in catch_all.text
    assert 'id="overrides"' in catch_all.text  # shown above the forms, to correct
    assert await store.get_doc(f"account:{IVY}") == {
        "limits": {"max_messages_per_day": 40}}
    # A user reaches none of it.
    ivy = await _signed_in(harness, browsers, IVY, GOOD_PASSWORD)
    assert (await ivy.get(f"/admin/accounts/{IVY}/settings")).status_code == 403
