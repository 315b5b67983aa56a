"""mbsync (Debian's isync) syncs a mailbox over IMAP STARTTLS, logging in with SCRAM-SHA-256
through Cyrus SASL, which sends the user as authzid too: ``n,a=user@dom,n=user@dom,r=...``
(issue 8: it used to get ``NO [AUTHENTICATIONFAILED]`` with the right password)."""

from __future__ import annotations

import base64
import re
import shutil
import smtplib
import ssl
import subprocess
import uuid
from pathlib import Path

import pytest

from rempart.common.testing.devstack import AdminApi, Stack, strong_password

pytestmark = pytest.mark.skipif(shutil.which("mbsync") is None, reason="mbsync (Debian's isync) is not installed")


def mbsync_config(stack: Stack, address: str, password_file: Path, maildir: Path) -> str:
    return f"""IMAPAccount rempart
Host localhost
Port {stack.ports['imap-pop.imap']}
User {address}
PassCmd "cat {password_file}"
SSLType STARTTLS
CertificateFile {stack.cert_file}
AuthMechs SCRAM-SHA-256

IMAPStore remote
Account rempart

MaildirStore local
Path {maildir}/
Inbox {maildir}/INBOX

Channel inbox
Far :remote:INBOX
Near :local:INBOX
Create Near
Sync Pull
SyncState *
"""


def run_mbsync(config: Path, home: Path) -> subprocess.CompletedProcess[str]:
    # -Dn: the network dialogue on stdout, to see what Cyrus SASL sent.
    return subprocess.run(["mbsync", "-Dn", "-c", str(config), "inbox"], capture_output=True, text=True,
                          timeout=120, env={"HOME": str(home), "PATH": "/usr/bin:/bin"}, check=False)


def test_r_tls_2_mbsync_syncs_a_mailbox_over_imap_starttls_with_scram_authzid(
    stack: Stack, demo: dict[str, str], admin: AdminApi, tmp_path: Path
) -> None:
    domain = f"mbsync-{uuid.uuid4().hex[:8]}.test"
    status, body = admin.call("POST", "/v1/domains", {"name": domain})
    assert status == 201, body
    address, password = f"reader@{domain}", strong_password()
    status, body = admin.call("POST", f"/v1/domains/{domain}/accounts", {"address": address, "password": password})
    assert status == 201, body

    subjects = [f"mbsync {n} {uuid.uuid4().hex[:6]}" for n in range(2)]
    ctx = ssl.create_default_context(cafile=stack.cert_file)
    with smtplib.SMTP("127.0.0.1", stack.ports["smtp-edge.submission"], timeout=30) as client:
        client.starttls(context=ctx)
        client.login(address, password)
        for subject in subjects:
            client.sendmail(address, [address], f"From: {address}\r\nTo: {address}\r\nSubject: {subject}\r\n\r\n"
                            f"Synchronised by mbsync.\r\n".encode())

    password_file = tmp_path / "password"
    password_file.write_text(password)
    maildir = tmp_path / "Mail"
    maildir.mkdir()  # mbsync creates the folders, not the store itself
    config = tmp_path / "mbsyncrc"
    config.write_text(mbsync_config(stack, address, password_file, maildir))

    first = run_mbsync(config, tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # What Cyrus SASL sent first: the authzid is there, and it is the user (the case this is about).
    initial = re.search(r"AUTHENTICATE SCRAM-SHA-256 ([A-Za-z0-9+/=]+)", first.stdout)  # SASL-IR
    assert initial is not None, first.stdout[-3000:]
    assert base64.b64decode(initial.group(1)).decode().startswith(f"n,a={address},n={address},r=")
    synced = [p.read_text(errors="replace") for p in (maildir / "INBOX").glob("*/*") if p.is_file()]
    for subject in subjects:
        assert sum(f"Subject: {subject}" in text for text in synced) == 1, (subject, first.stdout[-2000:])

    again = run_mbsync(config, tmp_path)  # nothing new: the sync state holds, nothing is duplicated
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert len([p for p in (maildir / "INBOX").glob("*/*") if p.is_file()]) == len(synced)
