"""R-2FA-1 (TOTP, recovery codes, admins) and R-2FA-2 (app passwords) through real gRPC and Redis."""

from __future__ import annotations

import time

import pyotp

from rempart.common import keys
from rempart.common.pb.auth.v1 import auth_pb2

from .conftest import BOB, GOOD_PASSWORD, AuthHarness, EventTap

ADMIN = "chief@example.org"
ADMIN_PASSWORD = "Tall-Ostrich-77-Sings"


def code_at(secret: str, step: int) -> str:
    return str(pyotp.TOTP(secret).at(step * 30))


def now_step() -> int:
    return int(time.time() // 30)


async def admin_login(auth: AuthHarness, login: str, password: str, code: str = "") -> auth_pb2.AuthenticateResponse:
    reply: auth_pb2.AuthenticateResponse = await auth.stub.Authenticate(
        auth_pb2.AuthenticateRequest(login=login, password=password, client_ip="192.0.2.50", protocol="admin",
                                     mechanism="password", totp_code=code),
        timeout=10,
    )
    return reply


async def enrol(auth: AuthHarness, account: str) -> tuple[str, list[str], int]:
    enrolment: auth_pb2.TotpEnrolResponse = await auth.stub.TotpEnrol(
        auth_pb2.TotpEnrolRequest(account=account, issuer="Rempart"), timeout=10)
    assert enrolment.otpauth_uri.startswith("otpauth://totp/Rempart:")
    step = now_step()
    confirm: auth_pb2.TotpConfirmResponse = await auth.stub.TotpConfirm(
        auth_pb2.TotpConfirmRequest(account=account, code=code_at(enrolment.secret, step)), timeout=10)
    assert confirm.ok
    return enrolment.secret, list(confirm.recovery_codes), step


async def test_r_2fa_1_totp_required_once_enrolled_and_codes_work_once(
    auth: AuthHarness, auth_events: EventTap
) -> None:
    secret, recovery, step = await enrol(auth, BOB)
    assert len(recovery) == 10 and len(set(recovery)) == 10
    await auth_events.wait_for("totp_enabled")
    # Encrypted at rest: the secret is not in Redis in any readable form.
    stored = await auth.redis.hgetall(keys.credentials(BOB))
    assert secret not in "".join(stored.values()) and not any(c in "".join(stored) for c in recovery)

    missing = await admin_login(auth, BOB, GOOD_PASSWORD)
    assert missing.status == auth_pb2.AUTH_STATUS_SECOND_FACTOR_REQUIRED
    # The confirming code is spent: replaying it fails; the next step's code works, once.
    replay = await admin_login(auth, BOB, GOOD_PASSWORD, code_at(secret, step))
    assert replay.status == auth_pb2.AUTH_STATUS_SECOND_FACTOR_REQUIRED
    nxt = code_at(secret, step + 1)
    assert (await admin_login(auth, BOB, GOOD_PASSWORD, nxt)).status == auth_pb2.AUTH_STATUS_OK
    assert (await admin_login(auth, BOB, GOOD_PASSWORD, nxt)).status == auth_pb2.AUTH_STATUS_SECOND_FACTOR_REQUIRED
    # Outside the +-1 window: refused.
    far = await admin_login(auth, BOB, GOOD_PASSWORD, code_at(secret, step + 3))
    assert far.status == auth_pb2.AUTH_STATUS_SECOND_FACTOR_REQUIRED
    # A recovery code replaces a TOTP code, once.
    assert (await admin_login(auth, BOB, GOOD_PASSWORD, recovery[0].upper())).status == auth_pb2.AUTH_STATUS_OK
    assert (await admin_login(auth, BOB, GOOD_PASSWORD, recovery[0])).status == \
        auth_pb2.AUTH_STATUS_SECOND_FACTOR_REQUIRED
    status: auth_pb2.TotpStatusResponse = await auth.stub.TotpStatus(auth_pb2.TotpStatusRequest(account=BOB))
    assert (status.enabled, status.recovery_codes_left) == (True, 9)
    # A wrong password with a right code is still a wrong password.
    assert (await admin_login(auth, BOB, "Wrong-Password-1", recovery[1])).status == auth_pb2.AUTH_STATUS_INVALID


async def test_r_2fa_1_wrong_codes_count_towards_lockout(auth: AuthHarness) -> None:
    await enrol(auth, BOB)
    for code in ("000001", "000002", "000003", "000004", "000005"):
        reply = await admin_login(auth, BOB, GOOD_PASSWORD, code)
        assert reply.status in (auth_pb2.AUTH_STATUS_SECOND_FACTOR_REQUIRED, auth_pb2.AUTH_STATUS_LOCKED)
    assert await auth.redis.get(keys.login_lock(BOB)) is not None


async def test_r_2fa_1_disable_needs_a_current_code(auth: AuthHarness, auth_events: EventTap) -> None:
    secret, _, step = await enrol(auth, BOB)
    wrong: auth_pb2.TotpDisableResponse = await auth.stub.TotpDisable(
        auth_pb2.TotpDisableRequest(account=BOB, code=code_at(secret, step)))  # already used
    assert not wrong.ok
    right: auth_pb2.TotpDisableResponse = await auth.stub.TotpDisable(
        auth_pb2.TotpDisableRequest(account=BOB, code=code_at(secret, step + 1)))
    assert right.ok
    await auth_events.wait_for("totp_disabled")
    assert (await admin_login(auth, BOB, GOOD_PASSWORD)).status == auth_pb2.AUTH_STATUS_OK


async def test_r_2fa_1_admin_without_totp_must_enrol(auth: AuthHarness) -> None:
    await auth.directory.add_account(ADMIN, "superadmin")
    assert (await auth.set_password(ADMIN, ADMIN_PASSWORD)).ok
    reply = await admin_login(auth, ADMIN, ADMIN_PASSWORD)
    assert (reply.status, reply.second_factor_enrolment_required) == (auth_pb2.AUTH_STATUS_OK, True)
    user = await admin_login(auth, BOB, GOOD_PASSWORD)
    assert (user.status, user.second_factor_enrolment_required) == (auth_pb2.AUTH_STATUS_OK, False)
    await auth.server_settings({"login": {"failure_delay_ms": 0}, "twofa": {"required_for_admins": False}})
    relaxed = await admin_login(auth, ADMIN, ADMIN_PASSWORD)
    assert (relaxed.status, relaxed.second_factor_enrolment_required) == (auth_pb2.AUTH_STATUS_OK, False)
    wrong = await admin_login(auth, ADMIN, "Wrong-Password-1")
    assert (wrong.status, wrong.second_factor_enrolment_required) == (auth_pb2.AUTH_STATUS_INVALID, False)


async def create_app_password(auth: AuthHarness, name: str) -> str:
    reply: auth_pb2.AppPasswordCreateResponse = await auth.stub.AppPasswordCreate(
        auth_pb2.AppPasswordCreateRequest(account=BOB, name=name), timeout=10)
    assert not reply.error and reply.created > 0
    return reply.password


async def test_r_2fa_2_with_totp_mail_protocols_take_only_app_passwords(
    auth: AuthHarness, auth_events: EventTap
) -> None:
    app = await create_app_password(auth, "Phone mail")
    await auth_events.wait_for("app_password_created")
    # Without 2FA, both work.
    assert (await auth.login(BOB, GOOD_PASSWORD)).status == auth_pb2.AUTH_STATUS_OK
    via_app = await auth.login(BOB, app)
    assert (via_app.status, via_app.app_password) == (auth_pb2.AUTH_STATUS_OK, True)
    await enrol(auth, BOB)
    for protocol in ("imap", "pop3", "smtp"):
        refused = await auth.login(BOB, GOOD_PASSWORD, protocol=protocol)
        assert refused.status == auth_pb2.AUTH_STATUS_INVALID
        accepted = await auth.login(BOB, app.upper().replace("-", " "), protocol=protocol)
        assert (accepted.status, accepted.account, accepted.app_password) == (auth_pb2.AUTH_STATUS_OK, BOB, True)
    # The admin API takes the main password and a code, never an app password.
    assert (await admin_login(auth, BOB, app)).status == auth_pb2.AUTH_STATUS_INVALID

    listed: auth_pb2.AppPasswordListResponse = await auth.stub.AppPasswordList(
        auth_pb2.AppPasswordListRequest(account=BOB))
    assert [(a.name, a.last_used > 0) for a in listed.app_passwords] == [("Phone mail", True)]
    assert app not in str(listed) and app.replace("-", "") not in "".join(
        (await auth.redis.hgetall(keys.credentials(BOB))).values())

    duplicate: auth_pb2.AppPasswordCreateResponse = await auth.stub.AppPasswordCreate(
        auth_pb2.AppPasswordCreateRequest(account=BOB, name="Phone mail"))
    assert (duplicate.error, duplicate.password) == ("exists", "")
    bad: auth_pb2.AppPasswordCreateResponse = await auth.stub.AppPasswordCreate(
        auth_pb2.AppPasswordCreateRequest(account=BOB, name="../x"))
    assert bad.error == "bad_name"

    revoked: auth_pb2.AppPasswordRevokeResponse = await auth.stub.AppPasswordRevoke(
        auth_pb2.AppPasswordRevokeRequest(account=BOB, name="Phone mail"))
    assert revoked.found
    await auth_events.wait_for("app_password_revoked")
    assert (await auth.login(BOB, app)).status == auth_pb2.AUTH_STATUS_INVALID


async def test_r_log_4_totp_account_wrong_password_costs_one_hash(auth: AuthHarness) -> None:
    await create_app_password(auth, "laptop")
    await enrol(auth, BOB)
    hasher = auth.service.servicer.hasher
    before = hasher.hash_calls
    assert (await auth.login(BOB, "Some-Wrong-Password-9")).status == auth_pb2.AUTH_STATUS_INVALID
    assert hasher.hash_calls - before == 1
