"""What the e2e tests of real mail clients (offlineimap, mpop, getmail, mbsync) share: a fresh
account, mail sent over submission, the mailbox as the server shows it to a user (imaplib over
IMAPS, read-only), what a client left in a local Maildir or mbox, and a client run in its own HOME;
and what the e2e tests of logins share: the stack's TLS context, an IMAP client speaking from a
chosen source address, SPEC's words for a failed login and an active block, and unblocking IPs.

Each client reads the password from a file: strong passwords hold ``%`` and quotes, which the
clients' configuration syntaxes (ConfigParser interpolation, shell words) would otherwise mangle."""

from __future__ import annotations

import email.parser
import email.policy
import imaplib
import mailbox
import os
import re
import smtplib
import socket
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from rempart.common.testing.devstack import AdminApi, Stack, strong_password
from rempart.common.testing.polling import wait_until
from rempart.common.tls import write_self_signed

CLIENT_TIMEOUT = 120.0
DELIVERY_TIMEOUT = 30.0
IMAP_LOGIN_FAILED = "NO [AUTHENTICATIONFAILED] Authentication failed."  # SPEC R-LOG-4, word for word
MAX_FAILURES = 5  # SPEC R-LOG-1 default: the sixth attempt meets a locked account


class Account(NamedTuple):
    address: str
    password: str


class ServerMessage(NamedTuple):
    uid: int
    subject: str
    flags: frozenset[str]
    internal_date: str


def fresh_account(admin: AdminApi, prefix: str) -> Account:
    domain = f"{prefix}-{uuid.uuid4().hex[:8]}.test"
    status, body = admin.call("POST", "/v1/domains", {"name": domain})
    assert status == 201, body
    account = Account(f"reader@{domain}", strong_password())
    status, body = admin.call("POST", f"/v1/domains/{domain}/accounts",
                              {"address": account.address, "password": account.password})
    assert status == 201, body
    return account


def password_file(directory: Path, account: Account) -> Path:
    path = directory / "password"
    path.write_text(account.password)
    path.chmod(0o600)
    return path


def stranger_certificate(directory: Path) -> str:
    """A self-signed certificate for the same name as the server's, but not the server's: a client
    that trusts only this one must refuse the server (its check is real, not a formality)."""
    return write_self_signed(directory / "stranger-tls", ["localhost", "127.0.0.1"]).cert_file


def send(stack: Stack, account: Account, subjects: list[str]) -> None:
    """Mail to the account, as its owner would send it: submission, STARTTLS checked, AUTH."""
    ctx = ssl.create_default_context(cafile=stack.cert_file)
    with smtplib.SMTP("127.0.0.1", stack.ports["smtp-edge.submission"], timeout=30) as client:
        client.starttls(context=ctx)
        client.login(account.address, account.password)
        for subject in subjects:
            client.sendmail(account.address, [account.address],
                            f"From: {account.address}\r\nTo: {account.address}\r\nSubject: {subject}\r\n\r\n"
                            "Sent to be read by a real mail client.\r\n".encode())


@contextmanager
def imaps(stack: Stack, account: Account) -> Iterator[imaplib.IMAP4_SSL]:
    ctx = ssl.create_default_context(cafile=stack.cert_file)
    client = imaplib.IMAP4_SSL("localhost", stack.ports["imap-pop.imaps"], ssl_context=ctx, timeout=30)
    try:
        client.login(account.address, account.password)
        yield client
    finally:
        try:
            client.logout()
        except (imaplib.IMAP4.error, OSError):
            client.shutdown()


def read_folder(client: imaplib.IMAP4, folder: str = "INBOX") -> list[ServerMessage]:
    """The folder as a user's client sees it, without changing it (EXAMINE, BODY.PEEK)."""
    status, data = client.select(f'"{folder}"', readonly=True)
    assert status == "OK", (folder, data)
    if data[0] == b"0":
        return []
    status, data = client.uid("FETCH", "1:*", "(UID FLAGS INTERNALDATE BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert status == "OK", data
    parser = email.parser.BytesHeaderParser(policy=email.policy.default)
    messages: list[ServerMessage] = []
    for item in data:
        if not isinstance(item, tuple):
            continue  # the ")" closing each FETCH line
        head, header = item[0].decode(), item[1]
        uid = re.search(r"\bUID (\d+)", head)
        flags = re.search(r"\bFLAGS \(([^)]*)\)", head)
        date = re.search(r'\bINTERNALDATE "([^"]+)"', head)
        assert uid and flags and date, head
        messages.append(ServerMessage(int(uid.group(1)), str(parser.parsebytes(header)["Subject"]),
                                      frozenset(flags.group(1).split()), date.group(1)))
    return messages


def server_folder(stack: Stack, account: Account, folder: str = "INBOX") -> list[ServerMessage]:
    with imaps(stack, account) as client:
        return read_folder(client, folder)


def server_folders(stack: Stack, account: Account) -> set[str]:
    with imaps(stack, account) as client:
        status, data = client.list()
    assert status == "OK", data
    names = set()
    for line in data:
        assert isinstance(line, bytes), line
        name = re.search(rb'"((?:[^"\\]|\\.)*)"$|(\S+)$', line)
        assert name, line
        names.add((name.group(1) or name.group(2)).decode())
    return names


def wait_delivered(stack: Stack, account: Account, subjects: list[str]) -> None:
    """Delivery into the mailbox index follows the 250 by a moment; a client run before that would
    find a shorter INBOX, which is not what these tests are about."""
    with imaps(stack, account) as client:
        wait_until(lambda: set(subjects) <= {m.subject for m in read_folder(client)}, timeout=DELIVERY_TIMEOUT,
                   what=f"{len(subjects)} messages delivered to {account.address}'s INBOX")


def maildir_subjects(path: Path) -> list[str]:
    """Subjects of the messages in a Maildir (new/ and cur/), one entry per message file."""
    return [str(message["Subject"]) for message in mailbox.Maildir(path, factory=None, create=False)]


def maildir_file(path: Path, subject: str) -> Path:
    """The one file of a Maildir that holds the message with this subject."""
    parser = email.parser.BytesHeaderParser(policy=email.policy.default)
    found = [file for sub in ("new", "cur") for file in (path / sub).iterdir()
             if str(parser.parsebytes(file.read_bytes())["Subject"]) == subject]
    assert len(found) == 1, (subject, found)
    return found[0]


def set_maildir_flags(file: Path, flags: str) -> Path:
    """What a local mail reader does to flag a message: move it to cur/ with the flags in its name
    (the Maildir convention: ``<unique>:2,<flags in ASCII order>``)."""
    unique = file.name.split(":2,")[0]
    target = file.parent.parent / "cur" / f"{unique}:2,{''.join(sorted(flags))}"
    file.rename(target)
    return target


def write_maildir_message(folder: Path, unique: str, subject: str, flags: str | None = None,
                          arrived: datetime | None = None) -> Path:
    """A message the user's local mail program put in a Maildir folder: in new/ if it has no flags
    yet, else in cur/; the file's time is its arrival date (what a sync uploads as INTERNALDATE)."""
    for sub in ("cur", "new", "tmp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    path = folder / "new" / unique if flags is None else folder / "cur" / f"{unique}:2,{flags}"
    path.write_bytes(f"From: me@example.test\r\nSubject: {subject}\r\n\r\nWritten here, offline.\r\n".encode())
    if arrived is not None:
        os.utime(path, (arrived.timestamp(), arrived.timestamp()))
    return path


def mbox_subjects(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [str(message["Subject"]) for message in mailbox.mbox(path, create=False)]


def run_client(argv: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    """The client as a user would start it: its own HOME (its state and dot files there), no
    environment of the test runner."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=CLIENT_TIMEOUT, check=False,
                          env={"HOME": str(home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})


def output(run: subprocess.CompletedProcess[str], chars: int = 4000) -> str:
    """The end of what a client printed, for an assertion's message."""
    return f"exit {run.returncode}\n--- stdout\n{run.stdout[-chars:]}\n--- stderr\n{run.stderr[-chars:]}"


# Logins and intrusion prevention ------------------------------------------------------------------
def intrusion_text(ip: str) -> str:
    """SPEC R-IPS-4, without the SMTP code IMAP and POP3 have no use for."""
    return f"Intrusion prevention active for [{ip}]"


def tls_context(stack: Stack) -> ssl.SSLContext:
    """Trusts the stack's certificate, whatever name the client connects to (127.0.0.1)."""
    ctx = ssl.create_default_context(cafile=stack.cert_file)
    ctx.check_hostname = False
    return ctx


class BoundIMAP(imaplib.IMAP4):
    """imaplib's IMAP4 speaking from ``source_ip`` (imaplib has no source_address of its own)."""

    def __init__(self, stack: Stack, source_ip: str) -> None:
        self.source_ip = source_ip
        super().__init__("127.0.0.1", stack.ports["imap-pop.imap"], timeout=20)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source_ip, 0))

    def login_reply(self, user: str, password: str) -> str:
        """The tagged reply to LOGIN, as the server wrote it (status and text)."""
        typ, data = self._simple_command("LOGIN", user, self._quote(password))
        if typ == "OK":
            self.state = "AUTH"
        return f"{typ} {data[-1].decode()}"


def unblock(admin: AdminApi, ips: list[str]) -> None:
    """Lift the blocks of ``ips`` (those that are not blocked are fine)."""
    for ip in ips:
        status, body = admin.call("DELETE", f"/v1/ips/blocks/{ip}")
        assert status in (204, 404), (ip, status, body)
