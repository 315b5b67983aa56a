"""The relay as the chart runs it: ``python -m rempart.smtp_edge.relay`` in its own process,
its ops port, SIGTERM drain, and a ``kill -9`` in the middle of a 1,000-message delivery
(R-OUT-3: every message arrives after the restart; a duplicate is possible only where the
remote never answered the final dot, and each one is counted)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session
from nats.aio.client import Client as NATS

from rempart.common.mailstore import MessageStore
from rempart.common.testing.dnsserver import LoopbackDnsServer
from rempart.common.testing.localstack import free_port

MESSAGES = 1000


class CountingSink:
    def __init__(self) -> None:
        self.ids: Counter[str] = Counter()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = bytes(envelope.original_content or b"")
        match = re.search(rb"^Message-ID: <([^>]+)>", data, re.M)
        await asyncio.sleep(0.005)  # a remote that takes its time, so the kill lands mid-flow
        self.ids[match.group(1).decode() if match else "?"] += 1
        return "250 2.0.0 Ok"


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def tail(log: Path, size: int = 3000) -> str:
    return log.read_text()[-size:]


def start_relay(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REMPART_")} | env
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "rempart.smtp_edge.relay"], env=clean,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


async def wait_ready(proc: subprocess.Popen[bytes], ops_port: int, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"relay exited {proc.returncode}:\n{tail(log)}")
        try:
            status, body = await asyncio.to_thread(http_get, ops_port, "/readyz")
            if status == 200:
                return
            last = body
        except OSError as exc:
            last = str(exc)
        await asyncio.sleep(0.2)
    raise AssertionError(f"relay not ready: {last}\n{tail(log)}")


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def test_r_out_3_kill_9_during_1000_deliveries_loses_nothing(
        redis_url: str, nats_url: str, nats_conn: NATS, tmp_path: Path) -> None:
    sink = CountingSink()
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(sink, hostname="sink.remote.test"), host="127.0.0.1", port=0)
    port = int(server.sockets[0].getsockname()[1])
    records = {"remote.test": {"MX": ["10 mx.remote.test."]}, "mx.remote.test": {"A": ["127.0.0.1"]}}
    async with LoopbackDnsServer(records) as dns:
        env = {
            "REMPART_REDIS_URL": redis_url, "REMPART_NATS_URL": nats_url, "REMPART_ENVIRONMENT": "test",
            "REMPART_OPS_HOST": "127.0.0.1", "REMPART_LOG_FORMAT": "text", "REMPART_HOSTNAME": "relay.example.org",
            "REMPART_DNS_NAMESERVERS": dns.address, "REMPART_MX_PORT": str(port),
            "REMPART_ACK_WAIT_SECONDS": "5", "REMPART_SHUTDOWN_GRACE_SECONDS": "3",
        }
        log = tmp_path / "relay.log"
        ops_first = free_port()
        first = start_relay(env | {"REMPART_OPS_PORT": str(ops_first)}, log)
        try:
            await wait_ready(first, ops_first, log)
            assert (await asyncio.to_thread(http_get, ops_first, "/healthz"))[0] == 200
            store = await MessageStore.open(nats_conn.jetstream())
            started = time.monotonic()
            for i in range(MESSAGES):
                body = (f"From: a@example.org\r\nTo: b@remote.test\r\nMessage-ID: <m{i}@example.org>\r\n"
                        f"Subject: load {i}\r\n\r\nmessage {i}\r\n").encode()
                await store.accept(body, mail_from="a@example.org", local_mailboxes=[],
                                   remote_recipients=[f"user{i % 7}@remote.test"])
            while sum(sink.ids.values()) < MESSAGES // 3:
                assert time.monotonic() - started < 60, "the first relay delivers nothing"
                await asyncio.sleep(0.05)
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            delivered_before_kill = sum(sink.ids.values())
        finally:
            if first.poll() is None:
                first.kill()
        ops_second = free_port()
        second = start_relay(env | {"REMPART_OPS_PORT": str(ops_second)}, log)
        try:
            await wait_ready(second, ops_second, log)
            deadline = time.monotonic() + 90
            while len(sink.ids) < MESSAGES:
                assert time.monotonic() < deadline, f"{len(sink.ids)}/{MESSAGES} arrived after the restart"
                await asyncio.sleep(0.1)
            elapsed = time.monotonic() - started
            _status, metrics = await asyncio.to_thread(http_get, ops_second, "/metrics")
            second.send_signal(signal.SIGTERM)
            assert second.wait(15) == 0, tail(log)
        finally:
            if second.poll() is None:
                second.kill()
        server.close()
    duplicates = sum(n - 1 for n in sink.ids.values())
    possible = metric(metrics, "rempart_relay_possible_duplicates_total")
    print(f"\n{MESSAGES} messages, killed after {delivered_before_kill}: all arrived in {elapsed:.1f} s, "
          f"{duplicates} duplicate(s), {possible:.0f} counted as possible")
    assert set(sink.ids) == {f"m{i}@example.org" for i in range(MESSAGES)}
    assert duplicates <= possible, "a duplicate the relay did not count"
    assert "rempart_relay_queue_depth" in metrics
