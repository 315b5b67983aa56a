"""Account administration over gRPC: passwords (R-PWD-1..2: SetPassword, ImportHash), TOTP
(R-2FA-1), app passwords (R-2FA-2) and the helpdesk calls (R-ADM-4). Each acts on an existing
account only; a store failure is UNAVAILABLE, never a half-done change reported as done.
"""

from __future__ import annotations

import logging
import time

import grpc
from redis.exceptions import RedisError

from rempart.auth.login import MAX_CODE, MAX_FIELD, LoginFlow
from rempart.auth.login_names import MAX_LOGIN_LENGTH
from rempart.auth.password_policy import MAX_PASSWORD_LENGTH, policy_violations
from rempart.auth.schemes import ImportRefused, scheme_of, validate_import
from rempart.auth.twofactor import (
    MAX_APP_PASSWORDS,
    app_password_tag,
    canonical_app_password,
    matching_step,
    new_app_password,
    new_recovery_codes,
    new_totp_secret,
    otpauth_uri,
    valid_app_name,
)
from rempart.common.directory import Account, normalize_address
from rempart.common.pb.auth.v1 import auth_pb2

log = logging.getLogger(__name__)


class AccountAdministration:
    def __init__(self, login: LoginFlow) -> None:
        self.login = login
        self.creds = login.creds
        self.guard = login.guard
        self.hasher = login.hasher
        self.events = login.runtime.events

    # SetPassword and ImportHash --------------------------------------------------------------
    async def _account_or_abort(self, raw: str, context: grpc.aio.ServicerContext) -> Account:
        address = normalize_address(raw)
        if not address or len(address) > MAX_LOGIN_LENGTH:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "account: not an address")
        try:
            account = await self.login.directory.get_account(address)
        except (RedisError, OSError) as exc:
            log.warning("directory unavailable: %s", type(exc).__name__)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "credential store unavailable, try later")
            raise  # abort() raises; this line only tells the type checker
        if account is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown account")
        assert account is not None  # abort() raises
        return account

    async def set_password(
        self, request: auth_pb2.SetPasswordRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.SetPasswordResponse:
        account = await self._account_or_abort(request.account, context)
        try:
            password = request.password
            violations: list[str] = []
            if not password:
                violations.append("must not be empty")
            elif len(password) > MAX_PASSWORD_LENGTH:
                violations.append(f"must be at most {MAX_PASSWORD_LENGTH} characters long")
            elif not request.skip_policy:
                effective = await self.login.runtime.config.effective(account.domain, account.address)
                violations = await policy_violations(password, account.address, effective.password)
            if violations:
                return auth_pb2.SetPasswordResponse(ok=False, violations=violations)
            hashed = await self.hasher.hash(password)
            scram = await self.hasher.scram_keys(password, self.login.settings.scram_iterations)
            await self.creds.set_password(account.address, hashed, scram)
        except (RedisError, OSError, ValueError) as exc:
            log.warning("set password failed: %s", type(exc).__name__, extra={"account": account.address})
            await context.abort(grpc.StatusCode.UNAVAILABLE, "credential store unavailable, try later")
            raise  # abort() raises; this line only tells the type checker
        log.info("password changed", extra={"account": account.address, "policy_skipped": request.skip_policy})
        await self.events.publish(
            "auth",
            "password_changed",
            account=account.address,
            reason="policy_skipped" if request.skip_policy else "",
        )
        return auth_pb2.SetPasswordResponse(ok=True)

    async def import_hash(
        self, request: auth_pb2.ImportHashRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ImportHashResponse:
        """Migration: keep another server's hash until the next successful login upgrades it."""
        account = await self._account_or_abort(request.account, context)
        try:
            stored = validate_import(request.scheme_hash)
        except ImportRefused as exc:
            return auth_pb2.ImportHashResponse(ok=False, error=str(exc))
        try:
            await self.creds.set_password(account.address, stored, None)
        except (RedisError, OSError) as exc:
            log.warning("import hash failed: %s", type(exc).__name__, extra={"account": account.address})
            await context.abort(grpc.StatusCode.UNAVAILABLE, "credential store unavailable, try later")
        log.info("password hash imported", extra={"account": account.address, "scheme": scheme_of(stored)})
        await self.events.publish("auth", "password_imported", account=account.address, reason=scheme_of(stored))
        return auth_pb2.ImportHashResponse(ok=True)

    # TOTP (R-2FA-1) --------------------------------------------------------------------------
    async def _unavailable(self, context: grpc.aio.ServicerContext, exc: Exception, what: str) -> None:
        log.warning("%s failed: %s", what, type(exc).__name__)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "credential store unavailable, try later")

    async def totp_enrol(
        self, request: auth_pb2.TotpEnrolRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.TotpEnrolResponse:
        account = await self._account_or_abort(request.account, context)
        try:
            if (await self.creds.load(account.address)).totp_enabled:
                return auth_pb2.TotpEnrolResponse(already_enabled=True)
            secret = new_totp_secret()
            await self.creds.put_pending_totp(account.address, secret)
        except (RedisError, OSError, ValueError) as exc:
            await self._unavailable(context, exc, "totp enrol")
            raise
        uri = otpauth_uri(secret, account.address, request.issuer[:MAX_FIELD])
        return auth_pb2.TotpEnrolResponse(secret=secret, otpauth_uri=uri)

    async def totp_confirm(
        self, request: auth_pb2.TotpConfirmRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.TotpConfirmResponse:
        account = await self._account_or_abort(request.account, context)
        try:
            creds = await self.creds.load(account.address)
            secret = self.creds.pending_totp(creds, time.time())
            if secret is None or creds.totp_enabled:
                return auth_pb2.TotpConfirmResponse(ok=False)
            step = matching_step(secret, request.code[:MAX_CODE], time.time())
            # The confirming code is used: the same code cannot log in a second time.
            if step is None or not await self.creds.claim_step(account.address, step):
                return auth_pb2.TotpConfirmResponse(ok=False)
            codes = new_recovery_codes()
            await self.creds.activate_totp(account.address, secret, codes)
        except (RedisError, OSError, ValueError) as exc:
            await self._unavailable(context, exc, "totp confirm")
            raise
        log.info("totp enabled", extra={"account": account.address})
        await self.events.publish("auth", "totp_enabled", account=account.address)
        return auth_pb2.TotpConfirmResponse(ok=True, recovery_codes=codes)

    async def totp_disable(
        self, request: auth_pb2.TotpDisableRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.TotpDisableResponse:
        account = await self._account_or_abort(request.account, context)
        rules = self.login.runtime.config.server.login
        try:
            creds = await self.creds.load(account.address)
            if not creds.totp_enabled:
                return auth_pb2.TotpDisableResponse(ok=False)
            state = await self.guard.state(account.address, "", time.time(), rules)
            code = request.code.strip()[:MAX_CODE]
            if state.locked or not await self.login.check_second_factor(account.address, creds, code):
                if not state.locked and rules.lockout_mode != "off":
                    # Guessing codes to switch 2FA off counts like guessing passwords.
                    await self.guard.record_failure(
                        account.address, self.guard.fingerprint(account.address, "totp\0" + code), time.time(), rules
                    )
                return auth_pb2.TotpDisableResponse(ok=False)
            await self.creds.disable_totp(account.address)
        except (RedisError, OSError, ValueError) as exc:
            await self._unavailable(context, exc, "totp disable")
            raise
        log.info("totp disabled", extra={"account": account.address})
        await self.events.publish("auth", "totp_disabled", account=account.address)
        return auth_pb2.TotpDisableResponse(ok=True)

    async def totp_status(
        self, request: auth_pb2.TotpStatusRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.TotpStatusResponse:
        account = await self._account_or_abort(request.account, context)
        try:
            creds = await self.creds.load(account.address)
        except (RedisError, OSError) as exc:
            await self._unavailable(context, exc, "totp status")
            raise
        return auth_pb2.TotpStatusResponse(enabled=creds.totp_enabled, recovery_codes_left=creds.recovery_codes_left())

    # App passwords (R-2FA-2) -----------------------------------------------------------------
    async def app_password_create(
        self, request: auth_pb2.AppPasswordCreateRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.AppPasswordCreateResponse:
        account = await self._account_or_abort(request.account, context)
        name = request.name.strip()
        if not valid_app_name(name):
            return auth_pb2.AppPasswordCreateResponse(error="bad_name")
        try:
            if len((await self.creds.load(account.address)).app_passwords()) >= MAX_APP_PASSWORDS:
                return auth_pb2.AppPasswordCreateResponse(error="too_many")
            password = new_app_password()
            canonical = canonical_app_password(password)
            assert canonical is not None
            hashed = await self.hasher.hash(canonical)
            created = await self.creds.add_app_password(
                account.address, name, hashed, app_password_tag(self.login.secret, account.address, canonical)
            )
        except (RedisError, OSError, ValueError) as exc:
            await self._unavailable(context, exc, "app password create")
            raise
        if created is None:
            return auth_pb2.AppPasswordCreateResponse(error="exists")
        log.info("app password created", extra={"account": account.address, "app_password": name})
        await self.events.publish("auth", "app_password_created", account=account.address, reason=name)
        return auth_pb2.AppPasswordCreateResponse(password=password, created=created)

    async def app_password_list(
        self, request: auth_pb2.AppPasswordListRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.AppPasswordListResponse:
        account = await self._account_or_abort(request.account, context)
        try:
            entries = (await self.creds.load(account.address)).app_passwords()
        except (RedisError, OSError) as exc:
            await self._unavailable(context, exc, "app password list")
            raise
        return auth_pb2.AppPasswordListResponse(app_passwords=[
            auth_pb2.AppPassword(name=e.name, created=e.created, last_used=e.last_used) for e in entries
        ])

    async def app_password_revoke(
        self, request: auth_pb2.AppPasswordRevokeRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.AppPasswordRevokeResponse:
        account = await self._account_or_abort(request.account, context)
        name = request.name.strip()
        if not valid_app_name(name):
            return auth_pb2.AppPasswordRevokeResponse(found=False)
        try:
            found = await self.creds.revoke_app_password(account.address, name)
        except (RedisError, OSError) as exc:
            await self._unavailable(context, exc, "app password revoke")
            raise
        if found:
            log.info("app password revoked", extra={"account": account.address, "app_password": name})
            await self.events.publish("auth", "app_password_revoked", account=account.address, reason=name)
        return auth_pb2.AppPasswordRevokeResponse(found=found)

    # Helpdesk (R-ADM-4): the admin API decided the caller may; nothing here needs the user. -----
    async def unlock(
        self, request: auth_pb2.UnlockRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.UnlockResponse:
        account = await self._account_or_abort(request.account, context)
        try:
            was_locked = await self.guard.unlock(account.address, time.time())
        except (RedisError, OSError, ValueError) as exc:
            await self._unavailable(context, exc, "unlock")
            raise
        log.info("account unlocked by an administrator", extra={"account": account.address, "was_locked": was_locked})
        await self.events.publish("auth", "account_unlocked", account=account.address, reason="helpdesk")
        return auth_pb2.UnlockResponse(was_locked=was_locked)

    async def totp_reset(
        self, request: auth_pb2.TotpResetRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.TotpResetResponse:
        account = await self._account_or_abort(request.account, context)
        try:
            was_enabled = await self.creds.reset_totp(account.address)
        except (RedisError, OSError) as exc:
            await self._unavailable(context, exc, "totp reset")
            raise
        log.info("totp reset by an administrator", extra={"account": account.address, "was_enabled": was_enabled})
        await self.events.publish("auth", "totp_disabled", account=account.address, reason="helpdesk")
        return auth_pb2.TotpResetResponse(was_enabled=was_enabled)

    async def app_password_revoke_all(
        self, request: auth_pb2.AppPasswordRevokeAllRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.AppPasswordRevokeAllResponse:
        account = await self._account_or_abort(request.account, context)
        try:
            revoked = await self.creds.revoke_all_app_passwords(account.address)
        except (RedisError, OSError) as exc:
            await self._unavailable(context, exc, "app password revoke all")
            raise
        log.info("app passwords revoked by an administrator", extra={"account": account.address, "revoked": revoked})
        await self.events.publish("auth", "app_password_revoked", account=account.address, reason="helpdesk",
                                      count=str(revoked))
        return auth_pb2.AppPasswordRevokeAllResponse(revoked=revoked)
