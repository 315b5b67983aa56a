"""The walking skeleton, end to end through all five services (issue 2, point 4).

An account sends on the submission port (STARTTLS, AUTH PLAIN); the edge asks auth and policy
over gRPC, stores durably, publishes an event; the other account reads the message over POP3
(STLS) and IMAP (STARTTLS). Each dependency stopped turns the 250 into a 4xx.
"""

from __future__ import annotations

import imaplib
import poplib
import shutil
import smtplib
import ssl
import subprocess
import uuid

import pytest

from rempart.common.testing.devstack import AdminApi, Stack
from rempart.common.testing.polling import wait_until


def tls_context(stack: Stack) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=stack.cert_file)
    ctx.check_hostname = False
    return ctx


def submit(stack: Stack, user: str, password: str, to: str, subject: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", stack.ports["smtp-edge.submission"], timeout=20) as client:
        client.starttls(context=tls_context(stack))
        client.login(user, password)
        client.mail(user)
        code, text = client.rcpt(to)
        if code != 250:
            return code, text
        try:
            return client.data(f"From: {user}\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nHello over Rempart.\r\n".encode())
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error


def test_r_ops_3_submission_to_pop3_and_imap(stack: Stack, demo: dict[str, str]) -> None:
    subject = f"pop-{uuid.uuid4().hex[:8]}"
    code, text = submit(stack, demo["user"], demo["user_password"], demo["peer"], subject)
    assert code == 250, text
    assert text.startswith(b"2.0.0 Ok: queued as ")

    # POP3 with STLS, USER/PASS, RETR, DELE.
    pop = poplib.POP3("127.0.0.1", stack.ports["imap-pop.pop3"], timeout=20)
    pop.stls(context=tls_context(stack))
    pop.user(demo["peer"])
    pop.pass_(demo["peer_password"])
    count, _ = pop.stat()
    assert count >= 1
    found = None
    for n in range(1, count + 1):
        _, lines, _ = pop.retr(n)
        if f"Subject: {subject}".encode() in lines:
            found = n
            assert any(line.startswith(b"Received: from ") for line in lines)
    assert found is not None
    pop.dele(found)
    pop.quit()

    # IMAP with STARTTLS, LOGIN, SELECT, FETCH, STORE \Deleted, EXPUNGE.
    subject2 = f"imap-{uuid.uuid4().hex[:8]}"
    code, _ = submit(stack, demo["user"], demo["user_password"], demo["peer"], subject2)
    assert code == 250
    imap = imaplib.IMAP4("127.0.0.1", stack.ports["imap-pop.imap"], timeout=20)
    imap.starttls(ssl_context=tls_context(stack))
    imap.login(demo["peer"], demo["peer_password"])
    typ, data = imap.select("INBOX")
    assert typ == "OK"
    typ, data = imap.search(None, "ALL")
    numbers = data[0].split()
    subjects = {}
    for num in numbers:
        typ, fetched = imap.fetch(num, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        subjects[num] = fetched[0][1]
    assert not any(subject.encode() in v for v in subjects.values()), "POP3 DELE must remove the message"
    target = next(num for num, v in subjects.items() if subject2.encode() in v)
    typ, fetched = imap.fetch(target, "(RFC822)")
    assert b"Hello over Rempart." in fetched[0][1]
    assert imap.store(target, "+FLAGS", "\\Deleted")[0] == "OK"
    assert imap.expunge()[0] == "OK"
    typ, data = imap.search(None, "ALL")
    assert len(data[0].split()) == len(numbers) - 1
    imap.logout()


def test_r_log_4_wrong_password_refused_and_reported(stack: Stack, demo: dict[str, str], admin: AdminApi) -> None:
    with smtplib.SMTP("127.0.0.1", stack.ports["smtp-edge.submission"], timeout=20) as client:
        client.starttls(context=tls_context(stack))
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            client.login(demo["user"], "not-the-password")
    assert info.value.smtp_code == 535

    def failure_event() -> bool:
        status, body = admin.call("GET", "/v1/events?area=auth&limit=50")
        assert status == 200, body
        items = body if isinstance(body, list) else body.get("events", body.get("items", []))  # type: ignore[union-attr]
        return any(e.get("what") == "login_failed" and e.get("account", "") in (demo["user"], "") for e in items)

    wait_until(failure_event, what="a login_failed event in GET /v1/events")


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed (Debian package swaks)")
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_r_tls_1_swaks_submission(stack: Stack, demo: dict[str, str], mechanism: str) -> None:
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{stack.ports['smtp-edge.submission']}", "--tls",
         "--auth", mechanism, "--auth-user", demo["user"], "--auth-password", demo["user_password"],
         "--from", demo["user"], "--to", demo["peer"], "--header", "Subject: via swaks"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<~  250 2.0.0 Ok: queued as" in result.stdout


@pytest.mark.parametrize("service", ["policy", "auth"])
def test_r_ops_3_a_stopped_service_means_4xx_never_250(stack: Stack, demo: dict[str, str], service: str) -> None:
    stack.stop_service(service)
    try:
        try:
            code, text = submit(stack, demo["user"], demo["user_password"], demo["peer"], "while down")
        except smtplib.SMTPResponseException as exc:
            code, text = exc.smtp_code, exc.smtp_error
        except smtplib.SMTPServerDisconnected as exc:
            raise AssertionError(f"closed without a 4xx reply: {exc}") from exc
        assert 400 <= code < 500, (code, text)
    finally:
        stack.start_service(service)
        stack.wait_ready()


def test_r_ops_3_nats_down_means_451_then_nothing_lost(stack: Stack, demo: dict[str, str]) -> None:
    assert stack.nats is not None
    stack.nats.proc.send_signal(19)  # SIGSTOP: JetStream stops answering, as in a partition
    try:
        code, text = submit(stack, demo["user"], demo["user_password"], demo["peer"], "nats down")
        assert code == 451, (code, text)
    finally:
        stack.nats.proc.send_signal(18)  # SIGCONT
    stack.wait_ready()
    code, _ = submit(stack, demo["user"], demo["user_password"], demo["peer"], "nats back")
    assert code == 250
