"""Logins at the three edges through the real services (issue 8, the edge kit): SASL with an
authzid, and one table of login results that SMTP, IMAP and POP3 answer alike.

Clients speak raw lines over STARTTLS/STLS from their own loopback addresses (127.0.3.x, which
no other test uses: intrusion prevention counts per IP across the session-scoped stack). No
server setting is changed; the blocks these tests cause are removed at the end.
"""

from __future__ import annotations

import base64
import signal
import socket
import ssl
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from rempart.common.sasl import Credentials, ScramClient, plain_message
from rempart.common.testing.devstack import AdminApi, Stack, strong_password
from rempart.imap_pop import replies as imap_replies
from rempart.smtp_edge import replies as smtp_replies

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mail_clients import MAX_FAILURES, intrusion_text, unblock

PROTOCOLS = ("smtp", "imap", "pop3")
PORTS = {"smtp": "smtp-edge.submission", "imap": "imap-pop.imap", "pop3": "imap-pop.pop3"}
MAX_FAILED_LOGINS = 10  # R-IPS-2 default: the eleventh failure from an IP blocks it
T = TypeVar("T")


class EdgeClient:
    """One session on an edge, inside TLS, in raw lines: what each reply was, and whether the
    server then closed the connection."""

    def __init__(self, stack: Stack, protocol: str, source_ip: str) -> None:
        self.protocol = protocol
        self.buf = b""
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            ("127.0.0.1", stack.ports[PORTS[protocol]]), 30, source_address=(source_ip, 0))
        greeting = self.line() or ""
        assert greeting.startswith(("220 ", "* OK", "+OK")), greeting
        starttls = {"smtp": "STARTTLS", "imap": "t STARTTLS", "pop3": "STLS"}[protocol]
        if protocol == "smtp":
            self.command("EHLO client.test")
        assert self.command(starttls).startswith(("220", "t OK", "+OK"))
        ctx = ssl.create_default_context(cafile=stack.cert_file)
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")
        if protocol == "smtp":
            self.command("EHLO client.test")

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\r\n")

    def line(self) -> str | None:
        while b"\r\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                chunk = b""
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line.decode(errors="replace")

    def reply(self) -> str:
        """The final line of a reply: SMTP's last line, IMAP's tagged line or continuation,
        POP3's one line. "" when the server closed instead."""
        while True:
            line = self.line()
            if line is None:
                return ""
            if self.protocol == "smtp" and line[3:4] == "-":
                continue
            if self.protocol == "imap" and line.startswith("* "):
                continue
            return line

    def command(self, line: str) -> str:
        self.send(line)
        return self.reply()

    def sasl(self, mechanism: str, initial: bytes, respond: Callable[[bytes], bytes]) -> str:
        """AUTH / AUTHENTICATE with an initial response; ``respond`` answers each challenge."""
        first = base64.b64encode(initial).decode() or "="
        reply = self.command(f"a AUTHENTICATE {mechanism} {first}" if self.protocol == "imap"
                             else f"AUTH {mechanism} {first}")
        while reply.startswith(("334 ", "+ ")) or reply in ("334", "+"):
            challenge = base64.b64decode(reply[4:] if reply.startswith("334") else reply[2:])
            reply = self.command(base64.b64encode(respond(challenge)).decode())
        return reply

    def plain(self, user: str, password: str, authzid: str = "") -> str:
        return self.sasl("PLAIN", plain_message(Credentials(user, password, authzid)), lambda _: b"")

    def closed(self) -> bool:
        """Whether the server has closed the session: a NOOP gets no answer."""
        try:
            return self.command({"smtp": "NOOP", "imap": "n NOOP", "pop3": "NOOP"}[self.protocol]) == ""
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


def outcome(protocol: str, reply: str, source_ip: str) -> str:
    """The reply in the table's words: ok, refused or tempfail; anything else as sent."""
    words = {
        "smtp": {smtp_replies.AUTH_OK: "ok", smtp_replies.AUTH_INVALID: "refused",
                 smtp_replies.AUTH_TEMPFAIL: "tempfail", f"421 4.0.0 {intrusion_text(source_ip)}": "refused"},
        "imap": {f"a {imap_replies.IMAP_AUTH_FAILED}": "refused", f"a {imap_replies.IMAP_TEMPFAIL}": "tempfail"},
        "pop3": {imap_replies.POP3_AUTH_FAILED: "refused", imap_replies.POP3_TEMPFAIL: "tempfail"},
    }[protocol]
    if reply.startswith(("a OK ", "+OK Logged in")):
        return "ok"
    return words.get(reply, reply)


# Accounts and blocks ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Account:
    address: str
    password: str


def new_account(admin: AdminApi, local: str) -> Account:
    domain = f"kit-{uuid.uuid4().hex[:8]}.test"
    status, body = admin.call("POST", "/v1/domains", {"name": domain})
    assert status == 201, body
    account = Account(f"{local}@{domain}", strong_password())
    status, body = admin.call("POST", f"/v1/domains/{domain}/accounts",
                              {"address": account.address, "password": account.password})
    assert status == 201, body
    return account


@pytest.fixture
def unblock_after(admin: AdminApi) -> Iterator[list[str]]:
    ips: list[str] = []
    yield ips
    unblock(admin, ips)


def each_protocol(attempt: Callable[[str], T]) -> dict[str, T]:
    """``attempt(protocol)`` on the three edges at once (a frozen peer is felt by all three)."""
    seen: dict[str, T] = {}
    errors: list[BaseException] = []

    def run(protocol: str) -> None:
        try:
            seen[protocol] = attempt(protocol)
        except BaseException as exc:  # re-raised in the test's thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in PROTOCOLS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    if errors:
        raise errors[0]
    return seen


def scram_login(client: EdgeClient, account: Account, authzid: str) -> tuple[str, bool]:
    """SCRAM-SHA-256 with the kit's client; the reply, and whether the server proved its keys."""
    scram = ScramClient(account.address, account.password, authzid=authzid)
    verified = False

    def respond(challenge: bytes) -> bytes:
        nonlocal verified
        if challenge.startswith(b"v="):
            scram.verify(challenge.decode())  # raises unless the server's signature is right
            verified = True
            return b""
        return scram.final(challenge.decode()).encode()

    return client.sasl("SCRAM-SHA-256", scram.first().encode(), respond), verified


# SASL with an authzid (issue 8) ----------------------------------------------------------------
def test_r_tls_2_scram_sha_256_with_authzid_over_imap_pop3_and_smtp(
    stack: Stack, demo: dict[str, str], admin: AdminApi, unblock_after: list[str]
) -> None:
    """mbsync (Cyrus SASL) sends ``n,a=user@dom,n=user@dom,r=...``: Dovecot accepts it, so does
    every edge here, also written in other case; another account's name is a wrong password."""
    user = new_account(admin, "scram")
    other = new_account(admin, "other")
    ips = {"smtp": "127.0.3.100", "imap": "127.0.3.101", "pop3": "127.0.3.102"}
    unblock_after += list(ips.values())
    authzids = [user.address, user.address.upper(), other.address]

    def attempt(protocol: str) -> list[tuple[str, bool, bool]]:
        results = []
        for authzid in authzids:
            client = EdgeClient(stack, protocol, ips[protocol])
            try:
                reply, verified = scram_login(client, user, authzid)
                results.append((outcome(protocol, reply, ips[protocol]), verified, client.closed()))
            finally:
                client.close()
        return results

    expected = [("ok", True, False), ("ok", True, False), ("refused", False, False)]
    assert each_protocol(attempt) == dict.fromkeys(PROTOCOLS, expected)


def test_r_log_4_plain_authzid_same_rule_on_every_edge(
    stack: Stack, demo: dict[str, str], admin: AdminApi, unblock_after: list[str]
) -> None:
    """PLAIN's authzid: the login name itself logs in, anybody else's is a wrong password."""
    user = new_account(admin, "plain")
    other = new_account(admin, "other")
    ips = {"smtp": "127.0.3.103", "imap": "127.0.3.104", "pop3": "127.0.3.105"}
    unblock_after += list(ips.values())

    def attempt(protocol: str) -> tuple[str, bool]:
        client = EdgeClient(stack, protocol, ips[protocol])
        try:
            refused = outcome(protocol, client.plain(user.address, user.password, other.address), ips[protocol])
            accepted = outcome(protocol, client.plain(user.address, user.password, user.address), ips[protocol])
            return f"{refused}, then {accepted}", client.closed()
        finally:
            client.close()

    assert each_protocol(attempt) == dict.fromkeys(PROTOCOLS, ("refused, then ok", False))


# One login-result table, three protocols (issue 8) ---------------------------------------------
# (what the client sees, whether the server closes the session after it)
LOGIN_RESULTS = {
    "right password": ("ok", False),
    "wrong password": ("refused", False),
    "locked account": ("refused", False),  # R-LOG-1, answered as a wrong password (R-LOG-4)
    "blocked IP": ("refused", True),  # this failure blocks the IP (R-IPS-2): closed (R-IPS-4)
    "policy down": ("tempfail", False),  # a login policy cannot see is no login: 454 / NO / -ERR
}


@pytest.mark.parametrize("case", list(LOGIN_RESULTS))
def test_r_log_4_login_result_table_same_on_smtp_imap_and_pop3(
    stack: Stack, demo: dict[str, str], admin: AdminApi, unblock_after: list[str], case: str
) -> None:
    number = list(LOGIN_RESULTS).index(case)
    ips = {p: f"127.0.3.{10 * number + k + 1}" for k, p in enumerate(PROTOCOLS)}
    unblock_after += list(ips.values())
    user = new_account(admin, "table")
    password = "not-" + user.password if case in ("wrong password", "blocked IP") else user.password

    if case == "locked account":
        # Five wrong passwords from an address of its own lock the account for everybody.
        locker = EdgeClient(stack, "imap", f"127.0.3.{10 * number + 9}")
        unblock_after.append(f"127.0.3.{10 * number + 9}")
        for n in range(MAX_FAILURES):
            assert outcome("imap", locker.plain(user.address, f"wrong-{n}"), "") == "refused"
        locker.close()
    if case == "blocked IP":
        # Ten failures from each client address in one session (one connection: R-IPS-2's
        # connections per minute stay low); the table's attempt is the eleventh.
        def fail_ten(protocol: str) -> tuple[str, bool]:
            client = EdgeClient(stack, "imap", ips[protocol])
            try:
                replies = {outcome("imap", client.plain(f"nobody{n}@{user.address.split('@')[1]}", "x"), "")
                           for n in range(MAX_FAILED_LOGINS)}
                return ",".join(sorted(replies)), client.closed()
            finally:
                client.close()

        assert each_protocol(fail_ten) == dict.fromkeys(PROTOCOLS, ("refused", False))

    clients = {p: EdgeClient(stack, p, ips[p]) for p in PROTOCOLS}
    policy = stack.procs["policy"]
    try:
        if case == "policy down":
            policy.send_signal(signal.SIGSTOP)  # frozen: every call to it runs into its deadline

        def attempt(protocol: str) -> tuple[str, bool]:
            reply = clients[protocol].plain(user.address, password)
            return outcome(protocol, reply, ips[protocol]), clients[protocol].closed()

        seen = each_protocol(attempt)
    finally:
        if case == "policy down":
            policy.send_signal(signal.SIGCONT)
        for client in clients.values():
            client.close()
    assert seen == dict.fromkeys(PROTOCOLS, LOGIN_RESULTS[case])
