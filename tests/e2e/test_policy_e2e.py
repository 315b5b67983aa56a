"""Every policy rule (issue 3) proven end to end: real SMTP sessions through the edge, decided by
the policy service over gRPC, against real Redis, NATS and DNS packets on loopback.

This module runs its own stack (not the shared e2e one), because it changes server settings and
points the policy service at a DNS server it starts (``REMPART_DNS_NAMESERVERS``). Clients bind
distinct loopback source addresses (``127.0.0.x``): 127.0.0.1 is a trusted host by default, every
other address is an untrusted stranger, so each test gets its own IP and its blocks and counters
never meet another test's. DNS rules apply to unauthenticated, untrusted sessions only, so even
the non-DNS tests send from domains the test DNS server serves.
"""

from __future__ import annotations

import asyncio
import imaplib
import random
import re
import smtplib
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from rempart.common.testing.devstack import AdminApi, Stack, bootstrap_demo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from policy_harness import (
    DnsThread,
    SettingsWatcher,
    SourcedImap,
    admin_for,
    data_reply,
    header_section,
    logout_quietly,
    message,
    mx,
    quit_quietly,
    raw_command,
    rcpt_reply,
    reply,
    reverse_v4,
    submission,
    version_of,
    wait_for_message,
)

from rempart.common.testing.replicas import Replica, start_edge_replica, start_policy_replica, start_ready

DOMAIN = "example.test"
SENDER = "alice@sender.test"  # a remote sender whose domain exists (MX), without SPF record
DNSBL_ZONE = "dnsbl.rempart.test"
REPUTATION_ZONE = "reputation.rempart.test"
IPS_ACTIVE = "421 4.0.0 Intrusion prevention active for [{ip}]"


def zone() -> dict[str, dict[str, list[str]]]:
    return {
        "sender.test": {"MX": ["10 mx.sender.test."]},
        "mx.sender.test": {"A": ["192.0.2.25"]},
        "spf-pass.test": {"MX": ["10 mx.sender.test."], "TXT": ['"v=spf1 ip4:127.0.0.0/8 -all"']},
        "spf-fail.test": {"MX": ["10 mx.sender.test."], "TXT": ['"v=spf1 ip4:192.0.2.0/24 -all"']},
        # R-DNS-3: 127.0.0.33 has a forward-confirmed PTR, 127.0.0.32 has none.
        f"{reverse_v4('127.0.0.33')}.in-addr.arpa": {"PTR": ["mail.good-host.test."]},
        "mail.good-host.test": {"A": ["127.0.0.33"]},
        # R-DNS-2: the reputation zone calls 127.0.0.41 blacklisted and 127.0.0.42 greylisted.
        f"{reverse_v4('127.0.0.41')}.{REPUTATION_ZONE}": {"A": ["127.0.0.2"]},
        f"{reverse_v4('127.0.0.42')}.{REPUTATION_ZONE}": {"A": ["127.0.0.3"]},
        # R-DNS-1: 127.0.0.31 is listed (RFC 5782: 127.0.0.2 means listed).
        f"{reverse_v4('127.0.0.31')}.{DNSBL_ZONE}": {"A": ["127.0.0.2"], "TXT": ['"listed for the test"']},
    }


@dataclass
class Env:
    stack: Stack
    demo: dict[str, str]
    admin: AdminApi
    dns: DnsThread
    watcher: SettingsWatcher

    def wait_applied(self, version: int) -> float:
        return self.watcher.wait(version)

    def patch(self, doc: dict[str, object]) -> int:
        """Deep-merge ``doc`` into the server settings and wait until policy and edge use it."""
        version = version_of(*self.admin.call("PATCH", "/v1/settings", doc))
        self.wait_applied(version)
        return version

    def put_domain(self, doc: dict[str, object]) -> int:
        status, body = self.admin.call("PUT", f"/v1/domains/{DOMAIN}/settings", doc)
        version = version_of(status, body)
        self.wait_applied(version)
        return version

    @contextmanager
    def settings(self, doc: dict[str, object]) -> Iterator[None]:
        """Server settings changed for the block, then put back as they were."""
        status, before = self.admin.call("GET", "/v1/settings")
        assert status == 200 and isinstance(before, dict), (status, before)
        self.patch(doc)
        try:
            yield
        finally:
            self.wait_applied(version_of(*self.admin.call("PUT", "/v1/settings", before["settings"])))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    dns = DnsThread(zone())
    # gRPC on loopback only: a wildcard bind also collides with client sockets on that port.
    extra_env = {"REMPART_DNS_NAMESERVERS": dns.address, "REMPART_GRPC_HOST": "127.0.0.1"}
    stack = Stack(workdir=tmp_path_factory.mktemp("policy-stack"), log_format="json", extra_env=extra_env)
    try:
        for attempt in (1, 2):
            try:
                stack.start()
                break
            except RuntimeError:
                # A free port can be taken by another process before the service binds it
                # (free_port cannot reserve): start again on new ports, once.
                stack.stop()
                if attempt == 2:
                    raise
                stack = Stack(workdir=tmp_path_factory.mktemp("policy-stack"), log_format="json",
                              extra_env=extra_env)
        demo = bootstrap_demo(stack)
        watcher = SettingsWatcher([stack.workdir / "policy.log", stack.workdir / "smtp-edge.log"])
        yield Env(stack, demo, admin_for(stack), dns, watcher)
    finally:
        stack.stop()
        dns.close()


def unknown_user(address: str) -> str:
    return f"550 5.1.1 <{address}>... Unknown user"


def not_relayed(sender: str, recipient: str) -> str:
    return f"550 5.7.1 <{sender}>... we do not relay <{recipient}>"


def refused_at_connect(stack: Stack, ip: str, port: int | None = None) -> str:
    """The reply of a connection refused before the greeting."""
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        mx(stack, ip, port)
    return reply(refused.value.smtp_code, refused.value.smtp_error)


def subject() -> str:
    return f"policy-{uuid.uuid4().hex[:10]}"


# R-REL: relaying and sender control --------------------------------------------------------------
def test_r_rel_1_unauthenticated_relay_refused(env: Env) -> None:
    client = mx(env.stack, "127.0.0.11")
    try:
        assert raw_command(client, f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
        assert rcpt_reply(client, "bob@remote.test") == not_relayed(SENDER, "bob@remote.test")
    finally:
        quit_quietly(client)
    # A trusted host (127.0.0.1, the default list) relays for a local sender; for a remote
    # sender it does not (R-REL-4, "relay only if sender domain is local", on by default).
    trusted = mx(env.stack, "127.0.0.1")
    try:
        assert raw_command(trusted, f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
        assert rcpt_reply(trusted, "bob@remote.test") == not_relayed(SENDER, "bob@remote.test")
        assert raw_command(trusted, "RSET") == "250 2.0.0 Ok"
        assert raw_command(trusted, f"MAIL FROM:<{env.demo['user']}>") == "250 2.1.0 Ok"
        assert rcpt_reply(trusted, "bob@remote.test") == "250 2.1.5 Ok"
    finally:
        quit_quietly(trusted)


def test_r_rel_2_local_sender_must_authenticate(env: Env) -> None:
    local_sender, recipient = env.demo["user"], env.demo["peer"]
    client = mx(env.stack, "127.0.0.12")
    try:
        assert raw_command(client, f"MAIL FROM:<{local_sender}>") == "250 2.1.0 Ok"
        assert rcpt_reply(client, recipient) == f"550 5.7.1 <{local_sender}> Access to <{recipient}> not allowed"
    finally:
        quit_quietly(client)


@pytest.mark.parametrize(
    ("ip", "recipient", "expected"),
    [
        ("127.0.0.21", "user%remote.test@example.test", unknown_user("user%remote.test@example.test")),
        ("127.0.0.22", "remote.test!user@example.test", unknown_user("remote.test!user@example.test")),
        ("127.0.0.23", '"user@remote.test"@example.test', unknown_user("user@remote.test@example.test")),
        ("127.0.0.24", "@example.test:user@remote.test", not_relayed(SENDER, "user@remote.test")),
        # A trailing dot is not RFC 5321 syntax: refused by the edge's parser before any lookup.
        ("127.0.0.25", "nobody-here@example.test.", "553 5.1.3 Error: malformed address"),
        ("127.0.0.26", "Bob@Remote.TEST", not_relayed(SENDER, "bob@remote.test")),
        ("127.0.0.27", "user@[1.2.3.4]", not_relayed(SENDER, "user@[1.2.3.4]")),
    ],
    ids=["percent", "bang", "quoted", "source-route", "trailing-dot", "mixed-case", "ip-literal"],
)
def test_r_rel_1_relay_tricks_refused(env: Env, ip: str, recipient: str, expected: str) -> None:
    client = mx(env.stack, ip)
    try:
        assert raw_command(client, f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
        assert raw_command(client, f"RCPT TO:<{recipient}>") == expected
    finally:
        quit_quietly(client)


# R-DOM: unknown recipients, aliases ---------------------------------------------------------------
def deliver(env: Env, ip: str, recipient: str, body_subject: str, sender: str = SENDER,
            extra_headers: str = "") -> tuple[str, str]:
    """One message from ``ip``: (RCPT reply, DATA reply); DATA only after a 250 RCPT."""
    client = mx(env.stack, ip)
    try:
        assert raw_command(client, f"MAIL FROM:<{sender}>") == "250 2.1.0 Ok"
        rcpt = rcpt_reply(client, recipient)
        if not rcpt.startswith("250"):
            return rcpt, ""
        return rcpt, data_reply(client, message(body_subject, sender, recipient, extra_headers))
    finally:
        quit_quietly(client)


def test_r_dom_1_unknown_user_550(env: Env) -> None:
    rcpt, _ = deliver(env, "127.0.0.13", f"ghost@{DOMAIN}", subject())
    assert rcpt == unknown_user(f"ghost@{DOMAIN}")

    peer, peer_password = env.demo["peer"], env.demo["peer_password"]
    try:
        # catch_all: the unknown address is accepted and lands in the named mailbox.
        env.put_domain({"recipients": {"unknown_recipient_action": "catch_all", "catch_all_address": peer}})
        caught = subject()
        rcpt, data = deliver(env, "127.0.0.14", f"ghost@{DOMAIN}", caught)
        assert rcpt == "250 2.1.5 Ok"
        assert data.startswith("250 2.0.0 Ok: queued as "), data
        assert b"To: ghost@example.test" in wait_for_message(env.stack, peer, peer_password, caught)

        # discard: accepted with 250, stored nowhere, no bounce.
        env.put_domain({"recipients": {"unknown_recipient_action": "discard"}})
        dropped = subject()
        rcpt, data = deliver(env, "127.0.0.15", f"ghost@{DOMAIN}", dropped)
        assert rcpt == "250 2.1.5 Ok"
        assert data.startswith("250 2.0.0 Ok: queued as "), data
        for user, password in ((peer, peer_password), (env.demo["user"], env.demo["user_password"])):
            with pytest.raises(AssertionError, match="no message"):
                wait_for_message(env.stack, user, password, dropped, timeout=0.5)
    finally:
        env.put_domain({})


def test_r_dom_2_alias_delivers(env: Env) -> None:
    alias = f"sales-{uuid.uuid4().hex[:6]}@{DOMAIN}"
    status, body = env.admin.call("POST", "/v1/aliases", {"alias": alias, "targets": [env.demo["peer"]]})
    assert status == 201, body
    marker = subject()
    rcpt, data = deliver(env, "127.0.0.16", alias, marker)
    assert rcpt == "250 2.1.5 Ok"
    assert data.startswith("250 2.0.0 Ok: queued as "), data
    raw = wait_for_message(env.stack, env.demo["peer"], env.demo["peer_password"], marker)
    assert f"To: {alias}".encode() in raw


# R-LIM: limits ----------------------------------------------------------------------------------
def test_r_lim_4_max_recipients(env: Env) -> None:
    with env.settings({"limits": {"max_recipients": 2}}):
        client = mx(env.stack, "127.0.0.17")
        try:
            assert raw_command(client, f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
            assert rcpt_reply(client, env.demo["user"]) == "250 2.1.5 Ok"
            assert rcpt_reply(client, env.demo["peer"]) == "250 2.1.5 Ok"
            assert rcpt_reply(client, env.demo["user"]) == "452 4.5.3 Too many recipients"
        finally:
            quit_quietly(client)


def test_r_lim_5_too_many_hops(env: Env) -> None:
    hops = "".join(f"Received: from hop{i}.test by hop{i + 1}.test; Sat, 1 Jan 2028 00:00:{i:02d} +0000\r\n"
                   for i in range(21))
    _, data = deliver(env, "127.0.0.18", env.demo["user"], subject(), extra_headers=hops)
    assert data == "554 5.4.6 Too many hops"
    # Exactly the limit (20) is still mail, not a loop.
    twenty = "".join(hops.splitlines(keepends=True)[:20])
    _, data = deliver(env, "127.0.0.18", env.demo["user"], subject(), extra_headers=twenty)
    assert data.startswith("250 2.0.0 Ok: queued as "), data


def test_issue_11_data_within_the_recipients_bounds_costs_no_data_call(env: Env) -> None:
    """Each accepted recipient's verdict carries what the DATA stage lets through (R-LIM-5 hops,
    R-LIM-7 size, R-IPS-3 size block): a message within it gets its 250 without a DATA call of
    its own; one beyond it is asked, and refused, as before."""
    port = env.stack.ports["policy.ops"]
    data_calls, rcpt_calls = policy_checks(port, "STAGE_DATA"), policy_checks(port, "STAGE_RCPT")
    _, data = deliver(env, "127.0.0.28", env.demo["user"], subject())
    assert data.startswith("250 2.0.0 Ok: queued as "), data
    assert policy_checks(port, "STAGE_RCPT") == rcpt_calls + 1  # the counters move with each call
    assert policy_checks(port, "STAGE_DATA") == data_calls
    hops = "".join(f"Received: from hop{i}.test by hop{i + 1}.test; Sat, 1 Jan 2028 00:00:{i:02d} +0000\r\n"
                   for i in range(21))
    _, data = deliver(env, "127.0.0.28", env.demo["user"], subject(), extra_headers=hops)
    assert data == "554 5.4.6 Too many hops"
    assert policy_checks(port, "STAGE_DATA") == data_calls + 1


def test_issue_11_the_same_sender_again_in_a_session_costs_no_mail_call(env: Env) -> None:
    """An accepted MAIL verdict says the session may give it again to the same sender (every
    MAIL rule depends on the session's facts, the sender, SIZE= and settings): a second message
    from that sender in the session costs no MAIL decision and carries the same SPF result; a
    different sender is decided."""
    port = env.stack.ports["policy.ops"]
    client = mx(env.stack, "127.0.0.29")
    markers = [subject(), subject()]
    try:
        costs = []
        for sender, marker in [(SENDER, markers[0]), (SENDER, markers[1]), ("bob@sender.test", subject())]:
            before = policy_checks(port, "STAGE_MAIL")
            assert raw_command(client, f"MAIL FROM:<{sender}>") == "250 2.1.0 Ok"
            costs.append(policy_checks(port, "STAGE_MAIL") - before)
            assert rcpt_reply(client, env.demo["user"]) == "250 2.1.5 Ok"
            assert data_reply(client, message(marker, sender, env.demo["user"])).startswith("250 2.0.0 Ok")
        assert costs == [1, 0, 1]
    finally:
        quit_quietly(client)
    spf = [[line for line in header_section(wait_for_message(env.stack, env.demo["user"], env.demo["user_password"],
                                                             marker)).splitlines() if line.startswith("Received-SPF:")]
           for marker in markers]
    assert spf[0] and spf[0] == spf[1], spf


def test_r_lim_7_size(env: Env) -> None:
    limit = 20_000
    too_big = "552 5.3.4 Message size exceeds fixed maximum message size"
    with env.settings({"limits": {"max_message_size": limit}}):
        client = mx(env.stack, "127.0.0.19")
        try:
            assert client.esmtp_features.get("size") == str(limit)  # announced in EHLO
            assert raw_command(client, f"MAIL FROM:<{SENDER}> SIZE={limit + 1}") == too_big
            assert raw_command(client, f"MAIL FROM:<{SENDER}> SIZE={limit - 1000}") == "250 2.1.0 Ok"
            assert rcpt_reply(client, env.demo["user"]) == "250 2.1.5 Ok"
            # No SIZE= promise kept: the real size is enforced during DATA.
            body = ("x" * 998 + "\r\n") * 25
            assert data_reply(client, message(subject(), SENDER, env.demo["user"], body=body)) == too_big
        finally:
            quit_quietly(client)


def test_r_lim_1_daily_limit(env: Env) -> None:
    """R-LIM-1/2/3: limit 2 a day; two recipients in one external domain count once per message."""
    user = env.demo["user"]
    status, body = env.admin.call("PUT", f"/v1/accounts/{user}/settings", {"limits": {"max_messages_per_day": 2}})
    env.wait_applied(version_of(status, body))
    try:
        client = submission(env.stack, user, env.demo["user_password"])
        try:
            assert raw_command(client, f"MAIL FROM:<{user}>") == "250 2.1.0 Ok"
            for recipient in ("a@ext-one.test", "b@ext-one.test", "c@ext-two.test"):
                assert rcpt_reply(client, recipient) == "250 2.1.5 Ok", recipient
            assert rcpt_reply(client, "d@ext-three.test") == "452 4.5.3 Daily sending limit exceeded"
            assert data_reply(client, message(subject(), user, "a@ext-one.test")).startswith("250 2.0.0")
            # A new message counts again, even for a domain the first one reached.
            assert raw_command(client, f"MAIL FROM:<{user}>") == "250 2.1.0 Ok"
            assert rcpt_reply(client, env.demo["peer"]) == "250 2.1.5 Ok"  # local mail never counts
            assert rcpt_reply(client, "e@ext-one.test") == "452 4.5.3 Daily sending limit exceeded"
        finally:
            quit_quietly(client)
        status, counters = env.admin.call("GET", f"/v1/accounts/{user}/counters")  # R-LIM-3
        assert status == 200, counters
        assert isinstance(counters, dict) and counters["sent_external"] == 2, counters
    finally:
        env.wait_applied(version_of(*env.admin.call("PUT", f"/v1/accounts/{user}/settings", {})))


def test_r_lim_7_account_size_limit(env: Env) -> None:
    """R-LIM-7 at account scope, below the server limit: decided by the policy service, at MAIL
    (SIZE=) and at the end of DATA (the real size)."""
    user, limit = env.demo["user"], 10_000
    status, body = env.admin.call("PUT", f"/v1/accounts/{user}/settings", {"limits": {"max_message_size": limit}})
    env.wait_applied(version_of(status, body))
    too_big = "552 5.3.4 Message size exceeds fixed maximum message size"
    try:
        client = submission(env.stack, user, env.demo["user_password"])
        try:
            assert raw_command(client, f"MAIL FROM:<{user}> SIZE={limit + 1}") == too_big
            assert raw_command(client, f"MAIL FROM:<{user}> SIZE={limit // 2}") == "250 2.1.0 Ok"
            assert rcpt_reply(client, env.demo["peer"]) == "250 2.1.5 Ok"
            body_text = ("y" * 998 + "\r\n") * 12
            assert data_reply(client, message(subject(), user, env.demo["peer"], body=body_text)) == too_big
        finally:
            quit_quietly(client)
    finally:
        env.wait_applied(version_of(*env.admin.call("PUT", f"/v1/accounts/{user}/settings", {})))


# R-DNS: DNS-based checks --------------------------------------------------------------------------
def test_r_dns_1_dnsbl_listed_refused(env: Env) -> None:
    ip = "127.0.0.31"
    with env.settings({"dns": {"dnsbl_zones": [DNSBL_ZONE]}}):
        client = mx(env.stack, ip)
        try:
            assert (raw_command(client, f"MAIL FROM:<{SENDER}>")
                    == f"554 5.7.1 Service unavailable; client [{ip}] blocked using {DNSBL_ZONE}")
        finally:
            client.close()
        # Listed on a DNSBL also blocks the IP (R-IPS-3, block_dnsbl_listed on by default).
        assert refused_at_connect(env.stack, ip) == IPS_ACTIVE.format(ip=ip)
        # An address that is not listed goes on (the zone answers NXDOMAIN for it).
        client = mx(env.stack, "127.0.0.30")
        try:
            assert raw_command(client, f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
        finally:
            quit_quietly(client)
    assert env.admin.call("DELETE", f"/v1/ips/blocks/{ip}")[0] == 204


def test_r_dns_3_reverse_dns_required(env: Env) -> None:
    with env.settings({"dns": {"require_rdns": True}}):
        client = mx(env.stack, "127.0.0.32")
        try:
            assert raw_command(client, f"MAIL FROM:<{SENDER}>") == f"501 5.7.1 <{SENDER}>... Sender IP must resolve"
        finally:
            quit_quietly(client)
        client = mx(env.stack, "127.0.0.33")  # PTR mail.good-host.test, which resolves back
        try:
            assert raw_command(client, f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
        finally:
            quit_quietly(client)


def test_r_dns_4_sender_domain_must_exist(env: Env) -> None:
    sender = "someone@no-such-domain.test"
    client = mx(env.stack, "127.0.0.34")
    try:
        assert raw_command(client, f"MAIL FROM:<{sender}>") == f"501 5.7.1 <{sender}>... Sender domain must exist"
        assert raw_command(client, f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    finally:
        quit_quietly(client)


def test_r_dns_5_spf_fail_rejected_pass_header(env: Env) -> None:
    failing = "someone@spf-fail.test"
    client = mx(env.stack, "127.0.0.35")
    try:
        assert raw_command(client, f"MAIL FROM:<{failing}>") == f"550 5.7.23 <{failing}>... SPF validation failed"
    finally:
        quit_quietly(client)
    passing = "someone@spf-pass.test"
    marker = subject()
    rcpt, data = deliver(env, "127.0.0.36", env.demo["user"], marker, sender=passing)
    assert rcpt == "250 2.1.5 Ok"
    assert data.startswith("250 2.0.0 Ok: queued as "), data
    headers = header_section(wait_for_message(env.stack, env.demo["user"], env.demo["user_password"], marker))
    # RFC 7208 9.1: result names are case-insensitive; pyspf writes "Pass".
    assert re.search(r"^Received-SPF: pass ", headers, re.IGNORECASE | re.MULTILINE), headers
    assert "client-ip=127.0.0.36" in headers, headers


def test_r_dns_7_dns_down_is_4xx_never_5xx(env: Env) -> None:
    temporary = "451 4.4.3 Temporary DNS failure, try again later"
    with env.settings({"dns": {"timeout_seconds": 1.0}}):
        env.dns.set_mode("silent")  # the resolver times out
        try:
            client = mx(env.stack, "127.0.0.37")
            try:
                sender = f"someone@silent-{uuid.uuid4().hex[:6]}.test"
                assert raw_command(client, f"MAIL FROM:<{sender}>") == temporary
            finally:
                quit_quietly(client)
        finally:
            env.dns.set_mode("answer")
        env.dns.stop_serving()  # nothing listens: UDP port unreachable, TCP refused
        try:
            client = mx(env.stack, "127.0.0.38")
            try:
                sender = f"someone@stopped-{uuid.uuid4().hex[:6]}.test"
                assert raw_command(client, f"MAIL FROM:<{sender}>") == temporary
            finally:
                quit_quietly(client)
        finally:
            env.dns.serve_again()
        client = mx(env.stack, "127.0.0.38")
        try:
            assert raw_command(client, f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"  # DNS back: mail flows
        finally:
            quit_quietly(client)


# Replicas: R-IPS-1 shared counters, R-OPS-1 ---------------------------------------------------
# (Before the many-sessions test, whose client sockets could take the replicas' free ports.)
def _probe_until(stack: Stack, port: int, expected: str, deadline: float, seen: dict[int, float],
                 demo: dict[str, str], started: float) -> None:
    """Sessions from the trusted 127.0.0.1 (never counted nor blocked) until the third RCPT of
    one transaction gets ``expected``; records the seconds it took after ``started``."""
    while time.monotonic() < deadline:
        client = mx(stack, "127.0.0.1", port)
        try:
            raw_command(client, f"MAIL FROM:<{SENDER}>")
            rcpt_reply(client, demo["user"])
            rcpt_reply(client, demo["peer"])
            if rcpt_reply(client, demo["user"]) == expected:
                seen[port] = time.monotonic() - started
                return
        finally:
            quit_quietly(client)
        time.sleep(0.02)


@dataclass
class Replicas:
    """A second policy replica, and a second edge that asks only it."""

    policy: Replica
    edge: Replica

    def edge_ports(self, stack: Stack) -> list[int]:
        return [stack.ports["smtp-edge.smtp"], self.edge.ports["smtp"]]


@pytest.fixture(scope="module")
def replicas(env: Env) -> Iterator[Replicas]:
    policy2 = start_ready(lambda: start_policy_replica(env.stack, "policy-1"))
    edge2: Replica | None = None
    try:
        target = {"REMPART_POLICY_TARGET": f"127.0.0.1:{policy2.ports['grpc']}"}
        edge2 = start_ready(lambda: start_edge_replica(env.stack, "smtp-edge-1", target))
        yield Replicas(policy2, edge2)
    finally:
        if edge2 is not None:
            edge2.stop()
        policy2.stop()


def test_r_ips_1_counters_and_blocks_shared_by_replicas(env: Env, replicas: Replicas) -> None:
    """Unknown recipients split across two edges, each asking its own policy replica, add up;
    the block holds on both."""
    ip = "127.0.0.42"
    offset = replicas.policy.log_offset()
    first, second = replicas.edge_ports(env.stack)
    for port, names in ((first, ("ghost1", "ghost2")), (second, ("ghost3",))):
        client = mx(env.stack, ip, port)
        try:
            assert raw_command(client, f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
            for name in names:
                assert rcpt_reply(client, f"{name}@{DOMAIN}") == unknown_user(f"{name}@{DOMAIN}")
        finally:
            quit_quietly(client)
    client = mx(env.stack, ip, first)
    try:
        assert raw_command(client, f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
        assert rcpt_reply(client, f"ghost4@{DOMAIN}") == IPS_ACTIVE.format(ip=ip)
    finally:
        client.close()
    for port in (first, second):
        assert refused_at_connect(env.stack, ip, port) == IPS_ACTIVE.format(ip=ip)
    decided = [r for r in replicas.policy.log_records(offset) if r.get("msg") == "decision"]
    assert any(r.get("client_ip") == ip and r.get("stage") == "STAGE_RCPT" for r in decided)
    assert env.admin.call("DELETE", f"/v1/ips/blocks/{ip}")[0] == 204


def test_r_ops_1_settings_change_reaches_every_replica_within_2s(env: Env, replicas: Replicas) -> None:
    stack = env.stack
    edges = replicas.edge_ports(stack)
    for port in edges:  # before: three recipients are fine
        client = mx(stack, "127.0.0.1", port)
        try:
            raw_command(client, f"MAIL FROM:<{SENDER}>")
            assert [rcpt_reply(client, env.demo[k]) for k in ("user", "peer", "user")] == ["250 2.1.5 Ok"] * 3
        finally:
            quit_quietly(client)
    offset = replicas.policy.log_offset()
    status, before = env.admin.call("GET", "/v1/settings")
    assert status == 200 and isinstance(before, dict)
    seen: dict[int, float] = {}
    started = time.monotonic()
    try:
        version_of(*env.admin.call("PATCH", "/v1/settings", {"limits": {"max_recipients": 2}}))
        threads = [threading.Thread(target=_probe_until, args=(stack, port, "452 4.5.3 Too many recipients",
                                                               started + 5, seen, env.demo, started))
                   for port in edges]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    finally:
        env.wait_applied(version_of(*env.admin.call("PUT", "/v1/settings", before["settings"])))
    print(f"setting applied after {', '.join(f'{s:.2f}s' for s in seen.values())}")
    assert set(seen) == set(edges), f"only {seen} applied the change within 5 s"
    assert max(seen.values()) <= 2.0, seen
    # Edge replica 2 really asked policy replica 2.
    decided = [r for r in replicas.policy.log_records(offset) if r.get("msg") == "decision"]
    assert any(r.get("stage") == "STAGE_RCPT" for r in decided)


# R-IPS: intrusion prevention -------------------------------------------------------------------
def blocked_ips(admin: AdminApi) -> dict[str, dict[str, object]]:
    status, body = admin.call("GET", "/v1/ips/blocks")
    assert status == 200 and isinstance(body, dict), (status, body)
    assert not body["truncated"]
    return {b["ip"]: b for b in body["blocks"]}


def policy_checks(ops_port: int, stage: str) -> float:
    """A policy replica's count of decisions at ``stage`` (STAGE_MAIL ...), from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("rempart_policy_checks_total{") and f'stage="{stage}"' in line)


def policy_mail_checks(replica: Replica) -> float:
    """The replica's count of MAIL stage decisions."""
    return policy_checks(replica.ports["ops"], "STAGE_MAIL")


def test_r_ops_3_policy_replica_killed_mid_session_is_a_451_and_the_next_try_works(env: Env) -> None:
    """Issue 11: one policy stream per SMTP session. Two policy replicas behind one edge (gRPC
    round robin, as a headless Service gives); a session's stream lives on one of them. SIGKILL
    that replica mid-session: the session's next stage is a 451 (fail closed, never a 250 that
    nobody decided), the same stage tried again goes through the other replica, the message is
    delivered, and new sessions work."""
    stack = env.stack
    policies = [start_ready(lambda name=name: start_policy_replica(stack, name)) for name in ("policy-a", "policy-b")]
    edge: Replica | None = None
    sessions: list[tuple[smtplib.SMTP, Replica, str]] = []
    try:
        target = "ipv4:" + ",".join(f"127.0.0.1:{p.ports['grpc']}" for p in policies)
        edge = start_ready(lambda: start_edge_replica(stack, "smtp-edge-two-policies", {
            "REMPART_POLICY_TARGET": target, "REMPART_GRPC_TIMEOUT_SECONDS": "20"}))
        # Open sessions until each replica carries at least one (each MAIL decision moves the
        # counter of the replica that holds the session's stream).
        for number in range(12):
            before = [policy_mail_checks(p) for p in policies]
            client = mx(stack, f"127.0.0.{60 + number}", edge.ports["smtp"])
            assert raw_command(client, f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
            moved = [p for p, count in zip(policies, before, strict=True) if policy_mail_checks(p) > count]
            assert len(moved) == 1, "exactly one replica decided the MAIL stage"
            sessions.append((client, moved[0], f"127.0.0.{60 + number}"))
            if {id(r) for _, r, _ in sessions} == {id(p) for p in policies}:
                break
        assert {id(r) for _, r, _ in sessions} == {id(p) for p in policies}, "round robin never used one replica"
        victim, survivor = policies
        # The victim's sessions start a stage that keeps it busy: a sender domain whose DNS
        # answers nothing (the policy would wait its 5 s DNS timeout, the edge its 20 s gRPC
        # deadline); the replica is killed while that stage is in flight.
        on_victim = [client for client, replica, _ in sessions if replica is victim]
        env.dns.set_mode("silent")
        try:
            for client in on_victim:
                client.rset()
                client.putcmd(f"MAIL FROM:<someone@silent-{uuid.uuid4().hex[:6]}.test>")
            time.sleep(1.0)
            victim.proc.kill()
            victim.proc.wait(10)
            # Not the DNS timeout's "451 4.4.3": the broken stream itself, for the stage in flight.
            assert [reply(*client.getreply()) for client in on_victim] == [
                "451 4.3.0 Temporary local problem - please try later"] * len(on_victim)
        finally:
            env.dns.set_mode("answer")
        for client, replica, _ in sessions:
            if replica is victim:  # the stage again: a new stream, on the other replica
                assert raw_command(client, f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
            assert rcpt_reply(client, env.demo["peer"]) == "250 2.1.5 Ok"
        marker = subject()
        for client, _, _ in sessions:
            assert data_reply(client, message(marker, SENDER, env.demo["peer"])).startswith("250 2.0.0 Ok: queued as ")
            quit_quietly(client)
        sessions.clear()
        client = mx(stack, "127.0.0.59", edge.ports["smtp"])  # a new session: the survivor only
        try:
            assert raw_command(client, f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
            assert rcpt_reply(client, env.demo["peer"]) == "250 2.1.5 Ok"
            assert data_reply(client, message(marker, SENDER, env.demo["peer"])).startswith("250 2.0.0 Ok")
        finally:
            quit_quietly(client)
        assert survivor.proc.poll() is None
        wait_for_message(stack, env.demo["peer"], env.demo["peer_password"], marker)
    finally:
        for client, _, _ in sessions:
            client.close()
        if edge is not None:
            edge.stop()
        for policy in policies:
            policy.stop()


def test_r_ips_3_unknown_recipients_block_ip(env: Env) -> None:
    ip = "127.0.0.41"
    client = mx(env.stack, ip)
    try:
        assert raw_command(client, f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
        for n in (1, 2):
            assert rcpt_reply(client, f"ghost{n}@{DOMAIN}") == unknown_user(f"ghost{n}@{DOMAIN}")
    finally:
        quit_quietly(client)
    client = mx(env.stack, ip)  # a new session: the count spans sessions (R-IPS-1)
    try:
        assert raw_command(client, f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
        assert rcpt_reply(client, f"ghost3@{DOMAIN}") == unknown_user(f"ghost3@{DOMAIN}")
        # The fourth is over max_unknown_recipients (3): blocked, and this connection closed.
        assert rcpt_reply(client, f"ghost4@{DOMAIN}") == IPS_ACTIVE.format(ip=ip)
    finally:
        client.close()
    assert refused_at_connect(env.stack, ip) == IPS_ACTIVE.format(ip=ip)

    blocks = blocked_ips(env.admin)  # R-IPS-5: listed through the admin API
    assert blocks[ip]["reason"] == "unknown recipients", blocks[ip]
    assert env.admin.call("DELETE", f"/v1/ips/blocks/{ip}")[0] == 204
    assert ip not in blocked_ips(env.admin)
    client = mx(env.stack, ip)  # greeted (220) again
    quit_quietly(client)


def test_r_ips_6_thunderbird_and_a_phone_behind_one_nat_stay_unblocked(env: Env) -> None:
    """Thunderbird keeps up to 5 IMAP connections, a phone one more, and both reconnect: far more
    than R-IPS-2's 5 connections a minute from one IP. After the first login the IP is known
    (R-IPS-6), and none of the later connections counts. Each session talks as Thunderbird does
    with CONDSTORE (RFC 7162): ENABLE, SELECT (CONDSTORE), UID FETCH (CHANGEDSINCE)."""
    household, stranger = "127.0.0.91", "127.0.0.92"  # not the 60-71 the policy-kill test connects from
    user, password = env.demo["user"], env.demo["user_password"]
    sessions: list[imaplib.IMAP4] = []
    connections = 0

    def open_session() -> None:
        nonlocal connections
        client = SourcedImap(env.stack, household)
        connections += 1
        sessions.append(client)
        assert client.login(user, password)[0] == "OK"
        assert client.enable("CONDSTORE")[0] == "OK"
        typ, _ = client._simple_command("SELECT", "INBOX", "(CONDSTORE)")
        assert typ == "OK" and client.untagged_responses.get("OK") is not None
        client.state = "SELECTED"
        assert client.uid("FETCH", "1:*", "(FLAGS) (CHANGEDSINCE 1)")[0] == "OK"

    try:
        for _ in range(6):  # Thunderbird's cached connections and the phone's
            open_session()
        for _ in range(10):  # a laptop waking up, a phone changing networks: reconnects
            logout_quietly(sessions.pop(0))
            open_session()
        assert connections == 16
        assert all(client.noop()[0] == "OK" for client in sessions)
    finally:
        for client in sessions:
            logout_quietly(client)
    assert household not in blocked_ips(env.admin)

    # A stranger's sixth connection within the minute, without a login, is still blocked.
    for _ in range(5):
        logout_quietly(SourcedImap(env.stack, stranger))
    with pytest.raises(imaplib.IMAP4.error, match=re.escape(IPS_ACTIVE.format(ip=stranger)[10:])):
        SourcedImap(env.stack, stranger)
    assert blocked_ips(env.admin)[stranger]["reason"] == "connections per minute"
    assert env.admin.call("DELETE", f"/v1/ips/blocks/{stranger}")[0] == 204


async def _smtp_session(port: int, ip: str, recipient: str) -> str:
    """One session that sends one RCPT; the reply that ended it (greeting refusal or RCPT)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(ip, 0))

    async def read_reply() -> str:
        line = b""
        while True:
            line = await asyncio.wait_for(reader.readline(), 30)
            if not line or line[3:4] != b"-":
                return line.decode(errors="replace").rstrip("\r\n")

    try:
        greeting = await read_reply()
        if not greeting.startswith("220"):
            return greeting
        for command in ("EHLO client.sender.test", f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{recipient}>"):
            writer.write(command.encode() + b"\r\n")
            await writer.drain()
            answer = await read_reply()
            if command.startswith("RCPT") or not answer.startswith("250"):
                return answer
        return ""
    finally:
        try:
            writer.write(b"QUIT\r\n")
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


async def _many_sessions(port: int, plan: list[tuple[str, str]], in_flight: int) -> list[tuple[str, str]]:
    gate = asyncio.Semaphore(in_flight)

    async def one(ip: str, recipient: str) -> tuple[str, str]:
        async with gate:
            return ip, await _smtp_session(port, ip, recipient)

    return await asyncio.gather(*(one(ip, rcpt) for ip, rcpt in plan))


def test_r_ips_3_counters_atomic_200_sessions_50_ips(env: Env) -> None:
    over = [f"127.0.1.{n}" for n in range(1, 51)]  # 4 unknown recipients each: blocked
    under = [f"127.0.1.{n}" for n in range(51, 61)]  # 3 each: never blocked
    plan = [(ip, f"ghost-{k}@{DOMAIN}") for ip in over for k in range(4)]
    plan += [(ip, f"ghost-{k}@{DOMAIN}") for ip in under for k in range(3)]
    random.Random(3).shuffle(plan)
    # Only the unknown-recipient trigger may fire: 4 connections a minute is within the default
    # (5), but raise it so that the test proves one trigger alone.
    with env.settings({"ips": {"max_connections_per_minute": 1000}}):
        started = time.monotonic()
        results = asyncio.run(_many_sessions(env.stack.ports["smtp-edge.smtp"], plan, in_flight=200))
        elapsed = time.monotonic() - started
    print(f"{len(plan)} sessions from {len(over) + len(under)} IPs in {elapsed:.2f}s")
    by_ip: dict[str, list[str]] = {}
    for ip, answer in results:
        by_ip.setdefault(ip, []).append(answer)
    for ip in over:
        answers = by_ip[ip]
        assert sum(a.startswith("550 5.1.1 <ghost-") for a in answers) == 3, (ip, answers)
        assert answers.count(IPS_ACTIVE.format(ip=ip)) == 1, (ip, answers)
    for ip in under:
        assert all(a.startswith("550 5.1.1 <ghost-") for a in by_ip[ip]), (ip, by_ip[ip])
    blocks = {ip: d for ip, d in blocked_ips(env.admin).items() if ip.startswith("127.0.1.")}
    assert sorted(blocks) == sorted(over)
    assert {d["reason"] for d in blocks.values()} == {"unknown recipients"}
    for ip in over:
        assert env.admin.call("DELETE", f"/v1/ips/blocks/{ip}")[0] == 204


def test_r_dns_2_ip_reputation(env: Env) -> None:
    with env.settings({"dns": {"reputation_zone": REPUTATION_ZONE}}):
        client = mx(env.stack, "127.0.0.41")
        try:
            assert raw_command(client, f"MAIL FROM:<{SENDER}>") == (
                f"554 5.7.1 Service unavailable; client [127.0.0.41] has a bad IP reputation at {REPUTATION_ZONE}")
        finally:
            client.close()
        client = mx(env.stack, "127.0.0.42")
        try:
            assert raw_command(client, f"MAIL FROM:<{SENDER}>") == (
                "451 4.7.1 Client [127.0.0.42] greylisted by IP reputation, try again later")
        finally:
            client.close()
        marker = subject()
        rcpt, data = deliver(env, "127.0.0.43", env.demo["peer"], marker)
        assert rcpt.startswith("250") and data.startswith("250"), (rcpt, data)
        delivered = wait_for_message(env.stack, env.demo["peer"], env.demo["peer_password"], marker)
        # The result is in the message's trace ("IP reputation: Accepted").
        assert "X-Rempart-IP-Reputation: Accepted" in header_section(delivered)


def test_r_rel_5_helo_filter(env: Env) -> None:
    rules = [{"match": "wildcard", "pattern": "*.spammer.test", "action": "reject"}]
    with env.settings({"relay": {"helo_filter_enabled": True, "helo_rules": rules}}):
        client = smtplib.SMTP("127.0.0.1", env.stack.ports["smtp-edge.smtp"], timeout=20,
                              source_address=("127.0.0.44", 0))
        try:
            code, text = client.ehlo("bot7.spammer.test")
            assert (code, text) == (550, b"5.7.1 <bot7.spammer.test>... HELO rejected")
            code, _ = client.ehlo("mail.honest.test")
            assert code == 250
        finally:
            quit_quietly(client)


def test_r_rel_6_connection_delay_before_greeting(env: Env) -> None:
    with env.settings({"relay": {"connect_delay_seconds": 1.5}}):
        started = time.monotonic()
        client = mx(env.stack, "127.0.0.45")
        waited = time.monotonic() - started
        quit_quietly(client)
    assert waited >= 1.4, f"greeting after {waited:.2f}s"


def test_r_dns_6_srs_rewrites_forwarded_sender_and_verifies_bounces(env: Env) -> None:
    from rempart.common.events import MAIL_STREAM, connect_nats
    from rempart.common.pb.events.v1 import events_pb2

    status, body = env.admin.call("POST", "/v1/aliases", {"alias": f"fwd@{DOMAIN}", "targets": ["far@remote.test"]})
    assert status in (200, 201), body
    with env.settings({"dns": {"srs_enabled": True}}):
        rcpt, data = deliver(env, "127.0.0.46", f"fwd@{DOMAIN}", subject())
        assert rcpt.startswith("250") and data.startswith("250"), (rcpt, data)

        async def last_record() -> events_pb2.DeliveryRecord:
            assert env.stack.nats is not None
            nc = await connect_nats(env.stack.nats.url, "srs-test")
            try:
                msg = await nc.jetstream().get_last_msg(MAIL_STREAM, "rempart.mail.accepted")
                return events_pb2.DeliveryRecord.FromString(msg.data)
            finally:
                await nc.close()

        record = asyncio.run(last_record())
        assert list(record.remote_recipients) == ["far@remote.test"]
        srs_sender = record.remote_senders["far@remote.test"]
        assert srs_sender.startswith("SRS0=") and srs_sender.endswith(f"@{DOMAIN}"), srs_sender
        # A bounce to the SRS address goes back to the original sender; a forged one is refused.
        client = mx(env.stack, "127.0.0.47")
        try:
            assert raw_command(client, "MAIL FROM:<>") == "250 2.1.0 Ok"
            assert rcpt_reply(client, srs_sender).startswith("250")
            forged = srs_sender.replace("SRS0=", "SRS0=x", 1)
            assert rcpt_reply(client, forged).startswith("550 5.1.1 ")
        finally:
            quit_quietly(client)
