"""mpop (Debian's) collects mail over POP3S into a local mbox, checking the server's certificate and
logging in with SCRAM-SHA-256 through GNU SASL (another SASL implementation than mbsync's Cyrus):
every message once, and with ``keep off`` nothing is left on the server for the next run."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from rempart.common.testing.devstack import AdminApi, Stack

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mail_clients import (
    Account,
    fresh_account,
    mbox_subjects,
    output,
    password_file,
    run_client,
    send,
    server_folder,
    stranger_certificate,
    wait_delivered,
)

pytestmark = pytest.mark.skipif(shutil.which("mpop") is None, reason="mpop is not installed (Debian)")


def mpop_config(stack: Stack, account: Account, home: Path, trust: str, mbox: Path) -> Path:
    config = home / ".mpoprc"
    config.write_text(f"""account rempart
host localhost
port {stack.ports['imap-pop.pop3s']}
tls on
tls_starttls off
tls_trust_file {trust}
auth scram-sha-256
user {account.address}
passwordeval cat {password_file(home, account)}
delivery mbox {mbox}
keep off
""")
    config.chmod(0o600)  # mpop refuses a configuration others can read
    return config


def run_mpop(config: Path, home: Path) -> subprocess.CompletedProcess[str]:
    # --debug: the POP3 dialogue (the SCRAM exchange, not the password), to read what the server answered.
    return run_client(["mpop", "--debug", "-C", str(config), "rempart"], home)


def test_mpop_collects_every_message_once_over_pop3s_and_leaves_nothing(
    stack: Stack, demo: dict[str, str], admin: AdminApi, tmp_path: Path
) -> None:
    account = fresh_account(admin, "mpop")
    subjects = [f"mpop {n} {uuid.uuid4().hex[:6]}" for n in range(3)]
    send(stack, account, subjects)
    wait_delivered(stack, account, subjects)
    mbox = tmp_path / "inbox.mbox"

    refused = run_mpop(mpop_config(stack, account, tmp_path, stranger_certificate(tmp_path), mbox), tmp_path)
    assert refused.returncode != 0, output(refused)
    assert "TLS certificate verification failed" in refused.stderr, output(refused)
    assert mbox_subjects(mbox) == [], output(refused)

    config = mpop_config(stack, account, tmp_path, stack.cert_file, mbox)
    first = run_mpop(config, tmp_path)
    assert first.returncode == 0, output(first)
    assert "--> AUTH SCRAM-SHA-256" in first.stdout + first.stderr, output(first)
    assert sorted(mbox_subjects(mbox)) == sorted(subjects), output(first)

    # keep off: mpop deleted what it collected (DELE, then QUIT); the next run finds nothing.
    second = run_mpop(config, tmp_path)
    assert second.returncode == 0, output(second)
    assert sorted(mbox_subjects(mbox)) == sorted(subjects), output(second)
    assert server_folder(stack, account) == [], output(first)
