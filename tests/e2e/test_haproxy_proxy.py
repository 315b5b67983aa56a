"""Edge replicas behind haproxy with PROXY protocol v2 (R-OPS-2, issue 5).

Two smtp-edge replicas share the e2e stack's Redis, NATS, policy and auth, and trust PROXY
headers from 127.0.0.1 only; haproxy (``mode tcp``, round robin, ``send-proxy-v2``) sits in front
of them as a cloud TCP load balancer would. Clients bind distinct loopback source addresses
(127.0.0.7, 127.0.0.8, ...), so the address each replica sees proves where it came from: an
intrusion block earned through haproxy on both replicas holds on both, the Received header names
the client, and no decision line names haproxy as the client.
"""

from __future__ import annotations

import ipaddress
import json
import poplib
import re
import shutil
import smtplib
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rempart.common.testing.devstack import AdminApi, Stack
from rempart.common.testing.localstack import free_port
from rempart.common.testing.replicas import Haproxy, Replica, start_edge_replica, start_haproxy, wait_ready

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mail_clients import tls_context, unblock

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="haproxy is not installed (Debian package haproxy; CI installs it)")

BLOCKED_CLIENT, OTHER_CLIENT, SWAKS_CLIENT, TLS_CLIENT = "127.0.0.7", "127.0.0.8", "127.0.0.9", "127.0.0.10"
LOAD_BALANCER = "127.0.0.1"
DOMAIN = "example.test"  # the demo domain (devstack.bootstrap_demo)
IPS_ACTIVE = "421 4.0.0 Intrusion prevention active for [{ip}]"


@dataclass
class Edges:
    replicas: list[Replica]
    haproxy: Haproxy
    mx_port: int  # haproxy, plain TCP to the replicas' MX listeners
    smtps_port: int  # haproxy terminating TLS, to the replicas' MX listeners
    admin: AdminApi


def haproxy_config(replicas: list[Replica], mx_port: int, smtps_port: int, pem: Path) -> str:
    mx = "\n".join(f"    server {r.instance} 127.0.0.1:{r.ports['smtp']} send-proxy-v2" for r in replicas)
    # Port 465 this way (RFC 8314 implicit TLS at the load balancer): haproxy holds the
    # certificate (``ssl crt``) and forwards the clear session to the edge's MX listener with
    # ``send-proxy-v2-ssl``, whose TLVs say the client used TLS. In Kubernetes: a haproxy (or
    # cloud LB with TLS listener) Deployment in front of the smtp-edge Service's port 25, with
    # proxyProtocol.trustedCidrs naming the haproxy pods' range. The edge's own 2465 listener
    # (TLS in the pod, plain send-proxy-v2 on the LB) is the other way and needs no certificate
    # on the load balancer.
    smtps = "\n".join(f"    server {r.instance} 127.0.0.1:{r.ports['smtp']} send-proxy-v2-ssl" for r in replicas)
    return f"""global
    nbthread 1
    maxconn 200

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend mx
    bind 127.0.0.1:{mx_port}
    default_backend edges_mx

backend edges_mx
    balance roundrobin
{mx}

frontend smtps
    bind 127.0.0.1:{smtps_port} ssl crt {pem}
    default_backend edges_smtps

backend edges_smtps
    balance roundrobin
{smtps}
"""


@pytest.fixture(scope="module")
def edges(stack: Stack, demo: dict[str, str]) -> Iterator[Edges]:
    replicas: list[Replica] = []
    haproxy: Haproxy | None = None
    # One admin session for the module: it reads the block and lifts it at the end.
    admin = AdminApi(f"http://127.0.0.1:{stack.ports['admin-api.http']}")
    admin.login(stack.admin_email, stack.admin_password)
    try:
        for instance in ("edge-lb-a", "edge-lb-b"):
            replicas.append(start_edge_replica(stack, instance, {"REMPART_PROXY_PROTOCOL_CIDRS": f"{LOAD_BALANCER}/32"}))
        wait_ready(replicas)
        pem = stack.workdir / "haproxy" / "edge.pem"
        pem.parent.mkdir(exist_ok=True)
        pem.write_text(Path(stack.cert_file).read_text() + Path(stack.key_file).read_text())
        pem.chmod(0o600)
        mx_port, smtps_port = free_port(), free_port()
        haproxy = start_haproxy(stack.workdir / "haproxy", haproxy_config(replicas, mx_port, smtps_port, pem),
                                [mx_port, smtps_port])
        yield Edges(replicas, haproxy, mx_port, smtps_port, admin)
    finally:
        if haproxy is not None:
            haproxy.stop()
        for replica in replicas:
            replica.terminate()
        exits = {replica.instance: replica.stop() for replica in replicas}
        # The block must not leak into other tests of the session.
        unblock(admin, [BLOCKED_CLIENT, OTHER_CLIENT, SWAKS_CLIENT, TLS_CLIENT])
        assert all(code == 0 for code in exits.values()), f"replicas did not drain cleanly on SIGTERM: {exits}"


class LineClient:
    """A bare SMTP client from a chosen source address: reads replies exactly as sent."""

    def __init__(self, port: int, source: str, timeout: float = 15.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
        self.file = self.sock.makefile("rb")

    def reply(self) -> str:
        """One reply (continuation lines joined with newlines); "" when the server closed."""
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                break
            lines.append(line.decode(errors="replace").rstrip("\r\n"))
            if len(line) < 4 or line[3:4] != b"-":
                break
        return "\n".join(lines)

    def command(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def unknown_recipients_session(port: int, source: str, recipients: list[str]) -> list[str]:
    client = LineClient(port, source)
    try:
        replies = [client.reply()]
        assert replies[0].startswith("220 "), replies
        # An address-literal HELO and the null sender: no DNS-based check has a name to look up.
        replies.append(client.command(f"EHLO [{source}]"))
        replies.append(client.command("MAIL FROM:<>"))
        assert replies[-1].startswith("250 "), replies
        for rcpt in recipients:
            replies.append(client.command(f"RCPT TO:<{rcpt}>"))
            if not replies[-1] or replies[-1].startswith("421 "):
                break
        return replies
    finally:
        client.close()


def records_naming(replica: Replica, since: int, ip: str, msg: str) -> list[dict[str, object]]:
    return [r for r in replica.log_records(since) if r.get("client_ip") == ip and r.get("msg") == msg]


IPV4 = re.compile(r"(?<![\d.])(\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3})(?![\d.])")


def client_addresses(record: dict[str, object]) -> set[str]:
    """Every IPv4 address a log line carries, in any field or in its text."""
    found = set()
    for candidate in IPV4.findall(json.dumps(record)):
        try:
            ipaddress.ip_address(candidate)
        except ValueError:
            continue
        found.add(candidate)
    return found


def test_r_ops_2_r_ips_3_block_earned_through_haproxy_holds_on_both_replicas(edges: Edges) -> None:
    offsets = [r.log_offset() for r in edges.replicas]
    unknown = [f"nobody-{uuid.uuid4().hex[:8]}-{n}@{DOMAIN}" for n in range(4)]

    # Two sessions, which haproxy's round robin hands to different replicas: 2 + 2 unknown
    # recipients, more than the default 3 (R-IPS-3), counted across sessions and replicas (R-IPS-1).
    first = unknown_recipients_session(edges.mx_port, BLOCKED_CLIENT, unknown[:2])
    assert first[-2:] == [f"550 5.1.1 <{unknown[0]}>... Unknown user", f"550 5.1.1 <{unknown[1]}>... Unknown user"], first
    second = unknown_recipients_session(edges.mx_port, BLOCKED_CLIENT, unknown[2:])
    assert second[-2] == f"550 5.1.1 <{unknown[2]}>... Unknown user", second
    # R-IPS-4: the recipient that trips the block closes the connection that tripped it.
    assert second[-1] == IPS_ACTIVE.format(ip=BLOCKED_CLIENT), second
    for replica, since in zip(edges.replicas, offsets, strict=True):
        assert records_naming(replica, since, BLOCKED_CLIENT, "refused"), (
            f"{replica.instance} saw none of {BLOCKED_CLIENT}'s recipients: the sessions were not spread\n"
            + replica.log_tail())

    status, block = edges.admin.call("GET", f"/v1/ips/blocks/{BLOCKED_CLIENT}")
    assert status == 200, block

    # A new connection from the blocked client is refused at connect, whichever replica gets it.
    for _ in edges.replicas:
        client = LineClient(edges.mx_port, BLOCKED_CLIENT)
        try:
            assert client.reply() == IPS_ACTIVE.format(ip=BLOCKED_CLIENT)
            assert client.closed()
        finally:
            client.close()
    for replica, since in zip(edges.replicas, offsets, strict=True):
        assert records_naming(replica, since, BLOCKED_CLIENT, "connection refused"), (
            f"{replica.instance} did not refuse {BLOCKED_CLIENT} at connect\n" + replica.log_tail())

    # Another client behind the same load balancer is not affected, on either replica.
    for _ in edges.replicas:
        client = LineClient(edges.mx_port, OTHER_CLIENT)
        try:
            greeting = client.reply()
            assert greeting.startswith("220 "), greeting
            assert client.command("QUIT").startswith("221 ")
        finally:
            client.close()

    # Every decision line of both replicas names the real client, never haproxy.
    for replica, since in zip(edges.replicas, offsets, strict=True):
        records = [r for r in replica.log_records(since) if str(r.get("logger", "")).startswith("rempart")]
        assert any(BLOCKED_CLIENT in client_addresses(r) for r in records), replica.log_tail()
        assert_only_clients(replica, records, {BLOCKED_CLIENT, OTHER_CLIENT})


def assert_only_clients(replica: Replica, records: list[dict[str, object]], clients: set[str]) -> None:
    for record in records:
        named = client_addresses(record)
        assert named <= clients, f"{replica.instance} names {sorted(named - clients)} as the client: {record}"


def test_r_ops_2_no_log_line_names_the_load_balancer_as_client(edges: Edges) -> None:
    offsets = [r.log_offset() for r in edges.replicas]
    for _ in edges.replicas:
        client = LineClient(edges.mx_port, OTHER_CLIENT)
        try:
            assert client.reply().startswith("220 ")
            assert client.command(f"EHLO [{OTHER_CLIENT}]").startswith("250")
            assert client.command("QUIT").startswith("221 ")
        finally:
            client.close()
    for replica, since in zip(edges.replicas, offsets, strict=True):
        assert_only_clients(replica, replica.log_records(since), {OTHER_CLIENT})


def proxy_v2_header(source: str, source_port: int, dest: str, dest_port: int) -> bytes:
    """A PROXY protocol v2 header (haproxy's proxy-protocol.txt, section 2.2): PROXY, TCP/IPv4."""
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    addresses = socket.inet_aton(source) + socket.inet_aton(dest) + struct.pack("!HH", source_port, dest_port)
    return signature + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


def test_r_ops_2_listener_behind_load_balancer_requires_the_proxy_header(edges: Edges) -> None:
    """From the trusted load balancer address but without a header: no greeting, closed."""
    replica = edges.replicas[0]
    with socket.create_connection(("127.0.0.1", replica.ports["smtp"]), timeout=15,
                                  source_address=(LOAD_BALANCER, 0)) as sock:
        sock.sendall(b"EHLO client.example\r\n")
        assert sock.recv(1024) == b""


def test_r_ops_2_proxy_header_from_untrusted_address_is_refused(edges: Edges) -> None:
    """A valid header from an address outside REMPART_PROXY_PROTOCOL_CIDRS would let anyone
    pick the address every rule sees: no greeting, closed."""
    replica = edges.replicas[1]
    since = replica.log_offset()
    with socket.create_connection(("127.0.0.1", replica.ports["smtp"]), timeout=15,
                                  source_address=(OTHER_CLIENT, 0)) as sock:
        sock.sendall(proxy_v2_header("198.51.100.7", 40000, "127.0.0.1", replica.ports["smtp"]))
        assert sock.recv(1024) == b""
    assert any(r.get("msg") == "PROXY header from an untrusted peer" and r.get("peer") == OTHER_CLIENT
               for r in replica.log_records(since)), replica.log_tail()


def fetch_by_subject(stack: Stack, demo: dict[str, str], subject: str, timeout: float = 15.0) -> list[bytes]:
    """The message with ``subject`` in the peer's mailbox, read over POP3 (STLS), then deleted."""
    deadline = time.monotonic() + timeout
    while True:
        pop = poplib.POP3("127.0.0.1", stack.ports["imap-pop.pop3"], timeout=20)
        try:
            pop.stls(context=tls_context(stack))
            pop.user(demo["peer"])
            pop.pass_(demo["peer_password"])
            count, _ = pop.stat()
            for n in range(1, count + 1):
                _, lines, _ = pop.retr(n)
                if f"Subject: {subject}".encode() in lines:
                    pop.dele(n)
                    return list(lines)
        finally:
            pop.quit()
        if time.monotonic() > deadline:
            raise AssertionError(f"no message with Subject: {subject} in {demo['peer']}'s mailbox")
        time.sleep(0.5)


def received_headers(lines: list[bytes]) -> list[str]:
    """The unfolded Received headers of a message given as lines."""
    headers: list[str] = []
    for line in lines:
        if not line:
            break
        text = line.decode(errors="replace")
        if text[:1] in (" ", "\t") and headers:
            headers[-1] += " " + text.strip()
        else:
            headers.append(text)
    return [h for h in headers if h.lower().startswith("received:")]


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed (Debian package swaks)")
def test_r_ops_2_swaks_proxy_v2_source_is_the_received_client(
        stack: Stack, demo: dict[str, str], edges: Edges) -> None:
    replica = edges.replicas[0]
    subject = f"proxied-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{replica.ports['smtp']}",
         "--proxy-version", "2", "--proxy-family", "AF_INET", "--proxy-source", SWAKS_CLIENT,
         "--proxy-source-port", "40025", "--proxy-dest", "127.0.0.1", "--proxy-dest-port", "25",
         "--ehlo", f"[{SWAKS_CLIENT}]", "--from", "<>", "--to", demo["peer"],
         "--header", f"Subject: {subject}", "--body", "Sent through a PROXY v2 header."],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<-  250 2.0.0 Ok: queued as" in result.stdout, result.stdout
    received = received_headers(fetch_by_subject(stack, demo, subject))
    assert received, "no Received header"
    assert f"[{SWAKS_CLIENT}]" in received[0], received[0]
    assert "127.0.0.1" not in received[0], received[0]


def test_r_tls_1_smtps_terminated_at_haproxy_with_send_proxy_v2_ssl(
        stack: Stack, demo: dict[str, str], edges: Edges) -> None:
    subject = f"lb-tls-{uuid.uuid4().hex[:8]}"
    with smtplib.SMTP_SSL("127.0.0.1", edges.smtps_port, context=tls_context(stack), timeout=20,
                          source_address=(TLS_CLIENT, 0)) as client:
        code, _ = client.ehlo(f"[{TLS_CLIENT}]")
        assert code == 250
        # PP2_TYPE_SSL tells the edge the client used TLS: no STARTTLS offered, AUTH allowed.
        assert not client.has_extn("starttls")
        client.login(demo["user"], demo["user_password"])
        refused = client.sendmail(demo["user"], [demo["peer"]],
                                  f"To: {demo['peer']}\r\nSubject: {subject}\r\n\r\nTLS ended at haproxy.\r\n")
        assert refused == {}
    received = received_headers(fetch_by_subject(stack, demo, subject))
    # The client's address crossed haproxy's TLS termination in the PROXY v2 header.
    assert f"[{TLS_CLIENT}]" in received[0], received[0]
    assert "with ESMTPSA" in received[0] and "(using TLSv1." in received[0], received[0]
