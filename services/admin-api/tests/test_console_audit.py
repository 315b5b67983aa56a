"""R-ADM-5 in the web console: a console write is audited like an API write, so without the audit
stream it is refused with the console's 503 page *before* anything changes (fail closed), while
pages that only read keep working."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.routing import APIRoute

from rempart.admin_api import routes_directory, routes_helpdesk, routes_settings, routes_twofactor
from rempart.admin_api.console.calls import audited_write
from rempart.common.audit import AUDIT_TIMEOUT_SECONDS

from .conftest import ADMIN, ADMIN_PASSWORD, Harness, private_nats
from .console_support import Browser, auth_server, browsers, new_browser, session_cookie
from .test_audit import shorten_audit_wait

__all__ = ["auth_server", "browsers"]  # fixtures used by name

GOOD_PASSWORD = "Corr3ct-Horse-Battery!"
NEW_PASSWORD = "Br4nd-New-Pass-Word!"
CAT = "cat@example.org"


def test_r_adm_5_the_console_checks_the_audit_stream_where_the_api_does() -> None:
    """Every write route of the API that depends on ``audit_ready`` is an audited write for the
    console too (self-service TOTP and app passwords among them, R-ADM-5); reads are not."""
    for module in (routes_directory, routes_helpdesk, routes_settings, routes_twofactor):
        for route in module.router.routes:
            assert isinstance(route, APIRoute)
            assert audited_write(route.endpoint) == ("GET" not in (route.methods or set())), route.path
    assert audited_write(routes_twofactor.import_password_hash)
    assert audited_write(routes_twofactor.enrol_totp)
    assert not audited_write(routes_twofactor.get_totp)


async def test_r_adm_5_a_console_write_without_the_audit_stream_changes_nothing(
    harness: Harness, browsers: list[Browser], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await harness.add_account(CAT, GOOD_PASSWORD)
    harness.auth.locked.add(CAT)
    admin = new_browser(harness, browsers)
    assert (await admin.login(ADMIN, ADMIN_PASSWORD)).status_code == 303
    async with private_nats(harness, tmp_path / "nats") as own:
        await admin.get(f"/admin/accounts/{CAT}")
        saved = await admin.post(f"/admin/accounts/{CAT}", {"display_name": "Cat", "enabled": "on", "role": "user",
                                                            "etag": admin.etag})
        assert saved.status_code == 303  # audited on the private server's stream
        own.stop()
        # The refusals below wait less than the product's AUDIT_TIMEOUT_SECONDS for the same 503 (that
        # wait, and that it stays under 10 s, is test_audit's); the console adds no wait of its own.
        shorten_audit_wait(monkeypatch)
        page = await admin.get(f"/admin/accounts/{CAT}")
        assert page.status_code == 200 and 'value="Cat"' in page.text  # reads still work
        started = time.monotonic()
        refused = await admin.post(f"/admin/accounts/{CAT}", {"display_name": "Changed", "enabled": "on",
                                                              "role": "user", "etag": admin.etag})
        assert time.monotonic() - started < AUDIT_TIMEOUT_SECONDS
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.headers["content-type"].startswith("text/html")
        assert "<h1>Unavailable</h1>" in refused.text and "Try again in a moment." in refused.text
        account = await harness.backend.directory.get_account(CAT)
        assert account is not None and account.display_name == "Cat"
        writes = [
            ("/admin/domains", {"name": "never.example"}),
            ("/admin/domains/example.org/accounts", {"address": "dan", "password": GOOD_PASSWORD, "role": "user"}),
            (f"/admin/accounts/{CAT}/password", {"password": NEW_PASSWORD}),
            (f"/admin/accounts/{CAT}/unlock", {}),
            ("/admin/settings/srs-rotation", {"etag": admin.etag}),
            ("/account/sessions/end", {}),
        ]
        for path, form in writes:
            started = time.monotonic()
            reply = await admin.post(path, form)
            assert reply.status_code == 503 and "<h1>Unavailable</h1>" in reply.text, (path, reply.status_code)
            assert time.monotonic() - started < AUDIT_TIMEOUT_SECONDS, path
        assert "never.example" not in await harness.backend.directory.list_domains()
        assert await harness.backend.directory.get_account("dan@example.org") is None
        assert harness.auth.passwords[CAT] == GOOD_PASSWORD and CAT in harness.auth.locked
        assert await harness.backend.store.get_doc("server") == {}
        # Signing out everywhere was refused too: the console session still stands.
        assert session_cookie(admin) and (await admin.get("/account")).status_code == 200
