"""What the policy e2e tests need beside the stack: a DNS server on a thread, SMTP clients bound
to chosen loopback source addresses, settings changes that wait until the services reloaded
them, a second policy replica, mailbox reads over POP3, and IMAP clients bound to chosen loopback
source addresses.

The DNS server is :class:`rempart.common.testing.dnsserver.LoopbackDnsServer` (real packets on
loopback) running on its own event loop in a thread, because the e2e tests are synchronous
clients; every change to its zone or mode is made on that loop.
"""

from __future__ import annotations

import asyncio
import imaplib
import json
import poplib
import smtplib
import socket
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rempart.common.testing.devstack import AdminApi, Stack
from rempart.common.testing.dnsserver import LoopbackDnsServer, Mode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mail_clients import tls_context  # also for the tests that import it from here

T = TypeVar("T")


# DNS -------------------------------------------------------------------------------------------
class DnsThread:
    """A :class:`LoopbackDnsServer` on a private event loop in a daemon thread."""

    def __init__(self, zone: dict[str, dict[str, list[str]]], ttl: int = 300) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-dns", daemon=True)
        self.thread.start()
        self.server = LoopbackDnsServer(zone, ttl=ttl, soa_minimum=30)
        self._run(self.server.start())

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def _on_loop(self, action: Callable[[], T]) -> T:
        async def call() -> T:
            return action()

        return self._run(call())

    @property
    def address(self) -> str:
        return self.server.address

    def set(self, name: str, rdtype: str, *values: str) -> None:
        self._on_loop(lambda: self.server.set(name, rdtype, *values))

    def set_mode(self, mode: Mode) -> None:
        def change() -> None:
            self.server.mode = mode

        self._on_loop(change)

    def asked(self, name: str, rdtype: str) -> int:
        return self._on_loop(lambda: self.server.asked(name, rdtype))

    def stop_serving(self) -> None:
        """Close both sockets: the port answers nothing (UDP) or refuses (TCP)."""
        self._run(self.server.stop())

    def serve_again(self) -> None:
        """Listen again on the same port (the services' nameserver setting names it)."""
        self._run(self.server.start())

    def close(self) -> None:
        try:
            self._run(self.server.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


def reverse_v4(ip: str) -> str:
    return ".".join(reversed(ip.split(".")))


# Settings ----------------------------------------------------------------------------------------
@dataclass
class SettingsWatcher:
    """Waits until services have reloaded a settings version, read from their JSON logs
    ("settings reloaded" carries ``settings_version``)."""

    log_paths: list[Path] = field(default_factory=list)

    def reloaded(self, path: Path, version: int) -> bool:
        if not path.exists():
            return False
        for line in path.read_text(errors="replace").splitlines():
            if '"settings reloaded"' not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if int(record.get("settings_version", -1)) >= version:
                return True
        return False

    def wait(self, version: int, timeout: float = 5.0) -> float:
        """Seconds until every watched service had ``version``; raises on the deadline."""
        started = time.monotonic()
        pending = list(self.log_paths)
        while pending:
            pending = [p for p in pending if not self.reloaded(p, version)]
            if not pending:
                break
            if time.monotonic() - started > timeout:
                raise AssertionError(f"settings version {version} not reloaded after {timeout}s by {pending}")
            time.sleep(0.05)
        return time.monotonic() - started


def version_of(status: int, body: object) -> int:
    assert status == 200, (status, body)
    assert isinstance(body, dict), body
    return int(body["version"])


# SMTP --------------------------------------------------------------------------------------------
def mx(stack: Stack, source_ip: str, port: int | None = None) -> smtplib.SMTP:
    """An SMTP session to the MX listener from ``source_ip``, greeted and EHLO done."""
    client = smtplib.SMTP("127.0.0.1", port or stack.ports["smtp-edge.smtp"], timeout=20,
                          source_address=(source_ip, 0))
    code, text = client.ehlo("client.sender.test")
    assert code == 250, (code, text)
    return client


def reply(code: int, text: bytes | str) -> str:
    return f"{code} {text.decode(errors='replace') if isinstance(text, bytes) else text}"


def rcpt_reply(client: smtplib.SMTP, recipient: str) -> str:
    """RCPT with the address sent exactly as given (smtplib adds the brackets)."""
    return reply(*client.rcpt(recipient))


def raw_command(client: smtplib.SMTP, line: str) -> str:
    client.putcmd(line)
    return reply(*client.getreply())


def data_reply(client: smtplib.SMTP, message: bytes) -> str:
    try:
        return reply(*client.data(message))
    except smtplib.SMTPDataError as exc:
        return reply(exc.smtp_code, exc.smtp_error)


def quit_quietly(client: smtplib.SMTP) -> None:
    try:
        client.quit()
    except (smtplib.SMTPException, OSError):
        client.close()


def submission(stack: Stack, user: str, password: str) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", stack.ports["smtp-edge.submission"], timeout=20)
    client.starttls(context=tls_context(stack))
    client.login(user, password)
    return client


def message(subject: str, sender: str, to: str, extra_headers: str = "", body: str = "Hello.\r\n") -> bytes:
    return f"{extra_headers}From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n\r\n{body}".encode()


# IMAP --------------------------------------------------------------------------------------------
class SourcedImap(imaplib.IMAP4_SSL):
    """imaplib over implicit TLS (IMAPS) from a chosen loopback source address, which imaplib
    itself cannot bind: intrusion prevention counts per client IP."""

    def __init__(self, stack: Stack, source_ip: str) -> None:
        self.source_ip = source_ip
        super().__init__("127.0.0.1", stack.ports["imap-pop.imaps"], ssl_context=tls_context(stack), timeout=20)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self.source_ip, 0))
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


def logout_quietly(client: imaplib.IMAP4) -> None:
    try:
        client.logout()
    except (imaplib.IMAP4.error, OSError):
        client.shutdown()


# Mailboxes ---------------------------------------------------------------------------------------
def pop3_messages(stack: Stack, user: str, password: str) -> list[bytes]:
    """Every message in ``user``'s INBOX, read over POP3 with STLS (left in place)."""
    pop = poplib.POP3("127.0.0.1", stack.ports["imap-pop.pop3"], timeout=20)
    try:
        pop.stls(context=tls_context(stack))
        pop.user(user)
        pop.pass_(password)
        count, _ = pop.stat()
        out = []
        for n in range(1, count + 1):
            _, lines, _ = pop.retr(n)
            out.append(b"\r\n".join(lines))
        return out
    finally:
        try:
            pop.quit()
        except (poplib.error_proto, OSError):
            pop.close()


def wait_for_message(stack: Stack, user: str, password: str, marker: str, timeout: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout
    seen = 0
    while True:
        messages = pop3_messages(stack, user, password)
        seen = len(messages)
        for raw in messages:
            if marker.encode() in raw:
                return raw
        if time.monotonic() > deadline:
            raise AssertionError(f"no message with {marker!r} in {user}'s mailbox after {timeout}s ({seen} there)")
        time.sleep(0.2)


def header_section(raw: bytes) -> str:
    return raw.split(b"\r\n\r\n", 1)[0].decode(errors="replace")


def admin_for(stack: Stack) -> AdminApi:
    api = AdminApi(f"http://127.0.0.1:{stack.ports['admin-api.http']}")
    api.login(stack.admin_email, stack.admin_password)
    return api
