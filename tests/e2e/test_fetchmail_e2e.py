"""fetchmail (Debian's) collects mail over POP3S and IMAPS, checking the server's certificate, the
way a user's own machine pulls a mailbox: every message once, deleted from the server after
(POP3 DELE, IMAP \\Deleted + EXPUNGE), nothing left to fetch the second time."""

from __future__ import annotations

import shutil
import smtplib
import ssl
import subprocess
import uuid
from pathlib import Path

import pytest

from rempart.common.testing.devstack import AdminApi, Stack, strong_password

pytestmark = pytest.mark.skipif(shutil.which("fetchmail") is None, reason="fetchmail is not installed (Debian)")


def fresh_account(admin: AdminApi) -> tuple[str, str]:
    domain = f"fetch-{uuid.uuid4().hex[:8]}.test"
    assert admin.call("POST", "/v1/domains", {"name": domain})[0] == 201
    address, password = f"reader@{domain}", strong_password()
    status, body = admin.call("POST", f"/v1/domains/{domain}/accounts", {"address": address, "password": password})
    assert status == 201, body
    return address, password


def send(stack: Stack, address: str, password: str, subjects: list[str]) -> None:
    ctx = ssl.create_default_context(cafile=stack.cert_file)
    with smtplib.SMTP("127.0.0.1", stack.ports["smtp-edge.submission"], timeout=30) as client:
        client.starttls(context=ctx)
        client.login(address, password)
        for subject in subjects:
            client.sendmail(address, [address], f"From: {address}\r\nTo: {address}\r\nSubject: {subject}\r\n\r\n"
                            "Collected by fetchmail.\r\n".encode())


def run_fetchmail(stack: Stack, protocol: str, address: str, password: str, home: Path) -> tuple[int, str, str]:
    port = stack.ports["imap-pop.pop3s" if protocol == "POP3" else "imap-pop.imaps"]
    mbox = home / f"{protocol}.mbox"
    rc = home / ".fetchmailrc"
    rc.write_text(
        "set no syslog\n"
        f'poll 127.0.0.1 service {port} protocol {protocol} auth password\n'
        f'  user "{address}" password "{password}"\n'
        f"  ssl sslcertck sslcertfile {stack.cert_file} sslcommonname localhost\n"
        f'  mda "/bin/sh -c \'cat >> {mbox}\'"\n')
    rc.chmod(0o600)
    run = subprocess.run(["fetchmail", "-f", str(rc), "--nodetach", "-v"], capture_output=True, text=True,
                         timeout=120, env={"HOME": str(home), "PATH": "/usr/bin:/bin"}, check=False)
    return run.returncode, run.stdout + run.stderr, mbox.read_text(errors="replace") if mbox.exists() else ""


@pytest.mark.parametrize("protocol", ["POP3", "IMAP"])
def test_fetchmail_collects_every_message_once_and_leaves_nothing(
    stack: Stack, demo: dict[str, str], admin: AdminApi, tmp_path: Path, protocol: str
) -> None:
    address, password = fresh_account(admin)
    subjects = [f"fetch {protocol} {n} {uuid.uuid4().hex[:6]}" for n in range(3)]
    send(stack, address, password, subjects)

    code, log, collected = run_fetchmail(stack, protocol, address, password, tmp_path)
    assert code == 0, log[-3000:]
    for subject in subjects:
        assert collected.count(f"Subject: {subject}") == 1, log[-3000:]

    # fetchmail deleted them from the server: a second run finds nothing (its exit code 1).
    code, log, again = run_fetchmail(stack, protocol, address, password, tmp_path)
    assert code == 1, log[-3000:]
    assert again == collected
