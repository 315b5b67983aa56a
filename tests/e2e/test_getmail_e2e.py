"""getmail (Debian's getmail6) collects mail into a local Maildir over POP3S and over IMAPS,
checking the server's certificate (``ca_certs``: a verified chain and the host name): every
message once, and with ``delete = true`` nothing is left on the server for the next run."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from rempart.common.testing.devstack import AdminApi, Stack

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mail_clients import (
    Account,
    fresh_account,
    maildir_subjects,
    output,
    password_file,
    run_client,
    send,
    server_folder,
    stranger_certificate,
    wait_delivered,
)

pytestmark = pytest.mark.skipif(shutil.which("getmail") is None, reason="getmail is not installed (Debian: getmail6)")


class Destination(NamedTuple):
    """A Maildir getmail may deliver to, and what its ``[destination]`` needs to be allowed to."""

    maildir: Path
    extra: str


def make_maildir(path: Path, owner: pwd.struct_passwd | None = None) -> Path:
    for directory in (path, path / "cur", path / "new", path / "tmp"):
        directory.mkdir(parents=True, exist_ok=True)
        if owner is not None:
            os.chown(directory, owner.pw_uid, owner.pw_gid)
    return path


@pytest.fixture
def destination(tmp_path: Path) -> Iterator[Destination]:
    if os.geteuid() != 0:
        yield Destination(make_maildir(tmp_path / "Maildir"), "")
        return
    # getmail refuses to write a Maildir as root ("refuse to deliver mail as root"): a root
    # installation names the user to deliver as. That user cannot reach pytest's tmp_path (its
    # parents are root's, mode 0700), so the Maildir lives in a directory of its own.
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="rempart-getmail-"))
    try:
        os.chown(base, nobody.pw_uid, nobody.pw_gid)
        yield Destination(make_maildir(base / "Maildir", nobody), "user = nobody\n")
    finally:
        shutil.rmtree(base)


def getmail_config(stack: Stack, account: Account, home: Path, retriever: str, port: int, trust: str,
                   destination: Destination) -> Path:
    config = home / "getmailrc"
    config.write_text(f"""[retriever]
type = {retriever}
server = localhost
port = {port}
username = {account.address}
password_command = ("/bin/cat", "{password_file(home, account)}")
ca_certs = {trust}

[destination]
type = Maildir
path = {destination.maildir}/
{destination.extra}
[options]
verbose = 2
read_all = true
delete = true
""")
    return config


def run_getmail(config: Path, home: Path) -> subprocess.CompletedProcess[str]:
    return run_client(["getmail", "--getmaildir", str(home), "--rcfile", str(config)], home)


@pytest.mark.parametrize(("retriever", "port_name"), [("SimplePOP3SSLRetriever", "imap-pop.pop3s"),
                                                      ("SimpleIMAPSSLRetriever", "imap-pop.imaps")])
def test_getmail_collects_every_message_once_and_leaves_nothing(
    stack: Stack, demo: dict[str, str], admin: AdminApi, tmp_path: Path, destination: Destination,
    retriever: str, port_name: str
) -> None:
    account = fresh_account(admin, "getmail")
    subjects = [f"getmail {retriever} {n} {uuid.uuid4().hex[:6]}" for n in range(3)]
    send(stack, account, subjects)
    wait_delivered(stack, account, subjects)
    port = stack.ports[port_name]

    refused = run_getmail(getmail_config(stack, account, tmp_path, retriever, port, stranger_certificate(tmp_path),
                                         destination), tmp_path)
    assert refused.returncode != 0, output(refused)
    assert "CERTIFICATE_VERIFY_FAILED" in refused.stderr, output(refused)
    assert maildir_subjects(destination.maildir) == [], output(refused)

    config = getmail_config(stack, account, tmp_path, retriever, port, stack.cert_file, destination)
    first = run_getmail(config, tmp_path)
    assert first.returncode == 0, output(first)
    assert sorted(maildir_subjects(destination.maildir)) == sorted(subjects), output(first)

    # delete = true: getmail removed what it delivered (POP3 DELE; IMAP \Deleted and EXPUNGE).
    second = run_getmail(config, tmp_path)
    assert second.returncode == 0, output(second)
    assert "0 messages (0 bytes) retrieved" in second.stdout, output(second)
    assert sorted(maildir_subjects(destination.maildir)) == sorted(subjects), output(second)
    assert server_folder(stack, account) == [], output(first)
