"""GET /v1/stats end to end (issue 12): real mail accepted and refused at the SMTP edge, real
logins on every protocol, an IP blocked by intrusion prevention, all counted by the services
that decided (edge, policy, auth) in Redis and summed by the admin API.

The stack is the shared e2e one, so the test reads the counts of its own time window before and
after and checks the differences. Mail is sent from 127.0.0.1, a trusted host by default (the
DNS checks do not apply to it, and the shared stack has no DNS server); the blocked client is
127.0.9.77, which no other test uses, and its block is removed at the end.
"""

from __future__ import annotations

import datetime as dt
import imaplib
import poplib
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from rempart.common.testing.devstack import AdminApi, Stack

sys.path.insert(0, str(Path(__file__).resolve().parent))

from policy_harness import (
    SourcedImap,
    data_reply,
    message,
    mx,
    quit_quietly,
    raw_command,
    rcpt_reply,
    submission,
    tls_context,
)

BLOCKED_IP = "127.0.9.77"
SENDER = "alice@sender.test"


def rfc3339(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat().replace("+00:00", "Z")


def stats(admin: AdminApi, start: float, end: float) -> dict[str, Any]:
    status, body = admin.call("GET", f"/v1/stats?from={rfc3339(start)}&to={rfc3339(end)}&step=60&top=20")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def figures(body: dict[str, Any]) -> dict[str, int]:
    """The totals this test changes, flat."""
    totals = body["totals"]
    out = {"accepted": totals["accepted"], "ips_blocked": totals["ips_blocked"],
           "ips_refused": totals["ips_refused"]}
    out |= {f"refused.{reason}": n for reason, n in totals["refused"].items()}
    for protocol, results in totals["logins"].items():
        out |= {f"login.{protocol}.{result}": n for result, n in results.items() if n}
    out["top." + BLOCKED_IP] = sum(e["count"] for e in body["top_blocked_ips"] if e["ip"] == BLOCKED_IP)
    return out


def settled(admin: AdminApi, start: float, end: float) -> dict[str, int]:
    """The figures once what the services counted before (the fixtures' logins) is written."""
    deadline = time.monotonic() + 15
    last = figures(stats(admin, start, end))
    while True:
        time.sleep(1.5)  # longer than the services' write interval (rempart.common.stats)
        now = figures(stats(admin, start, end))
        if now == last or time.monotonic() > deadline:
            return now
        last = now


def connect_and_read_greeting(stack: Stack, source_ip: str) -> str:
    with socket.create_connection(("127.0.0.1", stack.ports["smtp-edge.smtp"]), 10,
                                  source_address=(source_ip, 0)) as sock:
        return sock.recv(512).decode(errors="replace")


def test_r_adm_stats_count_mail_refusals_logins_and_blocks_of_the_running_suite(
    stack: Stack, demo: dict[str, str], admin: AdminApi
) -> None:
    start = time.time() - 60
    end = time.time() + 600
    before = settled(admin, start, end)
    marker = uuid.uuid4().hex

    # Mail: one message by submission (SMTP AUTH ok), one on the MX; one RCPT to nobody, one
    # MAIL announcing a size over the limit (R-LIM-7).
    client = submission(stack, demo["user"], demo["user_password"])
    try:
        client.sendmail(demo["user"], [demo["peer"]], message(f"stats {marker} 1", demo["user"], demo["peer"]))
    finally:
        quit_quietly(client)
    client = mx(stack, "127.0.0.1")
    try:
        assert raw_command(client, f"MAIL FROM:<{SENDER}> SIZE=999999999999").startswith("552 5.3.4")
        assert raw_command(client, f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
        nobody = f"nobody-{marker}@example.test"
        assert rcpt_reply(client, nobody) == f"550 5.1.1 <{nobody}>... Unknown user"
        assert rcpt_reply(client, demo["peer"]) == "250 2.1.5 Ok"
        assert data_reply(client, message(f"stats {marker} 2", SENDER, demo["peer"])).startswith("250 ")
    finally:
        quit_quietly(client)

    # Logins: IMAP right and wrong, POP3 wrong, the admin API wrong (unknown users, so that no
    # account gets locked).
    imap = SourcedImap(stack, "127.0.0.1")
    try:
        imap.login(demo["user"], demo["user_password"])
    finally:
        imap.logout()
    imap = SourcedImap(stack, "127.0.0.1")
    try:
        try:
            imap.login(f"nobody-{marker}@example.test", "Wrong-password-1")
            raise AssertionError("a wrong IMAP login was accepted")
        except imaplib.IMAP4.error:
            pass
    finally:
        imap.logout()
    pop = poplib.POP3("127.0.0.1", stack.ports["imap-pop.pop3"], timeout=20)
    try:
        pop.stls(context=tls_context(stack))
        pop.user(f"nobody-{marker}@example.test")
        try:
            pop.pass_("Wrong-password-1")
            raise AssertionError("a wrong POP3 login was accepted")
        except poplib.error_proto:
            pass
    finally:
        pop.close()
    anonymous = AdminApi(admin.base_url)
    status, _ = anonymous.call("POST", "/v1/auth/login", {"email": f"nobody-{marker}@example.test",
                                                          "password": "Wrong-password-1"})
    assert status == 401

    # Intrusion prevention: more connections a minute from one untrusted IP than the setting
    # allows (R-IPS-2, default 5): the first one over blocks it, the next two are refused as
    # blocked (R-IPS-4).
    status, current = admin.call("GET", "/v1/settings")
    assert status == 200 and isinstance(current, dict), current
    allowed = int(current["settings"]["ips"]["max_connections_per_minute"])
    assert allowed > 0 and current["settings"]["ips"]["smtp"], "intrusion prevention is off in this stack"
    greetings = [connect_and_read_greeting(stack, BLOCKED_IP) for _ in range(allowed + 3)]
    refused = [g for g in greetings if g.startswith(f"421 4.0.0 Intrusion prevention active for [{BLOCKED_IP}]")]
    assert len(refused) == 3, greetings

    expected = {
        "accepted": 2,
        "refused.unknown_recipient": 1,
        "refused.message_too_big": 1,
        "refused.intrusion_prevention": 3,
        "ips_blocked": 1,
        "ips_refused": 2,
        "top." + BLOCKED_IP: 3,
        "login.smtp.ok": 1,
        "login.imap.ok": 1,
        "login.imap.invalid": 1,
        "login.pop3.invalid": 1,
        "login.admin.invalid": 1,
    }
    deadline = time.monotonic() + 15  # the services write their counts about once a second
    try:
        while True:
            after = figures(stats(admin, start, end))
            changes = {name: after.get(name, 0) - before.get(name, 0) for name in expected}
            if changes == expected or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert changes == expected
    finally:
        admin.call("DELETE", f"/v1/ips/blocks/{BLOCKED_IP}")
    # Nothing else moved: no other refusal reason, no other login result.
    moved = {name for name in set(after) | set(before) if after.get(name, 0) != before.get(name, 0)}
    assert moved == set(expected), moved - set(expected)

