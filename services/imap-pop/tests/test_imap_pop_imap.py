"""IMAP driven by imaplib (and raw sockets for what imaplib will not send)."""

from __future__ import annotations

import asyncio
import imaplib
import ssl

import pytest
from imappop_helpers import (
    BLOCKED_IP,
    BLOCKED_TEXT,
    BOB,
    BOB_PASSWORD,
    UNTRUSTED_IP,
    Raw,
    SourceIMAP,
    error_text,
    raw_connect,
    simple_message,
)

from rempart.common.pb.policy.v1 import policy_pb2
from rempart.common.testing.polling import eventually
from rempart.imap_pop import replies as R
from rempart.imap_pop.listeners import ImapPopServer

pytestmark = pytest.mark.timeout(60)


def raw_login(port: int) -> Raw:
    raw = raw_connect(port)
    raw.line()
    raw.send(f'a LOGIN {BOB} "{BOB_PASSWORD}"\r\n'.encode())
    assert raw.until(b"a ")[-1].startswith(b"a OK")
    return raw


def login(port: int) -> imaplib.IMAP4:
    imap = SourceIMAP(port)
    imap.login(BOB, BOB_PASSWORD)
    return imap


async def test_greeting_capabilities_and_login(service) -> None:  # type: ignore[no-untyped-def]
    def run() -> tuple[bytes, tuple[str, ...], str]:
        imap = SourceIMAP(service.ports["imap"])
        welcome = imap.welcome
        caps = imap.capabilities
        typ, _ = imap.login(BOB, BOB_PASSWORD)
        imap.logout()
        return welcome, caps, typ

    welcome, caps, typ = await asyncio.to_thread(run)
    assert welcome.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    assert welcome.endswith(R.IMAP_GREETING.encode())
    assert "STARTTLS" in caps and "IDLE" in caps and "LOGINDISABLED" not in caps
    assert typ == "OK"
    request = service.auth.requests[-1]
    assert (request.protocol, request.mechanism, request.client_ip, request.tls) == ("imap", "LOGIN", "127.0.0.1", False)
    assert request.session_id


async def test_r_log_4_failed_login_same_reply_for_unknown_user(service) -> None:  # type: ignore[no-untyped-def]
    def attempt(user: str, password: str) -> str:
        imap = SourceIMAP(service.ports["imap"])
        try:
            imap.login(user, password)
        except imaplib.IMAP4.error as exc:
            return error_text(exc)
        finally:
            imap.shutdown()
        return "OK"

    wrong = await asyncio.to_thread(attempt, BOB, "wrong")
    unknown = await asyncio.to_thread(attempt, "nobody@example.org", "wrong")
    locked = await asyncio.to_thread(attempt, "locked@example.org", "whatever")
    assert wrong == unknown == locked == "[AUTHENTICATIONFAILED] Authentication failed."
    auth_checks = [r for r in service.policy.requests if r.stage == policy_pb2.STAGE_AUTH]
    assert [r.auth_login for r in auth_checks] == [BOB, "nobody@example.org", "locked@example.org"]
    assert all(not r.auth_success and r.session.protocol == policy_pb2.PROTOCOL_IMAP for r in auth_checks)


async def test_r_tls_2_plaintext_login_refused_before_starttls(service) -> None:  # type: ignore[no-untyped-def]
    def run() -> tuple[tuple[str, ...], str, tuple[str, ...], str]:
        imap = SourceIMAP(service.ports["imap"], source=UNTRUSTED_IP)
        before = imap.capabilities
        try:
            imap.login(BOB, BOB_PASSWORD)
            refused = "logged in"
        except imaplib.IMAP4.error as exc:
            refused = error_text(exc)
        imap.starttls(service.client_tls())
        after = imap.capabilities
        typ, _ = imap.login(BOB, BOB_PASSWORD)
        imap.logout()
        return before, refused, after, typ

    before, refused, after, typ = await asyncio.to_thread(run)
    assert "LOGINDISABLED" in before and "STARTTLS" in before and "AUTH=PLAIN" not in before
    assert refused.startswith("[PRIVACYREQUIRED]")
    assert "LOGINDISABLED" not in after and "STARTTLS" not in after
    assert typ == "OK"
    assert service.auth.requests[-1].tls is True


async def test_r_tls_2_authenticate_plain_refused_before_tls(service) -> None:  # type: ignore[no-untyped-def]
    def run() -> list[bytes]:
        raw = raw_connect(service.ports["imap"], UNTRUSTED_IP)
        raw.line()
        raw.send(b"a AUTHENTICATE PLAIN AGJvYkBleGFtcGxlLm9yZwBjb3JyZWN0IGhvcnNlIDkh\r\n")
        return raw.until(b"a ")

    lines = await asyncio.to_thread(run)
    assert lines[-1].startswith(b"a NO [PRIVACYREQUIRED]")
    assert not service.auth.requests


async def test_authenticate_plain_with_sasl_ir_and_continuation(service) -> None:  # type: ignore[no-untyped-def]
    def run() -> tuple[list[bytes], list[bytes]]:
        raw = raw_connect(service.ports["imap"])
        raw.line()
        token = b"AGJvYkBleGFtcGxlLm9yZwBjb3JyZWN0IGhvcnNlIDkh"
        raw.send(b"a AUTHENTICATE PLAIN " + token + b"\r\n")
        first = raw.until(b"a ")
        raw2 = raw_connect(service.ports["imap"])
        raw2.line()
        raw2.send(b"b AUTHENTICATE PLAIN\r\n")
        assert raw2.line().startswith(b"+")
        raw2.send(token + b"\r\n")
        return first, raw2.until(b"b ")

    first, second = await asyncio.to_thread(run)
    assert first[-1].startswith(b"a OK")
    assert second[-1].startswith(b"b OK")


async def test_fetch_store_expunge(service) -> None:  # type: ignore[no-untyped-def]
    await service.deliver(simple_message("First"))
    await service.deliver(simple_message("Second", body="Line one\r\n.dot line\r\n"))

    def run() -> dict[str, object]:
        imap = login(service.ports["imap"])
        out: dict[str, object] = {}
        _, data = imap.select("INBOX")
        out["exists"] = data
        out["uidvalidity"] = imap.untagged_responses.get("UIDVALIDITY")
        _, data = imap.fetch("1:*", "(UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE BODYSTRUCTURE)")
        out["meta"] = data
        _, data = imap.fetch("2", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        out["subject"] = data[0][1]
        _, data = imap.fetch("2", "(BODY.PEEK[TEXT]<0.8>)")
        out["partial"] = data[0]
        _, data = imap.fetch("1", "(BODY[])")
        out["body"] = data
        _, data = imap.fetch("1", "(FLAGS)")
        out["seen"] = data
        _, data = imap.uid("FETCH", "1:*", "(RFC822.HEADER)")
        out["uidfetch"] = data
        _, data = imap.store("1", "+FLAGS", "(\\Deleted)")
        out["store"] = data
        _, data = imap.search(None, "DELETED")
        out["deleted"] = data
        _, data = imap.search(None, "UNSEEN")
        out["unseen"] = data
        _, data = imap.search(None, "SUBJECT", "Second")
        out["subject_search"] = data
        _, data = imap.expunge()
        out["expunge"] = data
        _typ, data = imap.fetch("1:*", "(UID)")
        out["left"] = data
        imap.logout()
        return out

    out = await asyncio.to_thread(run)
    assert out["exists"] == [b"2"]
    meta = out["meta"]
    assert isinstance(meta, list)
    assert b"UID 1 FLAGS (\\Recent) RFC822.SIZE" in meta[0]  # the first session to see it
    assert b'ENVELOPE ("Sat, 28 Nov 2026 10:00:00 +0000" "First" (("Alice" NIL "alice" "example.net"))' in meta[0]
    assert b'BODYSTRUCTURE ("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" 23 2 NIL NIL NIL NIL)' in meta[0]
    assert out["subject"] == b"Subject: Second\r\n\r\n"
    partial = out["partial"]
    assert isinstance(partial, tuple) and partial[1] == b"Line one" and b"BODY[TEXT]<0>" in partial[0]
    body = out["body"]
    assert isinstance(body, list) and body[0][1] == simple_message("First")
    assert b"\\Seen" in str(out["seen"]).encode()
    assert out["store"] == [b"1 (FLAGS (\\Deleted \\Recent \\Seen))"]
    assert out["deleted"] == [b"1"]
    assert out["unseen"] == [b"2"]
    assert out["subject_search"] == [b"2"]
    assert out["expunge"] == [b"1"]
    assert out["left"] == [b"1 (UID 2)"]


async def test_message_still_readable_after_its_flags_change_in_the_session(service) -> None:  # type: ignore[no-untyped-def]
    # A small message lives inside its delivery record; a flag change (STORE, or the \\Seen of a
    # FETCH BODY[]) must keep where it is, or the next read of it in that session fails.
    await service.deliver(simple_message("Kept"))

    def run() -> tuple[list[object], list[object], list[object]]:
        imap = login(service.ports["imap"])
        imap.select("INBOX")
        _, first = imap.fetch("1", "(BODY[])")
        imap.store("1", "+FLAGS", "(\\Flagged)")
        typ, second = imap.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK", second
        typ, third = imap.fetch("1", "(BODY.PEEK[TEXT])")
        assert typ == "OK", third
        imap.logout()
        return first, second, third

    first, second, third = await asyncio.to_thread(run)
    assert isinstance(first[0], tuple) and first[0][1] == simple_message("Kept")
    assert isinstance(second[0], tuple) and second[0][1] == simple_message("Kept")
    assert isinstance(third[0], tuple) and third[0][1].startswith(b"Hi Bob")


async def test_list_create_status_append_copy_move_delete(service) -> None:  # type: ignore[no-untyped-def]
    await service.deliver(simple_message("Keep"))

    def run() -> dict[str, object]:
        imap = login(service.ports["imap"])
        out: dict[str, object] = {}
        out["create"] = imap.create("Archive")[0]
        out["list"] = imap.list()[1]
        out["append"] = imap.append("Archive", "(\\Seen)", None, simple_message("Appended"))
        out["append_missing"] = imap.append("Nope", None, None, simple_message("x"))[0]
        out["status"] = imap.status("Archive", "(MESSAGES UNSEEN UIDNEXT)")[1]
        imap.select("INBOX")
        out["copy"] = imap.copy("1", "Archive")
        out["move"] = imap._simple_command("MOVE", "1", "Archive")
        out["move_untagged"] = imap.untagged_responses.pop("EXPUNGE", None)
        out["inbox_after"] = imap.status("INBOX", "(MESSAGES)")[1]
        out["delete_full"] = imap.delete("Archive")[0]
        out["status_gone"] = imap.status("Archive", "(MESSAGES)")[0]
        out["delete_inbox"] = imap.delete("INBOX")[0]
        imap.logout()
        return out

    out = await asyncio.to_thread(run)
    assert out["create"] == "OK"
    assert b'(\\HasNoChildren) "/" "Archive"' in out["list"]  # type: ignore[operator]
    assert b'(\\HasNoChildren \\Trash) "/" "Trash"' in out["list"]  # type: ignore[operator]
    append = out["append"]
    assert isinstance(append, tuple) and append[0] == "OK" and b"[APPENDUID " in append[1][0]
    assert out["append_missing"] == "NO"
    assert out["status"] == [b'"Archive" (MESSAGES 1 UNSEEN 0 UIDNEXT 2)']
    copy = out["copy"]
    assert isinstance(copy, tuple) and copy[0] == "OK" and b"[COPYUID " in copy[1][-1]
    assert out["move_untagged"] == [b"1"]
    assert out["inbox_after"] == [b'"INBOX" (MESSAGES 0)']
    assert out["delete_full"] == "OK"  # RFC 3501 6.3.4: a mailbox goes with its messages
    assert out["status_gone"] == "NO"
    assert out["delete_inbox"] == "NO"


async def test_append_with_literal_plus(service) -> None:  # type: ignore[no-untyped-def]
    message = simple_message("Plus")

    def run() -> list[bytes]:
        raw = raw_connect(service.ports["imap"])
        raw.line()
        raw.send(b'a LOGIN {15+}\r\n' + BOB.encode() + b' "correct horse 9!"\r\n')
        raw.until(b"a ")
        raw.send(b"b APPEND INBOX (\\Flagged) {%d+}\r\n" % len(message) + message + b"\r\n")
        return raw.until(b"b ")

    lines = await asyncio.to_thread(run)
    assert lines[-1].startswith(b"b OK [APPENDUID ")
    messages = await service.backend.index.messages(BOB)
    assert [sorted(m.flags) for m in messages] == [["\\Flagged"]]
    assert await service.backend.store.read_message(messages[0]) == message


@pytest.mark.parametrize("announced", [True, False], ids=["event", "poll-fallback"])
async def test_idle_sees_new_message(service, announced: bool) -> None:  # type: ignore[no-untyped-def]
    def start_idle() -> object:
        raw = raw_connect(service.ports["imap"])
        raw.line()
        raw.send(f'a LOGIN {BOB} "{BOB_PASSWORD}"\r\n'.encode())
        raw.until(b"a ")
        raw.send(b"b SELECT INBOX\r\n")
        raw.until(b"b ")
        raw.send(b"c IDLE\r\n")
        assert raw.line().startswith(b"+ ")
        return raw

    raw = await asyncio.to_thread(start_idle)
    await service.deliver(simple_message("During idle"), publish=announced)
    line = await asyncio.to_thread(raw.line)  # type: ignore[attr-defined]
    assert line == b"* 1 EXISTS"
    raw.send(b"DONE\r\n")  # type: ignore[attr-defined]
    done = await asyncio.to_thread(raw.until, b"c ")  # type: ignore[attr-defined]
    assert done[-1] == b"c OK IDLE terminated"


async def test_oversize_literal_refused(service) -> None:  # type: ignore[no-untyped-def]
    def run() -> tuple[list[bytes], list[bytes], list[bytes], bool]:
        raw = raw_connect(service.ports["imap"])
        raw.line()
        raw.send(b"a LOGIN {999999}\r\n")
        sync = raw.until(b"a ")
        raw.send(b"b NOOP " + b"x" * 9000 + b"\r\nc NOOP\r\n")
        long_line = raw.until(b"c ")
        raw.send(b"d LOGIN {999999+}\r\n")
        nonsync = [raw.line(), raw.line()]
        return sync, long_line, nonsync, raw.closed()

    sync, long_line, nonsync, closed = await asyncio.to_thread(run)
    assert sync == [b"a " + R.IMAP_LITERAL_TOO_LARGE.encode()]
    assert long_line == [R.IMAP_LINE_TOO_LONG.encode(), b"c OK NOOP completed"]
    assert nonsync == [b"d " + R.IMAP_LITERAL_TOO_LARGE.encode(), R.IMAP_BYE_DESYNC.encode()]
    assert closed


async def test_too_many_invalid_commands_closes(service) -> None:  # type: ignore[no-untyped-def]
    def run() -> tuple[list[bytes], bool]:
        raw = raw_connect(service.ports["imap"])
        raw.line()
        raw.send(b"".join(b"x%d BOGUS\r\n" % i for i in range(10)))
        lines = raw.until(b"* BYE")
        return lines, raw.closed()

    lines, closed = await asyncio.to_thread(run)
    assert lines[-1] == R.IMAP_BYE_TOO_MANY_BAD.encode()
    assert lines[0] == b"x0 BAD Unknown command or wrong state"
    assert closed


async def test_starttls_discards_pipelined_plaintext(service) -> None:  # type: ignore[no-untyped-def]
    """CVE-2011-0411: a command sent in plaintext after STARTTLS must not run inside TLS."""

    def run() -> list[bytes]:
        raw = raw_connect(service.ports["imap"], UNTRUSTED_IP)
        raw.line()
        raw.send(b"a STARTTLS\r\nb CAPABILITY\r\n")
        assert raw.line() == b"a OK Begin TLS negotiation now"
        tls = service.client_tls().wrap_socket(raw.sock, server_hostname="localhost")
        raw.sock, raw.buf = tls, b""
        raw.send(b"c NOOP\r\n")
        return raw.until(b"c ")

    lines = await asyncio.to_thread(run)
    assert lines == [b"c OK NOOP completed"]


async def test_r_ips_4_blocked_ip_refused_at_greeting(service) -> None:  # type: ignore[no-untyped-def]
    def run() -> tuple[bytes, bool]:
        raw = raw_connect(service.ports["imap"], BLOCKED_IP)
        return raw.line(), raw.closed()

    line, closed = await asyncio.to_thread(run)
    assert line == f"* BYE {BLOCKED_TEXT}".encode()
    assert closed


async def test_auth_service_down_gives_temporary_failure(start_service) -> None:  # type: ignore[no-untyped-def]
    service = await start_service(auth_up=False)

    def run() -> str:
        imap = SourceIMAP(service.ports["imap"])
        try:
            imap.login(BOB, BOB_PASSWORD)
        except imaplib.IMAP4.error as exc:
            return error_text(exc)
        finally:
            imap.shutdown()
        return "logged in"

    assert await asyncio.to_thread(run) == "[UNAVAILABLE] Temporary failure, try later"


async def test_policy_down_closes_with_tempfail(start_service) -> None:  # type: ignore[no-untyped-def]
    from rempart.common.testing.localstack import free_port

    service = await start_service(policy_target=f"127.0.0.1:{free_port()}")

    def run() -> bytes:
        return raw_connect(service.ports["imap"]).line()

    assert await asyncio.to_thread(run) == R.IMAP_BYE_TEMPFAIL.encode()


async def test_implicit_tls_imaps(service) -> None:  # type: ignore[no-untyped-def]
    def run() -> tuple[tuple[str, ...], str]:
        imap = imaplib.IMAP4_SSL("127.0.0.1", service.ports["imaps"], ssl_context=service.client_tls(), timeout=10)
        caps = imap.capabilities
        typ, _ = imap.login(BOB, BOB_PASSWORD)
        imap.logout()
        return caps, typ

    caps, typ = await asyncio.to_thread(run)
    assert "STARTTLS" not in caps and "AUTH=PLAIN" in caps
    assert typ == "OK"


async def test_implicit_tls_when_the_hello_arrives_before_the_session_starts(
    start_service, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    # On a busy replica the session task may run after the client's TLS hello has arrived: the
    # hello must still reach TLS (it used to be dropped as early plaintext, and the handshake
    # stalled until its timeout).
    late = ImapPopServer._handle

    async def late_handle(self: ImapPopServer, *args: object) -> None:
        await asyncio.sleep(0.2)
        await late(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(ImapPopServer, "_handle", late_handle)
    service = await start_service(tls_handshake_timeout_seconds=2.0)

    def run() -> str:
        imap = imaplib.IMAP4_SSL("127.0.0.1", service.ports["imaps"], ssl_context=service.client_tls(), timeout=10)
        greeting = imap.welcome.decode()
        imap.logout()
        return greeting

    assert R.IMAP_GREETING in await asyncio.to_thread(run)


async def test_drain_says_bye_to_waiting_clients(start_service) -> None:  # type: ignore[no-untyped-def]
    service = await start_service()
    raw = await asyncio.to_thread(raw_connect, service.ports["imap"])
    await asyncio.to_thread(raw.line)
    await eventually(lambda: any(s.waiting_for_command for s in service.server._sessions), timeout=5,
                     what="the session to wait for a command")
    await service.server.drain(2.0)
    assert await asyncio.to_thread(raw.line) == R.IMAP_BYE_SHUTDOWN.encode()


async def test_openssl_s_client_starttls_imap(service) -> None:  # type: ignore[no-untyped-def]
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-starttls", "imap", "-connect", f"127.0.0.1:{service.ports['imap']}",
        "-CAfile", service.cert_file, "-verify_return_error", "-quiet", "-ign_eof",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(b"z LOGOUT\r\n"), 15)
    assert b"z OK LOGOUT completed" in out


__all__ = ["ssl"]


async def test_r_tls_2_trusted_hosts_and_option_come_from_settings_store(service, redis) -> None:  # type: ignore[no-untyped-def]
    from rempart.common.config import SettingsStore

    store = SettingsStore(redis)

    def try_login(source: str) -> str:
        imap = SourceIMAP(service.ports["imap"], source)
        try:
            return imap.login(BOB, BOB_PASSWORD)[0]
        except imaplib.IMAP4.error as exc:
            return error_text(exc)
        finally:
            imap.shutdown()

    await store.put_doc("server", {"relay": {"trusted_hosts": ["127.0.0.0/30"]}})
    await service.backend.config.refresh()
    assert await asyncio.to_thread(try_login, UNTRUSTED_IP) == "OK"
    await store.put_doc("server", {"relay": {"trusted_hosts": []}})
    await service.backend.config.refresh()
    assert (await asyncio.to_thread(try_login, "127.0.0.1")).startswith("[PRIVACYREQUIRED]")
    await store.put_doc("server", {"relay": {"trusted_hosts": []}, "tls": {"plaintext_auth_requires_tls": False}})
    await service.backend.config.refresh()
    assert await asyncio.to_thread(try_login, "127.0.0.1") == "OK"


async def test_r_mbx_3_two_clients_adding_flags_at_once_both_keep_theirs(service) -> None:  # type: ignore[no-untyped-def]
    await service.deliver(simple_message("Shared"))

    def run() -> tuple[list[bytes], list[bytes], list[bytes], list[bytes]]:
        first, second = raw_login(service.ports["imap"]), raw_login(service.ports["imap"])
        try:
            for client in (first, second):
                client.send(b"s SELECT INBOX\r\n")
                client.until(b"s ")
            # Both sessions hold the same stale view; each adds its own flag.
            first.send(b"a STORE 1 +FLAGS (\\Flagged)\r\n")
            first_reply = first.until(b"a ")
            second.send(b"b STORE 1 +FLAGS ($Work)\r\n")
            second_reply = second.until(b"b ")
            second.send(b"c STORE 1 -FLAGS ($Work)\r\n")
            removed = second.until(b"c ")
            first.send(b"d FETCH 1 FLAGS\r\n")
            return first_reply, second_reply, removed, first.until(b"d ")
        finally:
            first.sock.close()
            second.sock.close()

    first_reply, second_reply, removed, final = await asyncio.to_thread(run)
    # The first client selected first: the message is \Recent for it only (RFC 3501 2.3.2).
    assert first_reply == [b"* 1 FETCH (FLAGS (\\Flagged \\Recent))", b"a OK STORE completed"]
    # The second client's answer shows the first one's flag too (RFC 3501 6.4.6: the flags after).
    assert second_reply == [b"* 1 FETCH (FLAGS ($Work \\Flagged))", b"b OK STORE completed"]
    assert removed == [b"* 1 FETCH (FLAGS (\\Flagged))", b"c OK STORE completed"]
    assert final[-2:] == [b"* 1 FETCH (FLAGS (\\Flagged \\Recent))", b"d OK FETCH completed"]


async def test_r_mbx_3_concurrent_flag_storms_lose_nothing(service) -> None:  # type: ignore[no-untyped-def]
    await service.deliver(simple_message("Storm"))

    def add_many(prefix: str) -> None:
        client = raw_login(service.ports["imap"])
        client.send(b"s SELECT INBOX\r\n")
        client.until(b"s ")
        for n in range(20):
            client.send(f"t{n} STORE 1 +FLAGS.SILENT ({prefix}{n})\r\n".encode())
            assert client.until(f"t{n} ".encode())[-1].startswith(f"t{n} OK".encode())
        client.sock.close()

    await asyncio.gather(*(asyncio.to_thread(add_many, p) for p in ("$a", "$b")))
    [message] = await service.backend.index.messages(BOB, "INBOX")
    assert message.flags == {f"{p}{n}" for p in ("$a", "$b") for n in range(20)}


async def test_r_mbx_7_append_keeps_the_client_date_and_copy_keeps_it_too(service) -> None:  # type: ignore[no-untyped-def]
    def run() -> tuple[list[bytes], list[bytes], list[bytes]]:
        client = raw_login(service.ports["imap"])
        message = simple_message("Dated")
        client.send(b'p APPEND INBOX (\\Seen) " 5-Nov-2024 09:08:07 +0200" {%d+}\r\n' % len(message) + message + b"\r\n")
        appended = client.until(b"p ")
        client.send(b"q SELECT INBOX\r\nr COPY 1 INBOX\r\nr2 NOOP\r\ns FETCH 1:2 INTERNALDATE\r\n")
        client.until(b"r2 ")
        dates = client.until(b"s ")
        client.send(b't APPEND INBOX "31-Feb-2024 09:08:07 +0200" {1+}\r\nx\r\n')
        bad = client.until(b"t ")
        client.sock.close()
        return appended, dates, bad

    appended, dates, bad = await asyncio.to_thread(run)
    assert appended[-1].startswith(b"p OK [APPENDUID ")
    # Kept as the instant it names, shown in UTC: 09:08:07 at +0200 is 07:08:07 +0000.
    assert dates[:2] == [b'* 1 FETCH (INTERNALDATE "05-Nov-2024 07:08:07 +0000")',
                         b'* 2 FETCH (INTERNALDATE "05-Nov-2024 07:08:07 +0000")']
    assert bad[-1].startswith(b"t BAD")


async def test_idle_sends_a_keepalive_before_load_balancers_cut_it(start_service) -> None:  # type: ignore[no-untyped-def]
    service = await start_service(idle_keepalive_seconds=0.3, idle_poll_seconds=0.1)

    def run() -> list[bytes]:
        client = raw_login(service.ports["imap"])
        client.send(b"s SELECT INBOX\r\ni IDLE\r\n")
        client.until(b"+ ")
        lines = [client.line(), client.line()]
        client.send(b"DONE\r\n")
        lines += client.until(b"i ")
        client.sock.close()
        return lines

    assert await asyncio.to_thread(run) == [b"* OK Still here", b"* OK Still here", b"i OK IDLE terminated"]


async def test_a_connection_that_never_logs_in_is_cut_after_the_preauth_timeout(start_service) -> None:  # type: ignore[no-untyped-def]
    service = await start_service(preauth_timeout_seconds=0.5)

    def run() -> tuple[bytes, bytes, bool]:
        client = raw_connect(service.ports["imap"])
        greeting = client.line()
        bye = client.line()
        return greeting, bye, client.closed()

    greeting, bye, closed = await asyncio.to_thread(run)
    assert greeting.startswith(b"* OK") and bye.startswith(b"* BYE") and closed


async def test_r_mbx_7_search_finds_utf8_and_encoded_word_subjects(service) -> None:  # type: ignore[no-untyped-def]
    await service.deliver("Subject: Café au lait\r\n\r\nraw utf-8\r\n".encode())
    await service.deliver(b"Subject: =?iso-8859-1?q?Caf=E9_noir?=\r\n\r\nencoded word\r\n")
    await service.deliver(b"Subject: Cafe sans accent\r\n\r\nascii\r\n")

    def run() -> list[bytes]:
        client = raw_login(service.ports["imap"])
        client.send(b"s SELECT INBOX\r\n")
        client.until(b"s ")
        needle = "Café".encode()
        client.send(b"t SEARCH CHARSET UTF-8 SUBJECT {%d+}\r\n" % len(needle) + needle + b"\r\n")
        found = client.until(b"t ")
        client.sock.close()
        return found

    assert await asyncio.to_thread(run) == [b"* SEARCH 1 2", b"t OK SEARCH completed"]


async def test_r_tls_3_imaps_serves_the_certificate_of_the_name_asked(start_service, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import socket
    import ssl

    from cryptography import x509

    from rempart.common.tls import write_self_signed

    write_self_signed(tmp_path / "sni" / "imap.other.test", ["imap.other.test"])
    service = await start_service(tls_sni_dir=str(tmp_path / "sni"))

    def served(name: str) -> str:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", service.ports["imaps"]), 10) as raw, \
                ctx.wrap_socket(raw, server_hostname=name) as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return str(x509.load_der_x509_certificate(der).subject.rfc4514_string())

    assert await asyncio.to_thread(served, "imap.other.test") == "CN=imap.other.test"
    assert await asyncio.to_thread(served, "localhost") != "CN=imap.other.test"
