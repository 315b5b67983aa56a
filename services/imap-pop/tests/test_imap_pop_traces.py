"""A trace per IMAP and POP3 command (issue 13): named after the command, with its result, the
auth call under LOGIN; and never a password, a SASL response or a made-up command name in any
span. Real Redis, NATS and gRPC (the in-test auth and policy servicers of conftest)."""

from __future__ import annotations

import asyncio
import base64

import pytest
from imappop_helpers import BOB, BOB_PASSWORD, SourceIMAP, SourcePOP3, raw_connect

from rempart.common.testing.traces import attribute_text, captured_spans

pytestmark = pytest.mark.timeout(60)

WRONG_PASSWORD = "not the password 4711!"


async def test_imap_login_span_never_holds_the_password(start_service) -> None:  # type: ignore[no-untyped-def]
    with captured_spans() as exporter:
        service = await start_service()

        def run() -> None:
            imap = SourceIMAP(service.ports["imap"])
            try:
                imap.login(BOB, WRONG_PASSWORD)
            except imap.error:
                pass
            imap.login(BOB, BOB_PASSWORD)
            imap.select("INBOX")
            imap.logout()
            raw = raw_connect(service.ports["imap"])
            raw.line()
            token = base64.b64encode(f"\0{BOB}\0{BOB_PASSWORD}".encode())
            raw.send(b"a AUTHENTICATE PLAIN " + token + b"\r\n")
            assert raw.until(b"a ")[-1].startswith(b"a OK")
            raw.send(b"b XYZZY-" + BOB_PASSWORD.encode() + b"\r\n")
            raw.until(b"b ")

        await asyncio.to_thread(run)
        spans = exporter.get_finished_spans()

    logins = [s for s in spans if s.name == "IMAP LOGIN"]
    assert [s.attributes["rempart.imap.result"] for s in logins] == ["NO", "OK"]
    for login in logins:
        assert login.parent is None, "each command starts its own trace"
        assert login.attributes["client.address"] == "127.0.0.1"
        [auth_call] = [s for s in spans if s.parent is not None and s.parent.span_id == login.context.span_id
                       and s.name == "rempart.auth.v1.AuthService/Authenticate"]
        assert auth_call.context.trace_id == login.context.trace_id
    [select] = [s for s in spans if s.name == "IMAP SELECT"]
    assert select.attributes["rempart.imap.result"] == "OK"
    [authenticate] = [s for s in spans if s.name == "IMAP AUTHENTICATE"]
    assert authenticate.attributes["rempart.imap.result"] == "OK"
    [unknown] = [s for s in spans if s.name == "IMAP UNKNOWN"]
    assert unknown.attributes["rempart.imap.result"] == "BAD"

    text = attribute_text(spans)
    token = base64.b64encode(f"\0{BOB}\0{BOB_PASSWORD}".encode()).decode()
    for secret in (BOB_PASSWORD, WRONG_PASSWORD, token, "XYZZY"):
        assert secret not in text, f"{secret!r} in a span"


async def test_pop3_pass_span_never_holds_the_password(start_service) -> None:  # type: ignore[no-untyped-def]
    with captured_spans() as exporter:
        service = await start_service()

        def run() -> None:
            pop = SourcePOP3(service.ports["pop3"])
            pop.user(BOB)
            pop.pass_(BOB_PASSWORD)
            pop.stat()
            pop.quit()

        await asyncio.to_thread(run)
        spans = exporter.get_finished_spans()

    results = {s.name: s.attributes.get("rempart.pop3.result") for s in spans if s.name.startswith("POP3 ")}
    assert results == {"POP3 USER": "OK", "POP3 PASS": "OK", "POP3 STAT": "OK", "POP3 QUIT": "OK"}
    assert BOB_PASSWORD not in attribute_text(spans)
