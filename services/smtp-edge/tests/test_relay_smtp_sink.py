"""The outbound relay against a receiving server that is not ours: Debian's ``smtp-sink``
(the postfix package), Postfix's own test server, as the remote domain's MX on loopback, found
through the loopback DNS server, with real Redis and NATS JetStream.

smtp-sink has no TLS (it offers no STARTTLS), so the relay must deliver in plain text; it does
offer 8BITMIME, DSN and PIPELINING, and with ``-d`` writes every transaction it receives to a
file: its own headers (``X-Helo-Args``, ``X-Mail-Args``, one ``X-Rcpt-Args`` per RCPT, then a
three-line ``Received:``) followed by the message as received, dot-stuffing undone, lines
ending in LF. Skipped, with the reason, where smtp-sink is not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from rempart.common.mailstore import MessageStore
from rempart.common.testing.dnsserver import LoopbackDnsServer
from rempart.common.testing.localstack import free_port, wait_for_port
from rempart.common.testing.polling import eventually

from .test_relay import configure, running_relay, store, zone

__all__ = ["store"]  # the fixture, shared with test_relay
pytestmark = pytest.mark.skipif(shutil.which("smtp-sink") is None,
                                reason="smtp-sink is not installed (Debian package postfix)")

MX_NAME = "mx.remote.test"


@dataclass
class Dump:
    """One transaction as smtp-sink wrote it."""

    helo: str
    mail_args: str
    rcpt_args: list[str]
    message: bytes


@dataclass
class SmtpSink:
    proc: subprocess.Popen[bytes]
    port: int
    directory: Path

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.rglob("*") if p.is_file())

    def dumps(self) -> list[Dump]:
        """Read once the relay has stopped: every transaction it sent has had its reply by then."""
        return [parse_dump(path.read_bytes()) for path in self.files()]


def parse_dump(raw: bytes) -> Dump:
    # smtp-sink's headers end with its three-line Received: header; the message follows.
    match = re.search(rb"^Received: from .*\n\tby .*\(smtp-sink\).*\n\t.*\n", raw, re.M)
    assert match is not None, raw[:400]
    head = raw[:match.start()].decode()
    fields = [line.split(": ", 1) for line in head.splitlines()]
    return Dump(
        helo=next(v for k, v in fields if k == "X-Helo-Args"),
        mail_args=next(v for k, v in fields if k == "X-Mail-Args"),
        rcpt_args=[v for k, v in fields if k == "X-Rcpt-Args"],
        message=raw[match.end():],
    )


@pytest.fixture
def smtp_sink(tmp_path: Path) -> Iterator[SmtpSink]:
    """``smtp-sink -d`` on a free loopback port, one file per transaction under tmp_path."""
    port = free_port()
    directory = tmp_path / "sink"
    command = ["smtp-sink", "-4", "-h", MX_NAME, "-d", f"{directory}/%Y%m%d%H%M%S."]
    if os.geteuid() == 0:
        command += ["-u", "root"]  # required when started by root; root keeps tmp_path writable
    proc = subprocess.Popen([*command, f"127.0.0.1:{port}", "64"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        wait_for_port("127.0.0.1", port, timeout=10, proc=proc)
        yield SmtpSink(proc, port, directory)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def plain_sessions() -> float:
    return REGISTRY.get_sample_value("rempart_relay_sessions_total", {"tls": "none"}) or 0.0


async def test_r_out_1_r_tls_4_delivery_to_postfix_smtp_sink_in_plain_text(
        redis_url: str, nats_url: str, redis: aioredis.Redis, store: MessageStore, smtp_sink: SmtpSink) -> None:
    """smtp-sink offers no STARTTLS: the message leaves in plain text and arrives whole (an 8-bit
    body announced with BODY=8BITMIME, a line starting with a dot, no Return-Path), with the
    relay's HELO name and the RFC 3461 parameters the sender gave, as the remote offers DSN."""
    await configure(redis)
    message = (
        "From: Alice <alice@example.org>\r\nTo: Bob <bob@remote.test>\r\nSubject: to smtp-sink\r\n"
        "Message-ID: <sink-1@example.org>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\nCafé, crème brûlée.\r\n.a line that starts with a dot\r\n"
        "..and one with two\r\nThe end.\r\n"
    ).encode()
    dsn = {"RET": "HDRS", "ENVID": "sink-env-1", "NOTIFY:bob@remote.test": "FAILURE,DELAY",
           "ORCPT:bob@remote.test": "rfc822;bob@remote.test"}
    plain_before = plain_sessions()
    async with LoopbackDnsServer(zone("remote.test")) as dns:
        async with running_relay(redis_url, nats_url, dns, smtp_sink.port):
            await store.accept(b"Return-Path: <alice@example.org>\r\n" + message, mail_from="alice@example.org",
                               local_mailboxes=[], remote_recipients=["bob@remote.test", "carol@remote.test"],
                               dsn=dsn)
            await eventually(lambda: bool(smtp_sink.files()), what="a transaction in smtp-sink's dump")
        assert dns.asked("remote.test", "MX") >= 1
    [dump] = smtp_sink.dumps()
    assert dump.helo == "relay.example.org"
    mail_args = dump.mail_args.split()
    assert mail_args[0] == "<alice@example.org>"
    assert {"BODY=8BITMIME", "RET=HDRS", "ENVID=sink-env-1"} <= set(mail_args[1:])
    assert sorted(dump.rcpt_args) == ["<bob@remote.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;bob@remote.test",
                                      "<carol@remote.test>"]
    # smtp-sink writes lines with LF and one empty line after the message.
    assert dump.message == message.replace(b"\r\n", b"\n") + b"\n"
    assert plain_sessions() - plain_before == 1, "one plain-text session (smtp-sink offers no STARTTLS)"


async def test_r_out_1_many_messages_reach_smtp_sink_once_each(
        redis_url: str, nats_url: str, redis: aioredis.Redis, store: MessageStore, smtp_sink: SmtpSink) -> None:
    """Forty messages queued at once, delivered over parallel sessions: each arrives exactly once."""
    await configure(redis, max_connections_per_domain=4)
    count = 40
    async with LoopbackDnsServer(zone("remote.test")) as dns:
        async with running_relay(redis_url, nats_url, dns, smtp_sink.port):
            for i in range(count):
                body = (f"From: alice@example.org\r\nTo: u{i}@remote.test\r\nSubject: load {i}\r\n"
                        f"Message-ID: <load-{i}@example.org>\r\n\r\nmessage {i}\r\n").encode()
                await store.accept(body, mail_from="alice@example.org", local_mailboxes=[],
                                   remote_recipients=[f"u{i}@remote.test"])
            await eventually(lambda: len(smtp_sink.files()) >= count, timeout=60, what=f"{count} transactions")
    arrived: dict[int, list[str]] = {}
    for dump in smtp_sink.dumps():
        found = re.search(rb"^Message-ID: <load-(\d+)@example.org>$", dump.message, re.M)
        assert found is not None, dump.message[:300]
        assert int(found.group(1)) not in arrived, f"message {found.group(1)!r} arrived twice"
        arrived[int(found.group(1))] = dump.rcpt_args
    assert arrived == {i: [f"<u{i}@remote.test>"] for i in range(count)}
