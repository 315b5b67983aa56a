"""offlineimap (Debian's offlineimap3) keeps a local Maildir and the account in step over IMAPS,
checking the server's certificate: every message arrives once, and what the user then does in the
Maildir (reads a message, deletes another, writes one) is what the server shows after the next
sync."""

from __future__ import annotations

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
    Account,
    fresh_account,
    maildir_file,
    maildir_subjects,
    output,
    password_file,
    run_client,
    send,
    server_folder,
    set_maildir_flags,
    stranger_certificate,
    wait_delivered,
    write_maildir_message,
)

pytestmark = pytest.mark.skipif(shutil.which("offlineimap") is None,
                                reason="offlineimap is not installed (Debian: offlineimap3)")


def offlineimap_config(stack: Stack, account: Account, home: Path, trust: str) -> Path:
    config = home / ".offlineimaprc"
    config.write_text(f"""[general]
accounts = rempart
metadata = {home}/.offlineimap

[Account rempart]
localrepository = local
remoterepository = remote

[Repository local]
type = Maildir
localfolders = {home}/Mail

[Repository remote]
type = IMAP
remotehost = localhost
remoteport = {stack.ports['imap-pop.imaps']}
ssl = yes
sslcacertfile = {trust}
remoteuser = {account.address}
remotepassfile = {password_file(home, account)}
""")
    return config


def run_offlineimap(config: Path, home: Path) -> subprocess.CompletedProcess[str]:
    # -o: one sync and exit; -d imap: the IMAP dialogue, to read what the server answered.
    return run_client(["offlineimap", "-c", str(config), "-o", "-u", "basic", "-d", "imap"], home)


def test_offlineimap_syncs_over_imaps_and_sends_back_local_reads_deletions_and_messages(
    stack: Stack, demo: dict[str, str], admin: AdminApi, tmp_path: Path
) -> None:
    account = fresh_account(admin, "offlineimap")
    tag = uuid.uuid4().hex[:6]
    read, deleted, untouched, written = (f"offlineimap {what} {tag}" for what in ("read", "deleted", "kept", "written"))
    send(stack, account, [read, deleted, untouched])
    wait_delivered(stack, account, [read, deleted, untouched])
    inbox = tmp_path / "Mail" / "INBOX"

    refused = run_offlineimap(offlineimap_config(stack, account, tmp_path, stranger_certificate(tmp_path)), tmp_path)
    assert refused.returncode != 0, output(refused)
    assert not inbox.exists() or maildir_subjects(inbox) == [], output(refused)

    config = offlineimap_config(stack, account, tmp_path, stack.cert_file)
    first = run_offlineimap(config, tmp_path)
    assert first.returncode == 0, output(first)
    assert sorted(maildir_subjects(inbox)) == sorted([read, deleted, untouched]), output(first)

    # In the local mail reader the user reads one message, deletes another and writes one (its
    # arrival date: the file's time, which offlineimap sends as the APPEND date).
    set_maildir_flags(maildir_file(inbox, read), "S")
    maildir_file(inbox, deleted).unlink()
    write_maildir_message(inbox, f"1620284889.{tag}.laptop", written, arrived=datetime(2021, 5, 6, 7, 8, 9, tzinfo=UTC))

    second = run_offlineimap(config, tmp_path)
    assert second.returncode == 0, output(second)
    on_server = {message.subject: message for message in server_folder(stack, account)}
    assert set(on_server) == {read, untouched, written}, (on_server, output(second))  # the deleted one expunged
    assert "\\Seen" in on_server[read].flags, (on_server, output(second))
    assert "\\Seen" not in on_server[untouched].flags, (on_server, output(second))
    assert on_server[written].internal_date == "06-May-2021 07:08:09 +0000", (on_server, output(second))
    assert sorted(maildir_subjects(inbox)) == sorted([read, untouched, written]), output(second)

    # Nothing left to do: a third sync uploads nothing twice and brings nothing back.
    third = run_offlineimap(config, tmp_path)
    assert third.returncode == 0, output(third)
    assert sorted(m.subject for m in server_folder(stack, account)) == sorted([read, untouched, written]), output(third)
    assert sorted(maildir_subjects(inbox)) == sorted([read, untouched, written]), output(third)
