"""R-LOG-1: lock after N failures (shared by replicas), identical retries, known IPs, slow-down."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from rempart.common import keys
from rempart.common.pb.auth.v1 import auth_pb2

if TYPE_CHECKING:
    from conftest import AuthHarness, EventTap

GOOD = "Blue-Heron-42-Quiet"
BOB = "bob@example.org"
OK = auth_pb2.AUTH_STATUS_OK
INVALID = auth_pb2.AUTH_STATUS_INVALID
LOCKED = auth_pb2.AUTH_STATUS_LOCKED
ATTACKER = "198.51.100.7"


async def fail_times(auth: AuthHarness, count: int, client_ip: str = ATTACKER, start: int = 0) -> None:
    for i in range(start, start + count):
        assert (await auth.login(BOB, f"wrong-guess-{i}", client_ip=client_ip)).status == INVALID


async def test_r_log_1_lock_after_five_failures(auth: AuthHarness, auth_events: EventTap) -> None:
    await fail_times(auth, 4)
    # Four failures do not lock (and a success clears them).
    assert (await auth.login(BOB, GOOD, client_ip=ATTACKER)).status == OK
    await auth.redis.delete(keys.known_login_ips(BOB))
    await fail_times(auth, 5)
    (locked_event,) = await auth_events.wait_for("account_locked")
    assert locked_event.account == BOB and locked_event.reason == "too_many_failures"
    hashes_before = auth.service.servicer.hasher.hash_calls
    assert (await auth.login(BOB, GOOD, client_ip=ATTACKER)).status == LOCKED
    assert (await auth.login(BOB, "another-guess", client_ip="192.0.2.99")).status == LOCKED
    # A locked account is refused before any hash: a spray against it costs no CPU.
    assert auth.service.servicer.hasher.hash_calls == hashes_before
    until = float(await auth.redis.get(keys.login_lock(BOB)))
    assert 9 * 60 < until - time.time() <= 10 * 60  # default lock_minutes = 10


async def test_r_log_1_lock_parameters_follow_settings(auth: AuthHarness) -> None:
    await auth.server_settings({"login": {"failure_delay_ms": 0, "max_failures": 2, "lock_minutes": 3}})
    await fail_times(auth, 2)
    assert (await auth.login(BOB, GOOD)).status == LOCKED
    until = float(await auth.redis.get(keys.login_lock(BOB)))
    assert 2 * 60 < until - time.time() <= 3 * 60


async def test_r_log_1_identical_wrong_password_counts_once(auth: AuthHarness) -> None:
    for _ in range(12):
        assert (await auth.login(BOB, "my-old-password", client_ip="198.51.100.7")).status == INVALID
    assert (await auth.login(BOB, GOOD, client_ip="198.51.100.7")).status == OK


async def test_r_log_1_known_ip_keeps_working(auth: AuthHarness) -> None:
    home = "203.0.113.5"
    assert (await auth.login(BOB, GOOD, client_ip=home)).status == OK
    await fail_times(auth, 5, client_ip="198.51.100.7")
    assert (await auth.login(BOB, GOOD, client_ip="198.51.100.7")).status == LOCKED
    assert (await auth.login(BOB, GOOD, client_ip=home)).status == OK
    # The user's success does not lift the lock for the attacker's IP.
    assert (await auth.login(BOB, GOOD, client_ip="198.51.100.7")).status == LOCKED


async def test_r_log_1_known_ip_bypass_can_be_turned_off(auth: AuthHarness) -> None:
    await auth.server_settings({"login": {"failure_delay_ms": 0, "known_ip_bypass": False}})
    home = "203.0.113.5"
    assert (await auth.login(BOB, GOOD, client_ip=home)).status == OK
    await fail_times(auth, 5)
    assert (await auth.login(BOB, GOOD, client_ip=home)).status == LOCKED


async def test_r_log_1_expired_lock_is_lifted_by_success(auth: AuthHarness, auth_events: EventTap) -> None:
    await fail_times(auth, 5)
    assert (await auth.login(BOB, GOOD)).status == LOCKED
    # Let the lock expire (its record stays, so the first success after it is noticed).
    await auth.redis.set(keys.login_lock(BOB), f"{time.time() - 1:.3f}")
    assert (await auth.login(BOB, GOOD)).status == OK
    (event,) = await auth_events.wait_for("account_unlocked")
    assert event.account == BOB and event.reason == "lock_expired"
    assert not await auth.redis.exists(keys.login_lock(BOB))


async def test_r_log_1_counters_shared_between_replicas(
    auth: AuthHarness, make_auth: Callable[..., Awaitable[AuthHarness]]
) -> None:
    other = await make_auth()
    await fail_times(auth, 3)
    await fail_times(other, 2, start=3)
    assert (await other.login(BOB, GOOD)).status == LOCKED
    assert (await auth.login(BOB, GOOD)).status == LOCKED


async def test_r_log_1_slow_down_mode(auth: AuthHarness) -> None:
    await auth.server_settings({"login": {"failure_delay_ms": 0, "lockout_mode": "slow_down"}})
    timings: list[float] = []
    for i in range(6):
        started = time.monotonic()
        assert (await auth.login(BOB, f"wrong-guess-{i}")).status == INVALID
        timings.append(time.monotonic() - started)
    # Step 150 ms per recent failure (the test's slow_down_step_ms): 0, 0.15, 0.30, ... 0.75 s.
    assert timings[5] >= 0.74
    assert timings[5] - timings[0] >= 0.6
    assert timings[5] - timings[2] >= 0.3
    started = time.monotonic()
    assert (await auth.login(BOB, GOOD)).status == OK  # never locked in this mode
    assert time.monotonic() - started >= 0.89
    started = time.monotonic()
    assert (await auth.login(BOB, GOOD)).status == OK  # the success reset the count
    assert time.monotonic() - started < 0.5


async def test_r_log_1_slow_down_spares_the_known_ip(auth: AuthHarness) -> None:
    await auth.server_settings({"login": {"failure_delay_ms": 0, "lockout_mode": "slow_down"}})
    home = "203.0.113.5"
    assert (await auth.login(BOB, GOOD, client_ip=home)).status == OK
    await fail_times(auth, 6)
    started = time.monotonic()
    assert (await auth.login(BOB, GOOD, client_ip=home)).status == OK
    assert time.monotonic() - started < 0.5  # a stranger would wait 6 x 0.15 s


async def test_r_log_1_slow_down_is_capped(make_auth: Callable[..., Awaitable[AuthHarness]]) -> None:
    auth = await make_auth(slow_down_step_ms=400, slow_down_max_ms=500)
    await auth.server_settings({"login": {"failure_delay_ms": 0, "lockout_mode": "slow_down"}})
    await auth.directory.add_domain("example.org")
    await auth.directory.add_account(BOB)
    assert (await auth.set_password(BOB, GOOD)).ok
    await fail_times(auth, 3)
    started = time.monotonic()
    assert (await auth.login(BOB, GOOD)).status == OK
    assert 0.49 <= time.monotonic() - started < 1.0  # 3 x 0.4 s, capped at 0.5 s


async def test_r_log_1_slow_down_longer_than_the_deadline_refuses_without_checking(auth: AuthHarness) -> None:
    await auth.server_settings({"login": {"failure_delay_ms": 0, "lockout_mode": "slow_down"}})
    await fail_times(auth, 6)  # next delay 0.9 s
    hashes = auth.service.servicer.hasher.hash_calls
    reply = await auth.stub.Authenticate(
        auth_pb2.AuthenticateRequest(login=BOB, password=GOOD, client_ip="192.0.2.10", protocol="imap"), timeout=0.6
    )
    assert reply.status == INVALID  # answered before the deadline, and the right password did not get through
    assert auth.service.servicer.hasher.hash_calls == hashes
