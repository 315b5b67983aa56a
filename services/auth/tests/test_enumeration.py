"""R-LOG-4: an unknown user and a wrong password look the same: status and delay."""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

from rempart.common.pb.auth.v1 import auth_pb2

if TYPE_CHECKING:
    from conftest import AuthHarness

GOOD = "Blue-Heron-42-Quiet"
BOB = "bob@example.org"
INVALID = auth_pb2.AUTH_STATUS_INVALID
DELAY = 0.3


async def timed(auth: AuthHarness, login: str, password: str, ip: str) -> tuple[int, float]:
    started = time.monotonic()
    reply = await auth.login(login, password, client_ip=ip)
    return reply.status, time.monotonic() - started


async def test_r_log_4_unknown_user_same_status_and_delay(auth: AuthHarness) -> None:
    await auth.server_settings({"login": {"failure_delay_ms": int(DELAY * 1000)}})
    hashes = auth.service.servicer.hasher.hash_calls
    unknown, wrong = [], []
    for i in range(3):
        status, took = await timed(auth, "nobody@example.org", f"guess-{i}", f"192.0.2.{i + 20}")
        assert status == INVALID
        unknown.append(took)
        status, took = await timed(auth, BOB, f"guess-{i}", f"192.0.2.{i + 30}")
        assert status == INVALID
        wrong.append(took)
    # The unknown user paid a (dummy) hash too: one per attempt on both sides.
    assert auth.service.servicer.hasher.hash_calls == hashes + 6
    assert min(unknown + wrong) >= DELAY - 0.01
    # Generous margin: both are padded to the same floor; scheduling noise is far below it.
    assert abs(statistics.median(unknown) - statistics.median(wrong)) < 0.15


async def test_r_log_4_unknown_user_locks_like_a_real_one(auth: AuthHarness) -> None:
    # Otherwise a lock that only real accounts get would reveal which names exist.
    for i in range(5):
        assert (await auth.login("ghost@example.org", f"guess-{i}")).status == INVALID
    assert (await auth.login("ghost@example.org", "guess-9")).status == auth_pb2.AUTH_STATUS_LOCKED


async def test_r_log_4_disabled_account_is_invalid(auth: AuthHarness) -> None:
    await auth.directory.set_account_enabled(BOB, False)
    assert (await auth.login(BOB, GOOD)).status == INVALID
    await auth.directory.set_account_enabled(BOB, True)
    assert (await auth.login(BOB, GOOD)).status == auth_pb2.AUTH_STATUS_OK


async def test_r_log_4_account_without_password_is_invalid(auth: AuthHarness) -> None:
    await auth.directory.add_account("carol@example.org")
    hashes = auth.service.servicer.hasher.hash_calls
    assert (await auth.login("carol@example.org", "")).status == INVALID
    assert (await auth.login("carol@example.org", "anything")).status == INVALID
    assert auth.service.servicer.hasher.hash_calls == hashes + 1
