"""POP3 driven by poplib."""

from __future__ import annotations

import asyncio
import base64
import imaplib
import poplib

import pytest
from imappop_helpers import (
    BLOCKED_IP,
    BLOCKED_TEXT,
    BOB,
    BOB_PASSWORD,
    UNTRUSTED_IP,
    SourcePOP3,
    raw_connect,
    simple_message,
)

from rempart.common.pb.policy.v1 import policy_pb2
from rempart.imap_pop import replies as R

pytestmark = pytest.mark.timeout(60)


def attempt(port: int, user: str, password: str, source: str = "127.0.0.1") -> str:
    pop = SourcePOP3(port, source)
    try:
        pop.user(user)
        return pop.pass_(password).decode()
    except poplib.error_proto as exc:
        return exc.args[0].decode()
    finally:
        pop.close()


async def test_r_log_4_pop3_login_ok_and_same_failure_text(service) -> None:  # type: ignore[no-untyped-def]
    port = service.ports["pop3"]
    ok = await asyncio.to_thread(attempt, port, BOB, BOB_PASSWORD)
    wrong = await asyncio.to_thread(attempt, port, BOB, "nope")
    unknown = await asyncio.to_thread(attempt, port, "ghost@example.org", "nope")
    assert ok.startswith("+OK")
    assert wrong == unknown == R.POP3_AUTH_FAILED == "-ERR [AUTH] Unknown user or incorrect password"
    checks = [r for r in service.policy.requests if r.stage == policy_pb2.STAGE_AUTH]
    assert [(r.auth_login, r.auth_success, r.session.protocol) for r in checks] == [
        (BOB, True, policy_pb2.PROTOCOL_POP3), (BOB, False, policy_pb2.PROTOCOL_POP3),
        ("ghost@example.org", False, policy_pb2.PROTOCOL_POP3)]
    assert checks[0].session.authenticated_account == BOB and not checks[0].auth_failure
    assert service.auth.requests[0].protocol == "pop3" and service.auth.requests[0].mechanism == "USER"


async def test_r_tls_2_pop3_user_refused_before_stls(service) -> None:  # type: ignore[no-untyped-def]
    def run() -> tuple[str, list[bytes], str]:
        pop = SourcePOP3(service.ports["pop3"], UNTRUSTED_IP)
        caps = pop.capa()
        try:
            pop.user(BOB)
            refused = "accepted"
        except poplib.error_proto as exc:
            refused = exc.args[0].decode()
        pop.stls(service.client_tls())
        pop.user(BOB)
        ok = pop.pass_(BOB_PASSWORD).decode()
        pop.quit()
        return refused, list(caps), ok

    refused, caps, ok = await asyncio.to_thread(run)
    assert refused == R.POP3_PLAINTEXT_DISALLOWED
    assert "STLS" in caps and "USER" not in caps
    assert ok.startswith("+OK")


async def test_pop3_auth_plain(service) -> None:  # type: ignore[no-untyped-def]
    def run() -> list[bytes]:
        raw = raw_connect(service.ports["pop3"])
        raw.line()
        token = base64.b64encode(f"\0{BOB}\0{BOB_PASSWORD}".encode())
        raw.send(b"AUTH PLAIN " + token + b"\r\n")
        first = raw.line()
        raw.send(b"AUTH PLAIN\r\n")
        return [first, raw.line()]

    lines = await asyncio.to_thread(run)
    assert lines[0].startswith(b"+OK")
    assert lines[1] == b"-ERR Unknown command"  # already logged in


async def test_pop3_retr_dele_quit_removes_message(service) -> None:  # type: ignore[no-untyped-def]
    await service.deliver(simple_message("One", body="Hello\r\n.leading dot\r\n"))
    await service.deliver(simple_message("Two"))

    def pop_session() -> dict[str, object]:
        pop = SourcePOP3(service.ports["pop3"])
        pop.user(BOB)
        pop.pass_(BOB_PASSWORD)
        out: dict[str, object] = {"stat": pop.stat(), "list": pop.list()[1], "uidl": pop.uidl()[1]}
        out["retr"] = pop.retr(1)[1]
        out["top"] = pop.top(2, 0)[1]
        out["dele"] = pop.dele(1)
        out["stat_after"] = pop.stat()
        out["quit"] = pop.quit()
        return out

    out = await asyncio.to_thread(pop_session)
    assert out["stat"] == (2, len(simple_message("One", body="Hello\r\n.leading dot\r\n")) + len(simple_message("Two")))
    retr = out["retr"]
    assert isinstance(retr, list) and b".leading dot" in retr and retr[-1] == b".leading dot"
    top = out["top"]
    assert isinstance(top, list) and b"Subject: Two" in top and top[-1] == b""
    uidl = out["uidl"]
    assert isinstance(uidl, list) and len(uidl) == 2
    assert out["stat_after"][0] == 1  # type: ignore[index]
    assert out["quit"] == R.POP3_BYE.encode()

    def imap_session() -> list[bytes]:
        imap = imaplib.IMAP4("127.0.0.1", service.ports["imap"], timeout=10)
        imap.login(BOB, BOB_PASSWORD)
        imap.select("INBOX")
        _, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        imap.logout()
        return [d[1] for d in data if isinstance(d, tuple)]

    assert await asyncio.to_thread(imap_session) == [b"Subject: Two\r\n\r\n"]


async def test_r_ips_4_pop3_blocked_ip_refused(service) -> None:  # type: ignore[no-untyped-def]
    def run() -> bytes:
        return raw_connect(service.ports["pop3"], BLOCKED_IP).line()

    assert await asyncio.to_thread(run) == f"-ERR {BLOCKED_TEXT}".encode()


async def test_pop3_auth_service_down_gives_temporary_failure(start_service) -> None:  # type: ignore[no-untyped-def]
    service = await start_service(auth_up=False)
    assert await asyncio.to_thread(attempt, service.ports["pop3"], BOB, BOB_PASSWORD) == R.POP3_TEMPFAIL


async def test_pop3s_implicit_tls(service) -> None:  # type: ignore[no-untyped-def]
    def run() -> bytes:
        pop = poplib.POP3_SSL("127.0.0.1", service.ports["pop3s"], context=service.client_tls(), timeout=10)
        pop.user(BOB)
        reply = pop.pass_(BOB_PASSWORD)
        pop.quit()
        return reply

    assert (await asyncio.to_thread(run)).startswith(b"+OK")
