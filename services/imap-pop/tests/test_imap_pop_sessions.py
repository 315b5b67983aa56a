"""What happens around sessions: closing every session of a freshly blocked IP on every replica
(R-IPS-4), policy after every login result and at disconnect (DESIGN.md), the POP3 maildrop lock
(RFC 3206 [IN-USE]), and SCRAM-SHA-256 (R-TLS-2) with scramp's client side.
"""

from __future__ import annotations

import asyncio
import base64
import imaplib
import time

import pytest
from imappop_helpers import BOB, BOB_PASSWORD, UNTRUSTED_IP, SourceIMAP, raw_connect
from scramp import ScramClient

from rempart.common import keys
from rempart.common.config import SettingsStore
from rempart.common.events import IPS_BLOCKED
from rempart.common.pb.events.v1 import events_pb2
from rempart.common.pb.policy.v1 import policy_pb2
from rempart.common.testing.polling import eventually
from rempart.imap_pop import replies as R

pytestmark = pytest.mark.timeout(60)

OFFENDER = "127.0.0.5"
BYSTANDER = "127.0.0.6"


async def imap_logged_in(port: int, source: str = "127.0.0.1"):  # type: ignore[no-untyped-def]
    def run():  # type: ignore[no-untyped-def]
        raw = raw_connect(port, source)
        raw.line()
        raw.send(f'a LOGIN {BOB} "{BOB_PASSWORD}"\r\n'.encode())
        assert raw.until(b"a ")[-1].startswith(b"a OK")
        return raw

    return await asyncio.to_thread(run)


async def set_server_settings(service, redis, doc: dict[str, object]) -> None:  # type: ignore[no-untyped-def]
    await SettingsStore(redis).put_doc("server", doc)
    await service.backend.config.refresh()


async def test_r_ips_4_blocked_event_closes_every_session_of_the_ip_on_every_replica(
    start_service, redis, nats_conn  # type: ignore[no-untyped-def]
) -> None:
    first, second = await start_service(), await start_service()
    await set_server_settings(first, redis, {"ips": {"close_all_connections": True},
                                             "relay": {"trusted_hosts": ["127.0.0.0/8"]}})
    await second.backend.config.refresh()

    idling = await imap_logged_in(first.ports["imap"], OFFENDER)
    idling.send(b"b IDLE\r\n")
    assert (await asyncio.to_thread(idling.line)).startswith(b"+ ")
    other_replica = await imap_logged_in(second.ports["imap"], OFFENDER)
    pop = await asyncio.to_thread(raw_connect, second.ports["pop3"], OFFENDER)
    assert (await asyncio.to_thread(pop.line)).startswith(b"+OK")
    bystander = await imap_logged_in(first.ports["imap"], BYSTANDER)

    event = events_pb2.Event(area="ips", what="blocked", client_ip=OFFENDER, reason="R-IPS-2")
    await nats_conn.publish(IPS_BLOCKED, event.SerializeToString())

    text = f"Intrusion prevention active for [{OFFENDER}]"
    assert await asyncio.to_thread(idling.line) == f"* BYE {text}".encode()
    assert await asyncio.to_thread(other_replica.line) == f"* BYE {text}".encode()
    assert await asyncio.to_thread(pop.line) == f"-ERR {text}".encode()
    assert all([await asyncio.to_thread(c.closed) for c in (idling, other_replica, pop)])

    def bystander_noop() -> list[bytes]:
        bystander.send(b"n NOOP\r\n")
        return bystander.until(b"n ")

    assert await asyncio.to_thread(bystander_noop) == [b"n OK NOOP completed"]
    # The closed sessions still tell policy they are gone (simultaneous-connection counting).
    deadline = time.monotonic() + 5
    while len(first.policy.stages(policy_pb2.STAGE_DISCONNECT)) < 1 or \
            len(second.policy.stages(policy_pb2.STAGE_DISCONNECT)) < 2:
        assert time.monotonic() < deadline, "disconnects not reported"
        await asyncio.sleep(0.05)
    assert first.server.session_count == 1 and second.server.session_count == 0


async def test_r_ips_4_blocked_event_leaves_sessions_open_when_option_off(service, redis, nats_conn) -> None:  # type: ignore[no-untyped-def]
    assert service.backend.config.server.ips.close_all_connections is False  # SPEC: optional, default off
    await set_server_settings(service, redis, {"relay": {"trusted_hosts": ["127.0.0.0/8"]}})
    raw = await imap_logged_in(service.ports["imap"], OFFENDER)
    await nats_conn.publish(IPS_BLOCKED, events_pb2.Event(client_ip=OFFENDER).SerializeToString())
    await nats_conn.publish(IPS_BLOCKED, b"\xff not a protobuf")  # ignored, never fatal
    await asyncio.sleep(0.3)

    def noop() -> list[bytes]:
        raw.send(b"n NOOP\r\n")
        return raw.until(b"n ")

    assert await asyncio.to_thread(noop) == [b"n OK NOOP completed"]


async def test_r_rel_1_successful_login_reported_to_policy_with_account(service) -> None:  # type: ignore[no-untyped-def]
    await imap_logged_in(service.ports["imap"])

    def pop_login() -> bytes:
        pop = raw_connect(service.ports["pop3"])
        pop.line()
        pop.send(f"USER {BOB}\r\nPASS {BOB_PASSWORD}\r\nQUIT\r\n".encode())
        return b"\n".join([pop.line(), pop.line(), pop.line()])

    assert b"+OK Logged in" in await asyncio.to_thread(pop_login)
    checks = service.policy.stages(policy_pb2.STAGE_AUTH)
    assert [(c.session.protocol, c.auth_success, c.auth_login, c.session.authenticated_account, c.auth_failure)
            for c in checks] == [(policy_pb2.PROTOCOL_IMAP, True, BOB, BOB, ""),
                                 (policy_pb2.PROTOCOL_POP3, True, BOB, BOB, "")]


async def test_policy_refusing_after_a_right_password_keeps_the_session_out(service, redis) -> None:  # type: ignore[no-untyped-def]
    await set_server_settings(service, redis, {"relay": {"trusted_hosts": ["127.0.0.0/8"]}})
    service.policy.auth_verdicts["127.0.0.7"] = policy_pb2.Verdict(action=policy_pb2.ACTION_CLOSE, code=421)
    service.policy.auth_verdicts["127.0.0.8"] = policy_pb2.Verdict(action=policy_pb2.ACTION_TEMPFAIL, code=451)

    def attempt(source: str) -> tuple[list[bytes], bool]:
        raw = raw_connect(service.ports["imap"], source)
        raw.line()
        raw.send(f'a LOGIN {BOB} "{BOB_PASSWORD}"\r\nb SELECT INBOX\r\n'.encode())
        lines = raw.until(b"a ")
        if source == "127.0.0.7":
            return lines + raw.until(b"* BYE"), raw.closed()
        return lines + raw.until(b"b "), False

    closed_lines, closed = await asyncio.to_thread(attempt, "127.0.0.7")
    assert closed_lines == [b"a " + R.IMAP_AUTH_FAILED.encode(), b"* BYE Connection closed by policy"]
    assert closed
    tempfail_lines, _ = await asyncio.to_thread(attempt, "127.0.0.8")
    assert tempfail_lines == [b"a " + R.IMAP_TEMPFAIL.encode(), b"b BAD Unknown command or wrong state"]


async def test_disconnect_reported_to_policy_without_delaying_the_close(service) -> None:  # type: ignore[no-untyped-def]
    service.policy.disconnect_delay = 1.0  # a slow policy service (within the 2 s call deadline)

    def logout_and_time(protocol: str) -> float:
        raw = raw_connect(service.ports[protocol])
        raw.line()
        raw.send(b"a LOGOUT\r\n" if protocol == "imap" else b"QUIT\r\n")
        raw.line()
        if protocol == "imap":
            raw.line()
        started = time.monotonic()
        assert raw.closed()
        return time.monotonic() - started

    imap_close, pop3_close = await asyncio.gather(asyncio.to_thread(logout_and_time, "imap"),
                                                  asyncio.to_thread(logout_and_time, "pop3"))
    assert imap_close < 0.3 and pop3_close < 0.3
    connects = service.policy.stages(policy_pb2.STAGE_CONNECT)
    deadline = time.monotonic() + 5
    while len(service.policy.stages(policy_pb2.STAGE_DISCONNECT)) < 2:
        assert time.monotonic() < deadline, "disconnect never reported"
        await asyncio.sleep(0.05)
    disconnects = service.policy.stages(policy_pb2.STAGE_DISCONNECT)
    assert sorted(d.session.session_id for d in disconnects) == sorted(c.session.session_id for c in connects)
    assert {d.session.protocol for d in disconnects} == {policy_pb2.PROTOCOL_IMAP, policy_pb2.PROTOCOL_POP3}


async def test_rfc_3206_pop3_in_use_while_another_session_holds_the_maildrop(service, redis) -> None:  # type: ignore[no-untyped-def]
    def login(raw) -> bytes:  # type: ignore[no-untyped-def]
        raw.send(f"USER {BOB}\r\nPASS {BOB_PASSWORD}\r\n".encode())
        raw.line()
        return raw.line()  # type: ignore[no-any-return]

    def run() -> tuple[bytes, bytes, bytes, bytes]:
        holder = raw_connect(service.ports["pop3"])
        holder.line()
        first = login(holder)
        second = raw_connect(service.ports["pop3"])
        second.line()
        refused = login(second)
        holder.send(b"QUIT\r\n")
        holder.line()
        holder.closed()
        third = raw_connect(service.ports["pop3"])
        third.line()
        after_quit = login(third)
        third.sock.close()  # dropped without QUIT: the lock must not outlive the session
        return first, refused, after_quit, b""

    first, refused, after_quit, _ = await asyncio.to_thread(run)
    assert first.startswith(b"+OK Logged in")
    assert refused == R.POP3_IN_USE.encode() == b"-ERR [IN-USE] Mailbox locked by another POP3 session"
    assert after_quit.startswith(b"+OK Logged in")
    lock = keys.pop3_maildrop_lock(BOB)
    deadline = time.monotonic() + 5
    while await redis.exists(lock):
        assert time.monotonic() < deadline, "lock left behind by a dropped session"
        await asyncio.sleep(0.05)
    # IMAP is not held back by a POP3 session (RFC 3206 is about POP3 maildrops).
    await imap_logged_in(service.ports["imap"])


async def test_rfc_3206_pop3_lock_has_a_short_ttl_renewed_by_its_session(start_service, redis) -> None:  # type: ignore[no-untyped-def]
    service = await start_service(pop3_lock_seconds=1.0)

    def hold() -> object:
        raw = raw_connect(service.ports["pop3"])
        raw.line()
        raw.send(f"USER {BOB}\r\nPASS {BOB_PASSWORD}\r\n".encode())
        raw.line()
        assert raw.line().startswith(b"+OK Logged in")
        return raw

    raw = await asyncio.to_thread(hold)
    lock = keys.pop3_maildrop_lock(BOB)
    assert 0 < await redis.pttl(lock) <= 1000
    await asyncio.sleep(1.4)  # longer than the TTL: only renewal keeps it
    assert await redis.exists(lock)
    raw.sock.close()  # type: ignore[attr-defined]


def scram_imap(port: int, password: str, source: str, sasl_ir: bool) -> tuple[list[bytes], str]:
    client = ScramClient(["SCRAM-SHA-256"], BOB, password)
    raw = raw_connect(port, source)
    greeting = raw.line()
    first = base64.b64encode(client.get_client_first().encode())
    if sasl_ir:
        raw.send(b"a AUTHENTICATE SCRAM-SHA-256 " + first + b"\r\n")
    else:
        raw.send(b"a AUTHENTICATE SCRAM-SHA-256\r\n")
        assert raw.line() == b"+ "
        raw.send(first + b"\r\n")
    challenge = raw.line()
    assert challenge.startswith(b"+ ")
    client.set_server_first(base64.b64decode(challenge[2:]).decode())
    raw.send(base64.b64encode(client.get_client_final().encode()) + b"\r\n")
    reply = raw.line()
    verified = "no server-final"
    if reply.startswith(b"+ "):
        client.set_server_final(base64.b64decode(reply[2:]).decode())  # raises unless the server knew the keys
        verified = "server verified"
        raw.send(b"\r\n")
        reply = raw.line()
    lines = [greeting, reply]
    if reply.startswith(b"a OK"):
        raw.send(b"b SELECT INBOX\r\n")
        lines.append(raw.until(b"b ")[-1])
    return lines, verified


async def test_r_tls_2_imap_scram_sha_256_before_tls_with_scramp_client(service) -> None:  # type: ignore[no-untyped-def]
    port = service.ports["imap"]
    lines, verified = await asyncio.to_thread(scram_imap, port, BOB_PASSWORD, UNTRUSTED_IP, False)
    assert b"AUTH=SCRAM-SHA-256" in lines[0] and b"LOGINDISABLED" in lines[0]
    assert lines[1].startswith(b"a OK [CAPABILITY ") and lines[1].endswith(b"Logged in")
    assert lines[2].startswith(b"b OK [READ-WRITE]")
    assert verified == "server verified"
    lines, verified = await asyncio.to_thread(scram_imap, port, BOB_PASSWORD, UNTRUSTED_IP, True)  # SASL-IR
    assert lines[1].startswith(b"a OK") and verified == "server verified"
    lines, verified = await asyncio.to_thread(scram_imap, port, "wrong password", UNTRUSTED_IP, False)
    assert lines[1] == b"a " + R.IMAP_AUTH_FAILED.encode() and verified == "no server-final"
    assert not service.auth.requests  # no password ever went to Authenticate
    assert [r.protocol for r in service.auth.scram_requests] == ["imap"] * 3
    assert all(not r.tls and r.client_ip == UNTRUSTED_IP for r in service.auth.scram_requests)
    checks = service.policy.stages(policy_pb2.STAGE_AUTH)
    assert [(c.auth_success, c.auth_login) for c in checks] == [(True, BOB), (True, BOB), (False, BOB)]
    assert checks[-1].auth_failure == "AUTH_STATUS_INVALID"


async def test_r_tls_2_imap_scram_cancel_and_garbage(service) -> None:  # type: ignore[no-untyped-def]
    def run() -> list[bytes]:
        raw = raw_connect(service.ports["imap"], UNTRUSTED_IP)
        raw.line()
        raw.send(b"a AUTHENTICATE SCRAM-SHA-256\r\n")
        raw.line()
        raw.send(b"*\r\n")
        out = raw.until(b"a ")
        raw.send(b"b AUTHENTICATE SCRAM-SHA-256 !!notbase64\r\n")
        out += raw.until(b"b ")
        client = ScramClient(["SCRAM-SHA-256"], BOB, BOB_PASSWORD)
        raw.send(b"c AUTHENTICATE SCRAM-SHA-256 " + base64.b64encode(client.get_client_first().encode()) + b"\r\n")
        raw.line()
        raw.send(b"*\r\n")  # cancel in the second round
        out += raw.until(b"c ")
        raw.send(b"d NOOP\r\n")
        return out + raw.until(b"d ")

    assert await asyncio.to_thread(run) == [
        b"a BAD Authentication cancelled", b"b BAD Can't decode base64", b"c BAD Authentication cancelled",
        b"d OK NOOP completed"]


async def test_r_tls_2_pop3_scram_sha_256_before_stls_with_scramp_client(service) -> None:  # type: ignore[no-untyped-def]
    def run(initial: bool, password: str) -> tuple[list[bytes], str]:
        client = ScramClient(["SCRAM-SHA-256"], BOB, password)
        raw = raw_connect(service.ports["pop3"], UNTRUSTED_IP)
        raw.line()
        first = base64.b64encode(client.get_client_first().encode())
        if initial:
            raw.send(b"AUTH SCRAM-SHA-256 " + first + b"\r\n")
        else:
            raw.send(b"AUTH SCRAM-SHA-256\r\n")
            assert raw.line() == b"+ "
            raw.send(first + b"\r\n")
        challenge = raw.line()
        client.set_server_first(base64.b64decode(challenge[2:]).decode())
        raw.send(base64.b64encode(client.get_client_final().encode()) + b"\r\n")
        reply = raw.line()
        verified = "no server-final"
        if reply.startswith(b"+ "):
            client.set_server_final(base64.b64decode(reply[2:]).decode())
            verified = "server verified"
            raw.send(b"\r\n")
            reply = raw.line()
        raw.send(b"STAT\r\nQUIT\r\n")
        return [reply, raw.line()], verified

    ok, verified = await asyncio.to_thread(run, False, BOB_PASSWORD)
    assert ok[0] == b"+OK Logged in, 0 messages" and ok[1] == b"+OK 0 0" and verified == "server verified"
    ok, verified = await asyncio.to_thread(run, True, BOB_PASSWORD)
    assert ok[0].startswith(b"+OK Logged in") and verified == "server verified"
    bad, verified = await asyncio.to_thread(run, False, "wrong")
    assert bad[0] == R.POP3_AUTH_FAILED.encode() and verified == "no server-final"

    def cancel() -> list[bytes]:
        raw = raw_connect(service.ports["pop3"], UNTRUSTED_IP)
        raw.line()
        raw.send(b"AUTH SCRAM-SHA-256\r\n")
        raw.line()
        raw.send(b"*\r\nAUTH\r\n")
        return [raw.line(), raw.line(), raw.line(), raw.line()]

    assert await asyncio.to_thread(cancel) == [b"-ERR Authentication cancelled", b"+OK", b"SCRAM-SHA-256", b"."]


async def test_scram_with_auth_service_down_is_a_temporary_failure(start_service) -> None:  # type: ignore[no-untyped-def]
    service = await start_service(auth_up=False)

    def run() -> bytes:
        client = ScramClient(["SCRAM-SHA-256"], BOB, BOB_PASSWORD)
        raw = raw_connect(service.ports["imap"])
        raw.line()
        raw.send(b"a AUTHENTICATE SCRAM-SHA-256 " + base64.b64encode(client.get_client_first().encode()) + b"\r\n")
        return raw.line()

    assert await asyncio.to_thread(run) == b"a " + R.IMAP_TEMPFAIL.encode()


async def test_r_ips_6_block_of_an_ipv6_prefix_closes_every_session_inside_it(
    start_service, redis, nats_conn  # type: ignore[no-untyped-def]
) -> None:
    # Clients behind a load balancer: their addresses come from the PROXY header.
    service = await start_service(proxy_cidrs="127.0.0.1/32")
    await set_server_settings(service, redis, {"ips": {"close_all_connections": True}})

    def connect(address: str):  # type: ignore[no-untyped-def]
        raw = raw_connect(service.ports["imap"])
        raw.send(f"PROXY TCP6 {address} 2001:db8::1 40000 143\r\n".encode())
        assert raw.line().startswith(b"* OK")
        return raw

    inside = [await asyncio.to_thread(connect, a) for a in ("2001:db8:1:2::10", "2001:db8:1:2:ffff::20")]
    outside = await asyncio.to_thread(connect, "2001:db8:1:3::10")
    event = events_pb2.Event(area="ips", what="blocked", client_ip="2001:db8:1:2::10",
                             attributes={"prefix": "2001:db8:1:2::/64"})
    await nats_conn.publish(IPS_BLOCKED, event.SerializeToString())

    text = b"* BYE Intrusion prevention active for [2001:db8:1:2::10]"
    for raw in inside:
        assert await asyncio.to_thread(raw.line) == text
        assert await asyncio.to_thread(raw.closed)

    def noop() -> list[bytes]:
        outside.send(b"n NOOP\r\n")
        return outside.until(b"n ")

    assert await asyncio.to_thread(noop) == [b"n OK NOOP completed"]


async def test_imap_sessions_per_account_are_limited_across_replicas(start_service, redis) -> None:  # type: ignore[no-untyped-def]
    # Two replicas share the count (Redis); a third session of the account is refused with
    # [LIMIT] and the connection stays usable; a logout frees a place.
    first = await start_service(imap_max_sessions_per_account=2)
    second = await start_service(imap_max_sessions_per_account=2)

    def run() -> tuple[str, str, str]:
        a = SourceIMAP(first.ports["imap"])
        a.login(BOB, BOB_PASSWORD)
        b = SourceIMAP(second.ports["imap"])
        b.login(BOB, BOB_PASSWORD)
        c = SourceIMAP(second.ports["imap"])
        try:
            c.login(BOB, BOB_PASSWORD)
            refused = "logged in"
        except imaplib.IMAP4.error as exc:
            refused = str(exc)
        still = c.noop()[0]  # the refused connection is still usable
        a.logout()
        typ = c.login(BOB, BOB_PASSWORD)[0]
        b.logout()
        c.logout()
        return refused, still, typ

    refused, still, typ = await asyncio.to_thread(run)
    assert "[LIMIT] Too many connections for this account" in refused
    assert still == "OK" and typ == "OK"
    async def released() -> bool:  # every place released once the sessions end
        return await redis.zcard(keys.imap_account_sessions(BOB)) == 0

    await eventually(released, timeout=5, what="the sessions' places released")
