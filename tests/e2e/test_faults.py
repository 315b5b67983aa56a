"""Fault tests (R-OPS-3): dependencies freeze while mail flows; clients get 4xx, never a 250
for a message that is then lost, and every 250 is in the mailbox once the dependency is back."""

from __future__ import annotations

import imaplib
import signal
import smtplib
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from rempart.common.testing.devstack import Stack

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mail_clients import tls_context


def send_one(stack: Stack, demo: dict[str, str], subject: str) -> int:
    try:
        with smtplib.SMTP("127.0.0.1", stack.ports["smtp-edge.submission"], timeout=30) as client:
            client.starttls(context=tls_context(stack))
            client.login(demo["user"], demo["user_password"])
            client.mail(demo["user"])
            code, _ = client.rcpt(demo["peer"])
            if code != 250:
                return code
            code, _ = client.data(f"Subject: {subject}\r\n\r\nfault test\r\n".encode())
            return code
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code
    except (smtplib.SMTPServerDisconnected, OSError):
        return 0  # no reply at all: the client will retry; it was never told 250


def count_in_mailbox(stack: Stack, demo: dict[str, str], tag: str) -> int:
    imap = imaplib.IMAP4_SSL("127.0.0.1", stack.ports["imap-pop.imaps"], ssl_context=tls_context(stack),
                             timeout=20)
    try:
        imap.login(demo["peer"], demo["peer_password"])
        imap.select("INBOX", readonly=True)
        typ, data = imap.search(None, "SUBJECT", tag)
        assert typ == "OK"
        return len(data[0].split())
    finally:
        imap.logout()


@pytest.mark.parametrize("dependency", ["nats", "redis"])
def test_r_ops_3_every_250_survives_a_frozen_dependency(stack: Stack, demo: dict[str, str], dependency: str) -> None:
    server = stack.nats if dependency == "nats" else stack.redis
    assert server is not None
    tag = f"fault{dependency}{uuid.uuid4().hex[:8]}"
    codes: list[int] = []
    timings: list[float] = []
    stop = threading.Event()

    def sender() -> None:
        n = 0
        while not stop.is_set() and n < 400:
            started = time.monotonic()
            codes.append(send_one(stack, demo, f"{tag} {n}"))
            timings.append(round(time.monotonic() - started, 2))
            n += 1

    thread = threading.Thread(target=sender)
    thread.start()
    time.sleep(1.0)
    server.proc.send_signal(signal.SIGSTOP)  # frozen, as in a partition or a long GC pause
    try:
        # Stay frozen until clients have felt it (a 4xx), at most 20 s.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(400 <= c < 500 for c in codes):
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        server.proc.send_signal(signal.SIGCONT)
    time.sleep(1.0)
    stop.set()
    thread.join(timeout=240)
    assert not thread.is_alive()
    stack.wait_ready()

    accepted = codes.count(250)
    assert all(code == 250 or 400 <= code < 500 or code == 0 for code in codes), codes
    assert any(400 <= code < 500 for code in codes), f"the freeze never showed as a 4xx: {codes} {timings}"
    assert accepted > 0, codes
    deadline = time.monotonic() + 30
    found = count_in_mailbox(stack, demo, tag)
    while found < accepted and time.monotonic() < deadline:
        time.sleep(0.5)
        found = count_in_mailbox(stack, demo, tag)
    # Every 250 is delivered. A 4xx whose record JetStream stored anyway may be delivered too
    # (the client retries: a duplicate, never a loss), so the mailbox may hold more.
    assert found >= accepted, f"{accepted} accepted, {found} in the mailbox: {codes}"
