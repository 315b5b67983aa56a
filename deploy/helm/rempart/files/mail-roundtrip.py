# ruff: noqa: T201 - a command-line check: what it prints is its result (the Pod log of `helm test`)
"""`helm test`: one message through the release's SMTP service, read back over its IMAP service.

Run by the test Pod (templates/tests/mail-roundtrip.yaml) with the suite's own image; only the
standard library. It submits a message on SMTPS (implicit TLS, AUTH PLAIN) from the test account to
itself, with a random token in the Subject, then logs in over IMAPS, waits until the token is in the
INBOX, reads the message back, checks its body and deletes it. TLS is verified against the given CA
file and the mail host name (the certificate's name), whatever address the Services have. Prints
each step; the password is never printed. Exit status 0 on success, 1 with the reason otherwise.

Environment: ROUNDTRIP_SMTP (host:port), ROUNDTRIP_IMAP (host:port), ROUNDTRIP_USER,
ROUNDTRIP_PASSWORD, ROUNDTRIP_TLS_CA (a PEM file), ROUNDTRIP_TLS_NAME (the name to verify),
ROUNDTRIP_TIMEOUT (seconds to wait for delivery, default 60).
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import socket
import ssl
import sys
import time

LINE_LIMIT = 65536
MESSAGE_LIMIT = 1 << 20


class RoundTripError(Exception):
    pass


class Conn:
    """A TLS connection read line by line, with a deadline on every read."""

    def __init__(self, where: str, tls: ssl.SSLContext, name: str, timeout: float) -> None:
        host, _, port = where.rpartition(":")
        if not host or not port.isdigit():
            raise RoundTripError(f"not host:port: {where!r}")
        raw = socket.create_connection((host, int(port)), timeout=timeout)
        self.sock = tls.wrap_socket(raw, server_hostname=name)
        self.file = self.sock.makefile("rb")
        self.where = where

    def line(self) -> bytes:
        data = self.file.readline(LINE_LIMIT)
        if not data:
            raise RoundTripError(f"{self.where} closed the connection")
        return data.rstrip(b"\r\n")

    def read(self, size: int) -> bytes:
        data = self.file.read(size)
        if len(data) != size:
            raise RoundTripError(f"{self.where} closed the connection in a literal")
        return data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def smtp_reply(conn: Conn, expected: str) -> str:
    lines = []
    while True:
        line = conn.line().decode("utf-8", "replace")
        lines.append(line)
        if len(line) < 4 or line[3] != "-":
            break
    if not lines[-1].startswith(expected):
        raise RoundTripError(f"SMTP: expected {expected}, got: {' | '.join(lines)}")
    return lines[-1]


def send(smtp_at: str, tls: ssl.SSLContext, name: str, user: str, password: str, token: str,
         timeout: float) -> None:
    conn = Conn(smtp_at, tls, name, timeout)
    try:
        print("SMTP", smtp_reply(conn, "220"))
        conn.send(b"EHLO helm-test.invalid\r\n")
        smtp_reply(conn, "250")
        plain = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        conn.send(f"AUTH PLAIN {plain}\r\n".encode())
        print("SMTP AUTH PLAIN ->", smtp_reply(conn, "235"))
        conn.send(f"MAIL FROM:<{user}>\r\n".encode())
        smtp_reply(conn, "250")
        conn.send(f"RCPT TO:<{user}>\r\n".encode())
        smtp_reply(conn, "250")
        conn.send(b"DATA\r\n")
        smtp_reply(conn, "354")
        date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
        message = (f"From: <{user}>\r\nTo: <{user}>\r\nSubject: helm test {token}\r\nDate: {date}\r\n"
                   f"Message-ID: <{token}@helm-test.invalid>\r\n\r\nround trip {token}\r\n.\r\n")
        conn.send(message.encode())
        print("SMTP DATA ->", smtp_reply(conn, "250"))
        conn.send(b"QUIT\r\n")
    finally:
        conn.close()


def quoted(value: str) -> str:
    if any(c in value for c in "\r\n\0"):
        raise RoundTripError("the test account's name or password holds a line break")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Imap:
    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.serial = 0

    def command(self, text: str, shown: str | None = None) -> tuple[list[bytes], bytes]:
        """Sends a command; the untagged lines (literals inlined) and the tagged status line."""
        self.serial += 1
        tag = f"t{self.serial}"
        self.conn.send(f"{tag} {text}\r\n".encode())
        untagged: list[bytes] = []
        while True:
            line = self.conn.line()
            literal = re.search(rb"\{(\d+)\}$", line)
            if literal:
                size = int(literal.group(1))
                if size > MESSAGE_LIMIT:
                    raise RoundTripError(f"IMAP: a {size}-byte literal")
                line += b"\r\n" + self.conn.read(size) + self.conn.line()
            if line.startswith(tag.encode() + b" "):
                status = line[len(tag) + 1:]
                if not status.startswith(b"OK"):
                    raise RoundTripError(f"IMAP {shown or text}: {status.decode('utf-8', 'replace')}")
                return untagged, status
            untagged.append(line)


def read_back(imap_at: str, tls: ssl.SSLContext, name: str, user: str, password: str, token: str,
              timeout: float) -> None:
    conn = Conn(imap_at, tls, name, 20.0)
    try:
        greeting = conn.line().decode("utf-8", "replace")
        if not greeting.startswith("* OK"):
            raise RoundTripError(f"IMAP greeting: {greeting}")
        print("IMAP", greeting)
        imap = Imap(conn)
        imap.command(f"LOGIN {quoted(user)} {quoted(password)}", shown="LOGIN")
        print("IMAP LOGIN -> OK")
        deadline = time.monotonic() + timeout
        uids: list[str] = []
        while True:
            imap.command("SELECT INBOX")
            found, _ = imap.command(f'UID SEARCH HEADER Subject "{token}"')
            uids = [u for line in found if line.startswith(b"* SEARCH") for u in line.decode().split()[2:]]
            if uids:
                break
            if time.monotonic() > deadline:
                raise RoundTripError(f"the message was not in the INBOX within {timeout:.0f} s")
            time.sleep(1)
        fetched, _ = imap.command(f"UID FETCH {uids[0]} BODY.PEEK[]")
        body = b"\n".join(fetched)
        if f"round trip {token}".encode() not in body:
            raise RoundTripError("the message read back is not the one sent")
        print(f"IMAP UID FETCH {uids[0]} -> the message, {len(body)} bytes")
        imap.command(f"UID STORE {uids[0]} +FLAGS.SILENT (\\Deleted)")
        imap.command("EXPUNGE")
        imap.command("LOGOUT")
    finally:
        conn.close()


def main() -> int:
    try:
        env = os.environ
        missing = [k for k in ("ROUNDTRIP_SMTP", "ROUNDTRIP_IMAP", "ROUNDTRIP_USER", "ROUNDTRIP_PASSWORD",
                               "ROUNDTRIP_TLS_CA", "ROUNDTRIP_TLS_NAME") if not env.get(k)]
        if missing:
            raise RoundTripError(f"missing environment: {', '.join(missing)}")
        timeout = float(env.get("ROUNDTRIP_TIMEOUT", "60"))
        tls = ssl.create_default_context(cafile=env["ROUNDTRIP_TLS_CA"])
        token = secrets.token_hex(8)
        user, password, name = env["ROUNDTRIP_USER"], env["ROUNDTRIP_PASSWORD"], env["ROUNDTRIP_TLS_NAME"]
        started = time.monotonic()
        send(env["ROUNDTRIP_SMTP"], tls, name, user, password, token, 20.0)
        read_back(env["ROUNDTRIP_IMAP"], tls, name, user, password, token, timeout)
        print(f"round trip of {token} in {time.monotonic() - started:.1f} s: passed")
        return 0
    except (RoundTripError, OSError, ValueError) as exc:
        print(f"round trip FAILED: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
