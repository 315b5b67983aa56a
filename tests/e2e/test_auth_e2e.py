"""Authentication end to end (issue 4): lockout, no user enumeration, app passwords with 2FA,
SCRAM-SHA-256 with an independent client, and a brute force from 100 client IPs.

Every test makes its own domain and accounts through the admin API and speaks from client IPs
no other test uses (127.0.0.50 and up; the attackers are 127.0.0.100-199): intrusion prevention
counts per IP across the whole session-scoped stack, so sharing an IP would share its counters.
Nothing here changes a server setting; the blocks the brute force causes are removed at the end.
Each test asks for ``demo`` before ``admin``: bootstrap_demo waits until the bootstrap admin
exists, which the ``admin`` fixture alone does not.
"""

from __future__ import annotations

import asyncio
import base64
import imaplib
import poplib
import smtplib
import socket
import ssl
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyotp
import pytest
import scramp

from rempart.common.testing.devstack import AdminApi, Stack, strong_password
from rempart.common.testing.polling import wait_until
from rempart.imap_pop import replies as imap_replies
from rempart.smtp_edge import replies as smtp_replies

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mail_clients import IMAP_LOGIN_FAILED, MAX_FAILURES, BoundIMAP, intrusion_text, tls_context, unblock

# SPEC R-LOG-4, word for word.
POP3_LOGIN_FAILED = "-ERR [AUTH] Unknown user or incorrect password"
SMTP_AUTH_FAILED_CODE = 535
SCRAM = "SCRAM-SHA-256"
HASH_METRIC = "rempart_auth_hash_seconds_count"


# Clients bound to a source address -------------------------------------------------------------
class BoundPOP3(poplib.POP3):
    def __init__(self, stack: Stack, source_ip: str) -> None:
        self.source_ip = source_ip
        super().__init__("127.0.0.1", stack.ports["imap-pop.pop3"], timeout=20)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source_ip, 0))

    def user_pass_reply(self, user: str, password: str) -> str:
        self.user(user)
        try:
            return self.pass_(password).decode()
        except poplib.error_proto as exc:
            return bytes(exc.args[0]).decode()

    def command(self, line: str) -> bytes:
        """One command and its one-line reply (``+ <base64>`` continuations included: RFC 5034)."""
        reply: bytes = self._shortcmd(line)  # type: ignore[attr-defined]
        return reply


def submission(stack: Stack, source_ip: str) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", stack.ports["smtp-edge.submission"], timeout=20,
                          source_address=(source_ip, 0))
    client.starttls(context=tls_context(stack))
    client.ehlo()
    return client


def smtp_auth_plain(client: smtplib.SMTP, user: str, password: str) -> tuple[int, str]:
    """One AUTH PLAIN (smtplib's login() would try LOGIN after a failed PLAIN: two failures).
    Returns the reply code and text (without the code)."""
    client.user, client.password = user, password
    text: bytes | str
    try:
        code, text = client.auth("PLAIN", client.auth_plain)
    except smtplib.SMTPAuthenticationError as exc:
        code, text = exc.smtp_code, exc.smtp_error
    return code, text.decode() if isinstance(text, bytes) else text


# Admin API helpers -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Account:
    address: str
    password: str


def new_domain(admin: AdminApi, prefix: str) -> str:
    domain = f"{prefix}-{uuid.uuid4().hex[:8]}.test"
    status, body = admin.call("POST", "/v1/domains", {"name": domain})
    assert status == 201, body
    return domain


def new_account(admin: AdminApi, domain: str, local: str) -> Account:
    account = Account(f"{local}@{domain}", strong_password())
    status, body = admin.call("POST", f"/v1/domains/{domain}/accounts",
                              {"address": account.address, "password": account.password})
    assert status == 201, body
    return account


def events(admin: AdminApi, after_seq: int = 0, **filters: str) -> list[dict[str, Any]]:
    """Events matching ``filters`` newer than ``after_seq``, following ``next_before``: one
    request scans a bounded part of the stream, and a brute force writes many events."""
    found: list[dict[str, Any]] = []
    before: int | None = None
    for _ in range(100):
        query = {**filters, "limit": "500"} | ({"before": str(before)} if before else {})
        status, body = admin.call("GET", "/v1/events?" + urllib.parse.urlencode(query))
        assert status == 200 and isinstance(body, dict), body
        found += [e for e in body["events"] if int(e["seq"]) > after_seq]
        before = body.get("next_before")
        if not before or before <= after_seq + 1:
            return found
    raise AssertionError(f"more events than this test pages through: {filters}")


def last_event_seq(admin: AdminApi) -> int:
    status, body = admin.call("GET", "/v1/events?limit=1")
    assert status == 200 and isinstance(body, dict), body
    return int(body["events"][0]["seq"]) if body["events"] else 0


def hash_count(stack: Stack) -> float:
    """How many Argon2id computations the auth service made (its ops /metrics)."""
    url = f"http://127.0.0.1:{stack.ports['auth.ops']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(HASH_METRIC + " "):
            return float(line.split()[1])
    raise AssertionError(f"{HASH_METRIC} not in the auth service's /metrics")


def settled_hash_count(stack: Stack, timeout: float = 30.0) -> float:
    """The hash count once it stops moving: a call whose caller gave up (deadline) still
    finishes the hash it started, after the client saw its answer."""
    deadline = time.monotonic() + timeout
    last = hash_count(stack)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = hash_count(stack)
        if now == last:
            return now
        last = now
    raise AssertionError(f"the auth service kept hashing for {timeout}s after the attack ({last})")


@pytest.fixture
def blocked_cleanup(admin: AdminApi) -> Iterator[list[str]]:
    """IPs a test may get blocked; every one is unblocked afterwards, pass or fail."""
    ips: list[str] = []
    yield ips
    unblock(admin, ips)


# R-LOG-1, R-LOG-4 ------------------------------------------------------------------------------
def test_r_log_1_lockout_through_pop3_and_smtp_auth(
    stack: Stack, demo: dict[str, str], admin: AdminApi, blocked_cleanup: list[str]
) -> None:
    blocked_cleanup += ["127.0.0.50", "127.0.0.51"]
    domain = new_domain(admin, "lockout")
    victim = new_account(admin, domain, "victim")
    first_seq = last_event_seq(admin)

    pop = BoundPOP3(stack, "127.0.0.50")
    try:
        pop.stls(context=tls_context(stack))
        # Five different wrong passwords: a repeated identical one counts once (issue 4).
        for n in range(MAX_FAILURES):
            assert pop.user_pass_reply(victim.address, f"wrong-{n}-{uuid.uuid4().hex}") == POP3_LOGIN_FAILED
        # Locked: the right password gets exactly the wrong-password answer (R-LOG-4).
        assert pop.user_pass_reply(victim.address, victim.password) == POP3_LOGIN_FAILED
        pop.quit()
    finally:
        pop.close()

    with submission(stack, "127.0.0.51") as client:
        code, text = smtp_auth_plain(client, victim.address, victim.password)
    assert (code, text) == (SMTP_AUTH_FAILED_CODE, smtp_replies.AUTH_INVALID[4:])
    assert text.startswith("5.7.8 ")

    def locked_event() -> list[dict[str, object]]:
        return events(admin, first_seq, area="auth", what="account_locked", account=victim.address)

    found = wait_until(locked_event, what="an auth/account_locked event in GET /v1/events")
    assert isinstance(found, list)
    assert found[0]["account"] == victim.address


def test_r_log_4_unknown_user_same_reply(stack: Stack, demo: dict[str, str], admin: AdminApi, blocked_cleanup: list[str]) -> None:
    blocked_cleanup += ["127.0.0.52", "127.0.0.53"]
    domain = new_domain(admin, "enum")
    known = new_account(admin, domain, "known")
    logins = {
        "wrong password": (known.address, "not-" + known.password),
        "unknown user": (f"nobody@{domain}", known.password),
        "unknown domain": (f"known@{uuid.uuid4().hex[:8]}.invalid", known.password),
    }

    def timed(fn: Callable[[str, str], str]) -> dict[str, tuple[str, float]]:
        out = {}
        for case, (user, password) in logins.items():
            started = time.monotonic()
            reply = fn(user, password)
            out[case] = (reply, time.monotonic() - started)
        return out

    pop = BoundPOP3(stack, "127.0.0.52")
    try:
        pop.stls(context=tls_context(stack))
        pop_seen = timed(pop.user_pass_reply)
    finally:
        pop.close()
    with BoundIMAP(stack, "127.0.0.53") as imap:
        imap.starttls(ssl_context=tls_context(stack))
        imap_seen = timed(imap.login_reply)

    assert {case: reply for case, (reply, _) in pop_seen.items()} == dict.fromkeys(logins, POP3_LOGIN_FAILED)
    assert {case: reply for case, (reply, _) in imap_seen.items()} == dict.fromkeys(logins, IMAP_LOGIN_FAILED)
    assert IMAP_LOGIN_FAILED == imap_replies.IMAP_AUTH_FAILED
    # The same delay too: an unknown user pays a dummy hash and the same floor (R-LOG-4).
    for replies in (pop_seen, imap_seen):
        durations = [seconds for _, seconds in replies.values()]
        assert max(durations) - min(durations) < 0.5, replies


# R-2FA-2 ---------------------------------------------------------------------------------------
def test_r_2fa_2_app_password_only_when_2fa_on(stack: Stack, demo: dict[str, str], admin: AdminApi, blocked_cleanup: list[str]) -> None:
    blocked_cleanup += ["127.0.0.54", "127.0.0.55"]
    domain = new_domain(admin, "twofa")
    user = new_account(admin, domain, "phone-user")

    # Before 2FA the main password works over IMAP.
    with BoundIMAP(stack, "127.0.0.54") as imap:
        imap.starttls(ssl_context=tls_context(stack))
        assert imap.login_reply(user.address, user.password).startswith("OK ")
        imap.logout()

    # The user turns TOTP on through self-service and makes an app password.
    api = AdminApi(admin.base_url)
    api.login(user.address, user.password)
    status, body = api.call("POST", "/v1/me/totp")
    assert status == 200, body
    assert isinstance(body, dict)
    status, body = api.call("POST", "/v1/me/totp/confirm", {"code": pyotp.TOTP(str(body["secret"])).now()})
    assert status == 200, body
    status, body = api.call("POST", "/v1/me/app-passwords", {"name": "Mail on the phone"})
    assert status == 201, body
    assert isinstance(body, dict)
    app_password = str(body["password"])
    status, listed = api.call("GET", "/v1/me/app-passwords")
    assert status == 200 and app_password not in str(listed), "an app password is shown once, never listed"

    with BoundIMAP(stack, "127.0.0.54") as imap:
        imap.starttls(ssl_context=tls_context(stack))
        assert imap.login_reply(user.address, user.password) == IMAP_LOGIN_FAILED
        assert imap.login_reply(user.address, app_password).startswith("OK ")
        assert imap.select("INBOX")[0] == "OK"
        imap.logout()

    with submission(stack, "127.0.0.55") as client:
        code, text = smtp_auth_plain(client, user.address, user.password)
        assert (code, text) == (SMTP_AUTH_FAILED_CODE, smtp_replies.AUTH_INVALID[4:])
        code, text = smtp_auth_plain(client, user.address, app_password)
        assert (code, text) == (235, smtp_replies.AUTH_OK[4:])

    status, listed = api.call("GET", "/v1/me/app-passwords")
    assert status == 200 and isinstance(listed, dict)
    assert [entry["name"] for entry in listed["app_passwords"]] == ["Mail on the phone"]
    assert listed["app_passwords"][0]["last_used"], "a successful use is recorded"


# R-TLS-2: SCRAM-SHA-256 ------------------------------------------------------------------------
class ScramConversation:
    """scramp's client side, as a SASL callback: client-first, client-final, then check the
    server's signature (RFC 5802 section 5: the client authenticates the server too)."""

    def __init__(self, user: str, password: str) -> None:
        self.client = scramp.ScramClient([SCRAM], user, password)
        self.step = 0
        self.server_verified = False

    def __call__(self, challenge: bytes | None = None) -> str:
        # The first call has no challenge (smtplib's initial response) or an empty one.
        self.step += 1
        if self.step == 1:
            return str(self.client.get_client_first())
        assert challenge is not None
        if self.step == 2:
            self.client.set_server_first(challenge.decode())
            return str(self.client.get_client_final())
        self.client.set_server_final(challenge.decode())  # raises ScramException on a bad signature
        self.server_verified = True
        return ""

    def imap(self, challenge: bytes) -> bytes:
        """imaplib's authobject: bytes in, bytes out."""
        return self(challenge).encode()


def test_r_tls_2_scram_sha_256_over_imap_and_smtp(stack: Stack, demo: dict[str, str], admin: AdminApi, blocked_cleanup: list[str]) -> None:
    blocked_cleanup += ["127.0.0.56", "127.0.0.57", "127.0.0.58"]
    domain = new_domain(admin, "scram")
    user = new_account(admin, domain, "scram-user")

    # IMAP, before TLS: SCRAM never shows the password, so it is offered where LOGIN is not.
    with BoundIMAP(stack, "127.0.0.56") as imap:
        assert f"AUTH={SCRAM}" in imap.capabilities and "LOGINDISABLED" in imap.capabilities
        wrong = ScramConversation(user.address, "not-" + user.password)
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            imap.authenticate(SCRAM, wrong.imap)
        assert not wrong.server_verified
        right = ScramConversation(user.address, user.password)
        typ, data = imap.authenticate(SCRAM, right.imap)
        assert typ == "OK", data
        assert right.server_verified
        assert imap.select("INBOX")[0] == "OK"
        imap.logout()

    # POP3 (RFC 5034) inside STLS.
    pop = BoundPOP3(stack, "127.0.0.57")
    try:
        pop.stls(context=tls_context(stack))
        conversation = ScramConversation(user.address, user.password)
        reply = pop.command(f"AUTH {SCRAM}")
        while reply.startswith(b"+ ") or reply == b"+":
            answer = conversation(base64.b64decode(reply[2:], validate=True))
            reply = pop.command(base64.b64encode(answer.encode()).decode())
        assert reply.startswith(b"+OK"), reply
        assert conversation.server_verified
        assert pop.stat()[0] >= 0
        pop.quit()
    finally:
        pop.close()

    # SMTP AUTH (RFC 4954) on submission, when the edge offers SCRAM-SHA-256.
    with submission(stack, "127.0.0.58") as client:
        offered = client.esmtp_features.get("auth", "").upper().split()
        if SCRAM in offered:
            conversation = ScramConversation(user.address, user.password)
            code, text = client.auth(SCRAM, conversation)
            assert (code, text.decode()) == (235, smtp_replies.AUTH_OK[4:])
            assert conversation.server_verified


# R-IPS-2 with R-LOG-1: a brute force -----------------------------------------------------------
ATTACKERS = [f"127.0.0.{n}" for n in range(100, 200)]
ATTEMPTS = 2000
CONCURRENCY = 50
KNOWN_IP = "127.0.0.60"
PROBE_IPS = [f"127.0.0.{n}" for n in range(61, 66)]


async def imap_attempt(stack: Stack, ctx: ssl.SSLContext, source_ip: str, login: str, password: str) -> str:
    """One attacker connection on the plain IMAP port: greeting, STARTTLS (LOGIN is refused
    before TLS from an untrusted IP), one LOGIN. Returns what the client saw:
    ``refused_at_connect``, ``auth_failed``, ``tempfail``, ``ok`` or the unexpected line."""
    async with asyncio.timeout(30):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", stack.ports["imap-pop.imap"], local_addr=(source_ip, 0)
        )
        try:
            greeting = (await reader.readline()).decode().rstrip("\r\n")
            if greeting == f"* BYE {intrusion_text(source_ip)}":
                return "refused_at_connect"
            if not greeting.startswith("* OK"):
                return f"greeting: {greeting!r}"
            writer.write(b"s STARTTLS\r\n")
            line = await reader.readline()
            if not line.startswith(b"s OK"):
                return f"starttls: {line!r}"
            await writer.start_tls(ctx, server_hostname="localhost")
            writer.write(f'a LOGIN "{login}" "{password}"\r\n'.encode())
            await writer.drain()
            while True:
                line = await reader.readline()
                if not line:
                    return "closed without a reply"
                text = line.decode(errors="replace").rstrip("\r\n")
                if not text.startswith("a "):
                    continue
                if text == f"a {IMAP_LOGIN_FAILED}":
                    return "auth_failed"
                if text == f"a {imap_replies.IMAP_TEMPFAIL}":
                    return "tempfail"
                if text.startswith("a OK"):
                    return "ok"
                return f"login: {text!r}"
        finally:
            writer.close()
            try:
                async with asyncio.timeout(5):
                    await writer.wait_closed()
            except (OSError, ssl.SSLError, TimeoutError):
                pass


async def run_attempts(stack: Stack, attempts: list[tuple[str, str, str]]) -> list[str]:
    ctx = tls_context(stack)
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one(ip: str, login: str, password: str) -> str:
        async with slots:
            try:
                return await imap_attempt(stack, ctx, ip, login, password)
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                return f"error: {type(exc).__name__}: {exc}"

    return await asyncio.gather(*(one(*a) for a in attempts))


def test_r_ips_2_brute_force_2000_attempts_100_ips(
    stack: Stack, demo: dict[str, str], admin: AdminApi, blocked_cleanup: list[str]
) -> None:
    """Issue 4's brute force. Each attempt is one connection with one guess, as most spraying
    tools do, so an IP's sixth connection within a minute blocks it (R-IPS-2, more than 5 per
    minute) before its failed logins reach the other trigger; the five guesses each IP got
    through lock the accounts (R-LOG-1), and from then on nothing costs a hash."""
    blocked_cleanup += [*ATTACKERS, KNOWN_IP, *PROBE_IPS]
    domain = new_domain(admin, "spray")
    targets = [new_account(admin, domain, f"user{n}") for n in range(5)]
    real_user = targets[0]

    # The real user reads mail from home before the attack: 127.0.0.60 becomes a known IP.
    with BoundIMAP(stack, KNOWN_IP) as imap:
        imap.starttls(ssl_context=tls_context(stack))
        assert imap.login_reply(real_user.address, real_user.password).startswith("OK ")
        imap.logout()

    # 2,000 attempts, each a connection with one guess, round-robin over 100 IPs and 5 accounts.
    attack = [
        (ATTACKERS[i % len(ATTACKERS)], targets[(i // len(ATTACKERS) + i) % len(targets)].address,
         f"guess{i}x{uuid.uuid4().hex[:6]}")
        for i in range(ATTEMPTS)
    ]
    first_seq = last_event_seq(admin)
    hashes_before = hash_count(stack)
    started = time.monotonic()
    outcomes = Counter(asyncio.run(run_attempts(stack, attack)))
    attack_seconds = time.monotonic() - started
    hashes_after_attack = settled_hash_count(stack)
    report = f"{dict(outcomes)} in {attack_seconds:.1f}s, {hashes_after_attack - hashes_before:.0f} hashes"

    assert outcomes["ok"] == 0, report
    unexpected = {k: v for k, v in outcomes.items() if k not in ("refused_at_connect", "auth_failed", "tempfail")}
    assert not unexpected, report
    # Intrusion prevention stops most attempts at connect, before TLS, auth or any hash.
    assert outcomes["refused_at_connect"] > ATTEMPTS // 2, report
    # Once the accounts locked, attempts stopped costing hashes: fewer hashes than guesses reached
    # the auth service (the ones before the lock, and those already past the gate, waiting for a
    # hash slot). Under CPU contention some guesses get NO [UNAVAILABLE]: the auth call's deadline
    # passed while they queued for a hash slot (fail closed; they count for neither lock nor IPS).
    assert hashes_after_attack - hashes_before < outcomes["auth_failed"] + outcomes["tempfail"], report

    # Every account locked (R-LOG-1) ...
    locked = {str(e["account"]) for e in events(admin, first_seq, area="auth", what="account_locked")}
    assert {t.address for t in targets} <= locked, (locked, report)
    # ... and every attacker IP is blocked (R-IPS-2), refused at connect with the guide's text.
    status, body = admin.call("GET", "/v1/ips/blocks")
    assert status == 200 and isinstance(body, dict), body
    blocked = {str(b["ip"]) for b in body["blocks"]}
    assert set(ATTACKERS) <= blocked, sorted(set(ATTACKERS) - blocked)

    # More attempts after the lock: from every blocked IP (refused at connect) and, from fresh
    # IPs, the right password of each locked account (refused by the lock): not one hash.
    again = [(ip, real_user.address, real_user.password) for ip in ATTACKERS]
    again += [(ip, t.address, t.password) for ip, t in zip(PROBE_IPS, targets, strict=True)]
    late = asyncio.run(run_attempts(stack, again))
    assert late[: len(ATTACKERS)] == ["refused_at_connect"] * len(ATTACKERS), Counter(late)
    assert late[len(ATTACKERS):] == ["auth_failed"] * len(PROBE_IPS), late
    assert hash_count(stack) == hashes_after_attack, "a refused attempt after the lock computed a hash"

    # The real user, from their known IP, still gets in, and that login is the one hash.
    with BoundIMAP(stack, KNOWN_IP) as imap:
        imap.starttls(ssl_context=tls_context(stack))
        assert imap.login_reply(real_user.address, real_user.password).startswith("OK ")
        assert imap.select("INBOX")[0] == "OK"
        imap.logout()
    assert 1 <= hash_count(stack) - hashes_after_attack <= 2
