"""Mail that leaves (issue 10), end to end: the five services and the relay as processes, a
loopback DNS server answering the MX lookups, and an aiosmtpd sink with STARTTLS as the remote
domain's MX. A user submits on 587 to a remote address and the sink receives it over TLS; a
forwarded copy leaves with its SRS sender (R-DNS-6); a remote 550 comes back as a DSN that the
user reads over IMAP.
"""

from __future__ import annotations

import email
import email.policy
import imaplib
import os
import re
import smtplib
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dkim
import dns.resolver
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from rempart.common.testing.devstack import AdminApi, Stack, bootstrap_demo
from rempart.common.testing.localstack import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mail_clients import tls_context
from policy_harness import DnsThread, admin_for

DOMAIN = "example.test"


@dataclass
class Sink:
    """The remote MX: keeps what it accepts; 550 for nobody@remote.test."""

    received: list[tuple[str, list[str], bytes, bool]] = field(default_factory=list)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if address == "nobody@remote.test":
            return "550 5.1.1 <nobody@remote.test>: Recipient address rejected"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.received.append((str(envelope.mail_from), list(envelope.rcpt_tos),
                              bytes(envelope.original_content or b""), session.ssl is not None))
        return "250 2.0.0 Ok: queued"

    def wait_for(self, marker: str, timeout: float = 30.0) -> tuple[str, list[str], bytes, bool]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for item in self.received:
                if marker.encode() in item[2]:
                    return item
            time.sleep(0.1)
        raise AssertionError(f"the sink never received {marker!r}; it has {len(self.received)} message(s)")


@dataclass
class Env:
    stack: Stack
    demo: dict[str, str]
    admin: AdminApi
    sink: Sink
    relay: subprocess.Popen[bytes]
    relay_log: Path
    dns: DnsThread


def wait_ready(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 45.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"relay exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as response:
                if response.status == 200:
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.3)
    raise AssertionError(f"relay not ready: {last}\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    sink = Sink()
    sink_port = free_port()
    workdir = tmp_path_factory.mktemp("relay-stack")
    stack = Stack(workdir=workdir, log_format="json")
    controller = None
    relay = None
    dns = DnsThread({
        "remote.test": {"MX": ["10 mx.remote.test."]}, "mx.remote.test": {"A": ["127.0.0.1"]},
        "sender.test": {"MX": ["10 mx.sender.test."]}, "mx.sender.test": {"A": ["192.0.2.25"]},
    })
    try:
        stack.extra_env = {"REMPART_DNS_NAMESERVERS": dns.address, "REMPART_GRPC_HOST": "127.0.0.1"}
        stack.start()
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(stack.cert_file, stack.key_file)
        controller = Controller(sink, hostname="127.0.0.1", port=sink_port, server_hostname="mx.remote.test",
                                tls_context=server_ctx, ready_timeout=10)
        controller.start()
        demo = bootstrap_demo(stack)
        ops_port = free_port()
        relay_env = {k: v for k, v in os.environ.items() if not k.startswith("REMPART_")}
        relay_env |= stack.env_for("smtp-edge") | {
            "REMPART_OPS_PORT": str(ops_port), "REMPART_INSTANCE": "relay-0", "REMPART_MX_PORT": str(sink_port),
            "REMPART_DNS_NAMESERVERS": dns.address, "REMPART_HOSTNAME": "relay.example.test",
        }
        relay_log = workdir / "relay.log"
        with open(relay_log, "ab") as out:
            relay = subprocess.Popen([sys.executable, "-m", "rempart.smtp_edge.relay"], env=relay_env,
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_ready(ops_port, relay, relay_log)
        yield Env(stack, demo, admin_for(stack), sink, relay, relay_log, dns)
    finally:
        if relay is not None and relay.poll() is None:
            relay.terminate()
            relay.wait(15)
        if controller is not None:
            controller.stop()
        stack.stop()
        dns.close()


def submit(env: Env, to: str, subject: str) -> None:
    stack, user = env.stack, env.demo["user"]
    with smtplib.SMTP("127.0.0.1", stack.ports["smtp-edge.submission"], timeout=20) as client:
        client.starttls(context=tls_context(stack))
        client.login(user, env.demo["user_password"])
        client.sendmail(user, [to], f"From: {user}\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nLeaving Rempart.\r\n")


def test_r_out_1_r_tls_4_submission_to_remote_domain_reaches_its_mx_over_tls(env: Env) -> None:
    subject = f"out-{uuid.uuid4().hex[:8]}"
    submit(env, "bob@remote.test", subject)
    mail_from, rcpts, data, tls = env.sink.wait_for(subject)
    assert mail_from == env.demo["user"] and rcpts == ["bob@remote.test"]
    assert tls, "the sink offers STARTTLS: the relay must use it"
    assert b"Leaving Rempart." in data and b"Received: from " in data
    assert not data.startswith(b"Return-Path:")
    log = env.relay_log.read_text()
    # The stack's certificate does not verify for mx.remote.test: encrypted all the same, and said so.
    assert "Client session SSL: Not verified (" in log and ") - proceed anyway" in log


def test_r_dns_6_forwarded_copy_leaves_with_srs_sender(env: Env) -> None:
    status, body = env.admin.call("POST", "/v1/aliases", {"alias": f"fwd@{DOMAIN}", "targets": ["far@remote.test"]})
    assert status in (200, 201), body
    status, body = env.admin.call("PATCH", "/v1/settings", {"dns": {"srs_enabled": True}})
    assert status == 200, body
    subject = f"srs-{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + 20
    while True:  # the edge and policy pick the new settings up within seconds
        with smtplib.SMTP("127.0.0.1", env.stack.ports["smtp-edge.smtp"], timeout=20) as client:
            client.sendmail("someone@sender.test", [f"fwd@{DOMAIN}"],
                            f"From: someone@sender.test\r\nSubject: {subject}\r\n\r\nforwarded\r\n")
        mail_from, rcpts, _data, _tls = env.sink.wait_for(subject)
        if mail_from.startswith("SRS0=") or time.monotonic() > deadline:
            break
        subject = f"srs-{uuid.uuid4().hex[:8]}"
        time.sleep(1)
    assert mail_from.startswith("SRS0=") and mail_from.endswith(f"@{DOMAIN}"), mail_from
    assert rcpts == ["far@remote.test"]


def test_r_out_2_remote_550_returns_a_dsn_the_sender_reads_over_imap(env: Env) -> None:
    subject = f"bounce-{uuid.uuid4().hex[:8]}"
    submit(env, "nobody@remote.test", subject)
    stack = env.stack
    deadline = time.monotonic() + 30
    found = b""
    while not found and time.monotonic() < deadline:
        imap = imaplib.IMAP4("127.0.0.1", stack.ports["imap-pop.imap"], timeout=20)
        imap.starttls(ssl_context=tls_context(stack))
        imap.login(env.demo["user"], env.demo["user_password"])
        imap.select("INBOX")
        _typ, data = imap.search(None, "ALL")
        for num in data[0].split():
            _typ, fetched = imap.fetch(num, "(RFC822)")
            raw = fetched[0][1]
            if isinstance(raw, bytes) and subject.encode() in raw and b"delivery-status" in raw:
                found = raw
        imap.logout()
        if not found:
            time.sleep(0.5)
    assert found, "no DSN in the sender's INBOX"
    dsn = email.message_from_bytes(found, policy=email.policy.default)
    assert dsn.get_content_type() == "multipart/report" and dsn.get_param("report-type") == "delivery-status"
    status = next(p for p in dsn.walk() if p.get_content_type() == "message/delivery-status")
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    assert str(blocks[1]["Final-Recipient"]) == "rfc822; nobody@remote.test"
    assert str(blocks[1]["Status"]) == "5.1.1" and str(blocks[1]["Action"]) == "failed"


def test_r_out_5_submitted_mail_leaves_dkim_signed_with_rsa_and_ed25519(env: Env) -> None:
    """Keys made through the admin API, their records published as the API says: the remote
    receives the user's message with two signatures that dkimpy verifies against DNS."""
    for algorithm in ("rsa-sha256", "ed25519-sha256"):
        status, body = env.admin.call("POST", f"/v1/domains/{DOMAIN}/dkim-keys", {"algorithm": algorithm})
        assert status == 201 and isinstance(body, dict), body
        assert "PRIVATE" not in str(body)
        key: dict[str, str] = body
        env.dns.set(key["dns_name"], "TXT", " ".join(re.findall(r'"[^"]*"', key["txt_record"])))
    resolver = dns.resolver.Resolver(configure=False)
    host, port = env.dns.address.rsplit(":", 1)
    resolver.nameservers, resolver.port = [host], int(port)

    def get_txt(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode(), "TXT", lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)  # type: ignore[attr-defined]

    deadline = time.monotonic() + 30
    while True:  # the relays see new keys within a second or two
        subject = f"dkim-{uuid.uuid4().hex[:8]}"
        submit(env, "bob@remote.test", subject)
        _mail_from, _rcpts, data, tls = env.sink.wait_for(subject)
        if data.count(b"DKIM-Signature:") == 2 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert tls and data.count(b"DKIM-Signature:") == 2, data[:600]
    assert b"a=rsa-sha256" in data and b"a=ed25519-sha256" in data and f"d={DOMAIN}".encode() in data
    assert [dkim.DKIM(data).verify(idx=i, dnsfunc=get_txt) for i in range(2)] == [True, True]
