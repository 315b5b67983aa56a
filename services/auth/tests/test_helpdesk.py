"""R-ADM-4: the helpdesk calls (unlock, 2FA reset, revoke every app password) through real gRPC."""

from __future__ import annotations

import grpc
import pytest

from rempart.common import keys
from rempart.common.pb.auth.v1 import auth_pb2

from .conftest import BOB, GOOD_PASSWORD, AuthHarness, EventTap
from .test_twofactor import admin_login, create_app_password, enrol

ATTACKER = "198.51.100.7"


async def test_r_adm_4_unlock_ends_the_lock_and_the_failures(auth: AuthHarness, auth_events: EventTap) -> None:
    for i in range(5):
        assert (await auth.login(BOB, f"wrong-guess-{i}", client_ip=ATTACKER)).status == auth_pb2.AUTH_STATUS_INVALID
    assert (await auth.login(BOB, GOOD_PASSWORD)).status == auth_pb2.AUTH_STATUS_LOCKED
    reply: auth_pb2.UnlockResponse = await auth.stub.Unlock(auth_pb2.UnlockRequest(account=BOB), timeout=10)
    assert reply.was_locked
    (event,) = await auth_events.wait_for("account_unlocked")
    assert (event.account, event.reason) == (BOB, "helpdesk")
    assert not await auth.redis.exists(keys.login_lock(BOB), keys.login_failures(BOB))
    assert (await auth.login(BOB, GOOD_PASSWORD)).status == auth_pb2.AUTH_STATUS_OK
    again: auth_pb2.UnlockResponse = await auth.stub.Unlock(auth_pb2.UnlockRequest(account=BOB), timeout=10)
    assert not again.was_locked


async def test_r_adm_4_totp_reset_needs_no_code(auth: AuthHarness, auth_events: EventTap) -> None:
    await enrol(auth, BOB)
    assert (await admin_login(auth, BOB, GOOD_PASSWORD)).status == auth_pb2.AUTH_STATUS_SECOND_FACTOR_REQUIRED
    reply: auth_pb2.TotpResetResponse = await auth.stub.TotpReset(auth_pb2.TotpResetRequest(account=BOB), timeout=10)
    assert reply.was_enabled
    assert [e.reason for e in await auth_events.wait_for("totp_disabled")] == ["helpdesk"]
    stored = await auth.redis.hgetall(keys.credentials(BOB))
    assert not [f for f in stored if f.startswith(("totp", "rc:"))], stored
    assert (await admin_login(auth, BOB, GOOD_PASSWORD)).status == auth_pb2.AUTH_STATUS_OK
    status: auth_pb2.TotpStatusResponse = await auth.stub.TotpStatus(auth_pb2.TotpStatusRequest(account=BOB))
    assert (status.enabled, status.recovery_codes_left) == (False, 0)
    # The user can enrol again from scratch.
    await enrol(auth, BOB)


async def test_r_adm_4_revoke_every_app_password(auth: AuthHarness) -> None:
    phone = await create_app_password(auth, "phone")
    await create_app_password(auth, "laptop")
    assert (await auth.login(BOB, phone)).status == auth_pb2.AUTH_STATUS_OK
    reply: auth_pb2.AppPasswordRevokeAllResponse = await auth.stub.AppPasswordRevokeAll(
        auth_pb2.AppPasswordRevokeAllRequest(account=BOB), timeout=10)
    assert reply.revoked == 2
    listed: auth_pb2.AppPasswordListResponse = await auth.stub.AppPasswordList(
        auth_pb2.AppPasswordListRequest(account=BOB))
    assert list(listed.app_passwords) == []
    assert (await auth.login(BOB, phone)).status == auth_pb2.AUTH_STATUS_INVALID
    assert (await auth.login(BOB, GOOD_PASSWORD)).status == auth_pb2.AUTH_STATUS_OK  # the password still works


async def test_r_adm_4_helpdesk_on_unknown_account_is_not_found(auth: AuthHarness) -> None:
    for call, request in (
        (auth.stub.Unlock, auth_pb2.UnlockRequest(account="nobody@example.org")),
        (auth.stub.TotpReset, auth_pb2.TotpResetRequest(account="nobody@example.org")),
        (auth.stub.AppPasswordRevokeAll, auth_pb2.AppPasswordRevokeAllRequest(account="nobody@example.org")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
