# ruff: noqa: T201 - a command-line check: what it prints is its result (the Pod log of `helm test`)
"""`helm test`: one message through the release's SMTP service, read back over its IMAP service.

Run by the test Pod (templates/tests/mail-roundtrip.yaml) with the suite's own image; only the
standard library (smtplib, imaplib). It submits a message on SMTPS (implicit TLS, AUTH PLAIN) from
the test account to itself, with a random token in the Subject, then logs in over IMAPS, waits
until the token is in the INBOX, reads the message back, checks its body and deletes it. TLS is
verified against the given CA file and the mail host name (the certificate's name), whatever
address the Services have. Prints each step; the password is never printed. Exit status 0 on
success, 1 with the reason otherwise.

Environment: ROUNDTRIP_SMTP (host:port), ROUNDTRIP_IMAP (host:port), ROUNDTRIP_USER,
ROUNDTRIP_PASSWORD, ROUNDTRIP_TLS_CA (a PEM file), ROUNDTRIP_TLS_NAME (the name to verify),
ROUNDTRIP_TIMEOUT (seconds to wait for delivery, default 60).
"""

from __future__ import annotations

import imaplib
import os
import secrets
import smtplib
import socket
import ssl
import sys
import time
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any


class RoundTripError(Exception):
    pass


def host_port(where: str) -> tuple[str, int]:
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        raise RoundTripError(f"not host:port: {where!r}")
    return host, int(port)


def tls_socket(where: str, tls: ssl.SSLContext, name: str, timeout: float | None) -> ssl.SSLSocket:
    """A TLS connection to ``where`` whose certificate must be valid for ``name``."""
    return tls.wrap_socket(socket.create_connection(host_port(where), timeout=timeout), server_hostname=name)


class Smtps(smtplib.SMTP_SSL):
    """SMTPS to a Service address, the certificate checked for the mail host name."""

    def __init__(self, tls: ssl.SSLContext, name: str, timeout: float) -> None:
        self.tls_name = name
        super().__init__(context=tls, timeout=timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return tls_socket(f"{host}:{port}", self.context, self.tls_name, timeout)


class Imaps(imaplib.IMAP4_SSL):
    """IMAPS to a Service address, the certificate checked for the mail host name."""

    def __init__(self, where: str, tls: ssl.SSLContext, name: str, timeout: float) -> None:
        self.where, self.tls_name = where, name
        host, port = host_port(where)
        super().__init__(host, port, ssl_context=tls, timeout=timeout)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        return tls_socket(self.where, self.ssl_context, self.tls_name, timeout)


def send(smtp_at: str, tls: ssl.SSLContext, name: str, user: str, password: str, token: str,
         timeout: float) -> None:
    message = EmailMessage()
    message["From"] = message["To"] = user
    message["Subject"] = f"helm test {token}"
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = f"<{token}@helm-test.invalid>"
    message.set_content(f"round trip {token}")
    with Smtps(tls, name, timeout) as smtp:
        code, greeting = smtp.connect(*host_port(smtp_at))
        print("SMTP", code, greeting.decode("utf-8", "replace"))
        smtp.ehlo("helm-test.invalid")
        code, said = smtp.login(user, password)  # AUTH PLAIN (or LOGIN) over the TLS session
        print("SMTP AUTH ->", code, said.decode("utf-8", "replace"))
        smtp.send_message(message)
        print("SMTP DATA -> 250")


def ok(reply: tuple[str, Any], what: str) -> list[Any]:
    status, data = reply
    if status != "OK":
        raise RoundTripError(f"IMAP {what}: {status} {data!r}")
    return list(data)


def read_back(imap_at: str, tls: ssl.SSLContext, name: str, user: str, password: str, token: str,
              timeout: float) -> None:
    imap = Imaps(imap_at, tls, name, 20.0)
    try:
        print("IMAP", imap.welcome.decode("utf-8", "replace"))
        ok(imap.login(user, password), "LOGIN")
        print("IMAP LOGIN -> OK")
        deadline = time.monotonic() + timeout
        while True:
            ok(imap.select("INBOX"), "SELECT")
            found = ok(imap.uid("SEARCH", "HEADER", "Subject", f'"{token}"'), "SEARCH")
            uids = found[0].split() if found and isinstance(found[0], bytes) else []
            if uids:
                break
            if time.monotonic() > deadline:
                raise RoundTripError(f"the message was not in the INBOX within {timeout:.0f} s")
            time.sleep(1)
        uid = uids[0].decode()
        fetched = ok(imap.uid("FETCH", uid, "(BODY.PEEK[])"), "FETCH")
        body = b"".join(part[1] for part in fetched if isinstance(part, tuple))
        if f"round trip {token}".encode() not in body:
            raise RoundTripError("the message read back is not the one sent")
        print(f"IMAP UID FETCH {uid} -> the message, {len(body)} bytes")
        ok(imap.uid("STORE", uid, "+FLAGS.SILENT", "(\\Deleted)"), "STORE")
        ok(imap.expunge(), "EXPUNGE")
    finally:
        imap.logout()


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
    except (RoundTripError, OSError, ValueError, smtplib.SMTPException, imaplib.IMAP4.error) as exc:
        print(f"round trip FAILED: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
