"""mbsync (Debian's isync) syncs a mailbox over IMAP STARTTLS, logging in with SCRAM-SHA-256
through Cyrus SASL, which sends the user as authzid too: ``n,a=user@dom,n=user@dom,r=...``
(issue 8: it used to get ``NO [AUTHENTICATIONFAILED]`` with the right password). It pulls the
INBOX, and it pushes: what the user wrote, flagged, deleted and created in the local Maildir is
what the server shows after the sync (APPEND, STORE, EXPUNGE, CREATE)."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from rempart.common.testing.devstack import AdminApi, Stack

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mail_clients import (
    fresh_account,
    maildir_file,
    maildir_subjects,
    output,
    password_file,
    send,
    server_folder,
    server_folders,
    set_maildir_flags,
    wait_delivered,
    write_maildir_message,
)

pytestmark = pytest.mark.skipif(shutil.which("mbsync") is None, reason="mbsync (Debian's isync) is not installed")


# The INBOX, server to here only (the pull test).
PULL_INBOX = """Channel inbox
Far :remote:INBOX
Near :local:INBOX
Create Near
Sync Pull
SyncState *
"""

# Every folder, both ways: new messages, flags and deletions, folders created on either side.
# CopyArrivalDate: an upload keeps the message's arrival date (the Maildir file's time).
BOTH_WAYS = """Channel account
Far :remote:
Near :local:
Patterns *
Create Both
Expunge Both
Sync All
CopyArrivalDate yes
SyncState *
"""


# SystemCertificates no: the stack's certificate is the only one trusted, so the check is about it.
def mbsync_config(stack: Stack, address: str, password_path: Path, maildir: Path, channel: str = PULL_INBOX) -> str:
    return f"""IMAPAccount rempart
Host localhost
Port {stack.ports['imap-pop.imap']}
User {address}
PassCmd "cat {password_path}"
SSLType STARTTLS
CertificateFile {stack.cert_file}
SystemCertificates no
AuthMechs SCRAM-SHA-256

IMAPStore remote
Account rempart

MaildirStore local
Path {maildir}/
Inbox {maildir}/INBOX
SubFolders Verbatim

{channel}"""


def run_mbsync(config: Path, home: Path, channel: str = "inbox") -> subprocess.CompletedProcess[str]:
    # -Dn: the network dialogue on stdout, to see what Cyrus SASL sent.
    return subprocess.run(["mbsync", "-Dn", "-c", str(config), channel], capture_output=True, text=True,
                          timeout=120, env={"HOME": str(home), "PATH": "/usr/bin:/bin"}, check=False)


def test_r_tls_2_mbsync_syncs_a_mailbox_over_imap_starttls_with_scram_authzid(
    stack: Stack, demo: dict[str, str], admin: AdminApi, tmp_path: Path
) -> None:
    account = fresh_account(admin, "mbsync")
    address = account.address
    subjects = [f"mbsync {n} {uuid.uuid4().hex[:6]}" for n in range(2)]
    send(stack, account, subjects)
    wait_delivered(stack, account, subjects)

    maildir = tmp_path / "Mail"
    maildir.mkdir()  # mbsync creates the folders, not the store itself
    config = tmp_path / "mbsyncrc"
    config.write_text(mbsync_config(stack, address, password_file(tmp_path, account), maildir))

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


def test_mbsync_pushes_local_messages_flags_deletions_and_folders_to_the_server(
    stack: Stack, demo: dict[str, str], admin: AdminApi, tmp_path: Path
) -> None:
    account = fresh_account(admin, "mbsync-push")
    tag = uuid.uuid4().hex[:6]
    flagged, deleted, written, note = (f"mbsync {what} {tag}" for what in ("flagged", "deleted", "written", "note"))
    send(stack, account, [flagged, deleted])
    wait_delivered(stack, account, [flagged, deleted])
    maildir = tmp_path / "Mail"
    maildir.mkdir()
    config = tmp_path / "mbsyncrc"
    config.write_text(mbsync_config(stack, account.address, password_file(tmp_path, account), maildir, BOTH_WAYS))

    first = run_mbsync(config, tmp_path, "account")
    assert first.returncode == 0, output(first)
    assert sorted(maildir_subjects(maildir / "INBOX")) == sorted([flagged, deleted]), output(first)

    # Offline, the user flags a message, deletes another, writes one (its arrival date kept by the
    # file's time) and files a note, already read, in a folder of their own.
    set_maildir_flags(maildir_file(maildir / "INBOX", flagged), "F")
    maildir_file(maildir / "INBOX", deleted).unlink()
    write_maildir_message(maildir / "INBOX", f"1614859200.{tag}.laptop", written,
                          arrived=datetime(2021, 3, 4, 12, 0, tzinfo=UTC))
    write_maildir_message(maildir / "Projects", f"1614859201.{tag}.laptop", note, flags="S")

    second = run_mbsync(config, tmp_path, "account")
    assert second.returncode == 0, output(second)
    # mbsync warns, and still exits 0, when the server's answers leave it unsure what it uploaded
    # ("lost track of N pushed message(s)", "cannot find newly stored messages").
    assert "Warning:" not in second.stdout + second.stderr, output(second)
    inbox = {message.subject: message for message in server_folder(stack, account)}
    assert set(inbox) == {flagged, written}, (inbox, output(second))  # the deleted one expunged
    assert "\\Flagged" in inbox[flagged].flags, (inbox, output(second))
    assert inbox[written].internal_date == "04-Mar-2021 12:00:00 +0000", (inbox, output(second))
    assert "Projects" in server_folders(stack, account), output(second)
    projects = server_folder(stack, account, "Projects")
    assert [(m.subject, "\\Seen" in m.flags) for m in projects] == [(note, True)], (projects, output(second))

    # Nothing left to do: a third sync uploads nothing twice and brings nothing back.
    third = run_mbsync(config, tmp_path, "account")
    assert third.returncode == 0, output(third)
    assert "Warning:" not in third.stdout + third.stderr, output(third)
    assert sorted(m.subject for m in server_folder(stack, account)) == sorted([flagged, written]), output(third)
    assert sorted(maildir_subjects(maildir / "INBOX")) == sorted([flagged, written]), output(third)
    assert maildir_subjects(maildir / "Projects") == [note], output(third)
