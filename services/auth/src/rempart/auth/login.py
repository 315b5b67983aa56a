"""Authenticate (R-LOG-1..4) and the steps every login flow shares (SCRAM's too).

Order of the checks, cheapest first (Postfix's rule: refuse before any expensive work): login
name, IP restriction (R-LOG-3) and lock (R-LOG-1) are refused before any password hash is
computed, so a locked account under a spray costs no CPU. Everything that fails answers no
sooner than ``failure_delay_ms`` after the call began, and an unknown user still pays one
Argon2 verification against a dummy hash, so that neither the status nor the timing tells
whether an account exists (R-LOG-4).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
from dataclasses import dataclass, replace

import grpc
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from rempart.auth.credentials import Credentials, CredentialStore
from rempart.auth.hashing import CredentialHasher
from rempart.auth.lockout import LoginGuard
from rempart.auth.login_names import MAX_LOGIN_LENGTH, LoginName, resolve_login
from rempart.auth.metrics import AUTH_ATTEMPTS, protocol_label
from rempart.auth.password_policy import MAX_PASSWORD_LENGTH
from rempart.auth.schemes import scheme_of
from rempart.auth.settings import AuthSettings
from rempart.auth.twofactor import (
    app_password_tag,
    canonical_app_password,
    looks_like_recovery_code,
    matching_step,
)
from rempart.common.config import LoginSettings
from rempart.common.directory import Account, Directory
from rempart.common.netmatch import ip_in_networks
from rempart.common.pb.auth.v1 import auth_pb2
from rempart.common.runtime import ServiceRuntime
from rempart.common.secretbox import SecretBox
from rempart.common.stats import StatsRecorder

log = logging.getLogger(__name__)

MAX_FIELD = 128  # client_ip, protocol, session_id: only echoed into logs and events
DEADLINE_MARGIN = 0.25  # answer before the caller's deadline rather than let it time out

MAIL_PROTOCOLS = frozenset({"imap", "pop3", "smtp"})
ADMIN_PROTOCOL = "admin"
ADMIN_ROLES = frozenset({"superadmin", "domain_admin"})
MAX_CODE = 32  # a TOTP or recovery code

RESULT_LABELS = {
    auth_pb2.AUTH_STATUS_OK: "ok",
    auth_pb2.AUTH_STATUS_INVALID: "invalid",
    auth_pb2.AUTH_STATUS_LOCKED: "locked",
    auth_pb2.AUTH_STATUS_IP_RESTRICTED: "ip_restricted",
    auth_pb2.AUTH_STATUS_SECOND_FACTOR_REQUIRED: "second_factor",
    auth_pb2.AUTH_STATUS_TEMPFAIL: "tempfail",
}


def clean_ip(raw: str) -> str:
    """The canonical text of a client IP, or "" when it is not one."""
    try:
        ip = ipaddress.ip_address(raw.strip()[:MAX_FIELD])
    except ValueError:
        return ""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def ip_allowed(client_ip: str, allowed: list[str]) -> bool:
    """R-LOG-3: an empty list allows every IP; otherwise the client must be in one of them (an
    invalid entry is skipped: a typo narrows the list, never opens the account wider)."""
    return not allowed or ip_in_networks(client_ip, allowed)


@dataclass(frozen=True)
class Attempt:
    """What every login attempt carries for logs, events, delays and counting, whatever the RPC."""

    client_ip_raw: str
    protocol: str
    session_id: str
    started: float  # time.monotonic() when the call began: failures answer at the same moment

    @property
    def fields(self) -> dict[str, str]:
        return {
            "client_ip": self.client_ip_raw[:MAX_FIELD],
            "protocol": self.protocol[:MAX_FIELD],
            "session_id": self.session_id[:MAX_FIELD],
        }


@dataclass(frozen=True)
class Refusal:
    status: auth_pb2.AuthStatus.ValueType
    reason: str


@dataclass(frozen=True)
class Gate:
    name: LoginName
    subject: str
    refusal: Refusal | None


class LoginFlow:
    """The login checks and their bookkeeping (lock, events, delays), over the credential store."""

    def __init__(self, settings: AuthSettings, runtime: ServiceRuntime) -> None:
        self.settings = settings
        self.runtime = runtime
        self.redis: aioredis.Redis = runtime.redis
        self.directory = Directory(runtime.redis)
        self.hasher = CredentialHasher(
            settings.argon2_time_cost,
            settings.argon2_memory_kib,
            settings.argon2_parallelism,
            settings.max_concurrent_hashes,
        )
        self.secret = settings.secret_key.get_secret_value().encode()
        self.guard = LoginGuard(runtime.redis, self.secret)
        self.creds = CredentialStore(runtime.redis, SecretBox(settings.secret_key.get_secret_value()), self.secret)
        self.stats = StatsRecorder(runtime.redis)  # logins by protocol and result, GET /v1/stats

    async def start(self) -> None:
        await self.hasher.start()

    async def authenticate(
        self, request: auth_pb2.AuthenticateRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.AuthenticateResponse:
        attempt = Attempt(request.client_ip, request.protocol, request.session_id, time.monotonic())
        try:
            # Shielded: when the caller's deadline expires while the attempt waits for a hash
            # slot, the attempt still finishes and its failure still counts towards the lock
            # (R-LOG-1) — otherwise a password spray on a busy server would never lock anything.
            work = asyncio.ensure_future(self._authenticate(request, context, attempt))
            work.add_done_callback(_retrieve)
            reply = await asyncio.shield(work)
        except (RedisError, OSError, ValueError) as exc:
            # Fail closed: never OK when the state that could refuse the login is unreadable.
            log.warning(
                "authentication tempfail: %s",
                type(exc).__name__,
                extra={"session": request.session_id[:MAX_FIELD], "protocol": request.protocol[:MAX_FIELD]},
            )
            reply = auth_pb2.AuthenticateResponse(status=auth_pb2.AUTH_STATUS_TEMPFAIL)
        protocol, result = protocol_label(request.protocol), RESULT_LABELS.get(reply.status, "other")
        AUTH_ATTEMPTS.labels(protocol, result).inc()
        self.stats.login(protocol, result)
        return reply

    async def gate(self, login: str, client_ip: str, context: grpc.aio.ServicerContext) -> Gate:
        """Name resolution, IP restriction (R-LOG-3), lock and slow-down (R-LOG-1): no hash yet."""
        rules = self.runtime.config.server.login
        name = await resolve_login(self.directory, self.redis, login, rules)
        subject = name.account or name.typed
        effective = await self.runtime.config.effective(name.domain, name.account or "")
        if not ip_allowed(client_ip, effective.login.allowed_ips):
            return Gate(name, subject, Refusal(auth_pb2.AUTH_STATUS_IP_RESTRICTED, "ip_restricted"))
        now = time.time()
        state = await self.guard.state(subject, client_ip, now, rules)
        # A known IP (the user's own, R-LOG-1) is neither locked out nor slowed by an attack elsewhere.
        trusted_ip = rules.known_ip_bypass and state.ip_known
        if state.locked and not trusted_ip:
            return Gate(name, subject, Refusal(auth_pb2.AUTH_STATUS_LOCKED, "locked"))
        if rules.lockout_mode == "slow_down" and state.recent_failures and not trusted_ip:
            delay = min(self.settings.slow_down_step_ms * state.recent_failures, self.settings.slow_down_max_ms)
            remaining = context.time_remaining()
            if remaining is not None and delay / 1000 > remaining - DEADLINE_MARGIN:
                # The caller cannot wait that long: refuse rather than check the password early,
                # or a short deadline would switch the slow-down off.
                return Gate(name, subject, Refusal(auth_pb2.AUTH_STATUS_INVALID, "slowed_down"))
            await self.sleep(delay / 1000, context)
            name = replace(name, record=None)  # read again after the wait: it may have changed meanwhile
        return Gate(name, subject, None)

    async def _authenticate(
        self, request: auth_pb2.AuthenticateRequest, context: grpc.aio.ServicerContext, attempt: Attempt
    ) -> auth_pb2.AuthenticateResponse:
        rules = self.runtime.config.server.login
        client_ip = clean_ip(request.client_ip)
        password = request.password
        gate = await self.gate(request.login, client_ip, context)
        name = gate.name
        if gate.refusal is not None:
            return await self.refuse(attempt, context, name, gate.refusal, rules)

        account = await self.account_of(name)
        creds = await self.creds.load(account.address) if account else Credentials({})
        stored = creds.password_hash
        usable = bool(password) and len(password) <= MAX_PASSWORD_LENGTH
        mail_protocol = request.protocol in MAIL_PROTOCOLS
        app_name: str | None = None
        if account is None or stored is None:
            if usable:
                await self.hasher.verify_dummy(password)
            reason = "unknown_user" if account is None else "no_password"
            verified = False
        elif creds.totp_enabled and mail_protocol:
            # R-2FA-2: with 2FA on, the mail protocols take app passwords only; the main password
            # is refused exactly like a wrong one.
            app_name = await self._match_app_password(account.address, creds, password, always_hash=True)
            verified = app_name is not None
            reason = "bad_app_password"
        else:
            verified = usable and await self.hasher.verify(stored, password)
            reason = "bad_password"
            if not verified and mail_protocol and usable:
                app_name = await self._match_app_password(account.address, creds, password, always_hash=False)
                verified = app_name is not None

        if verified and account is not None and not account.enabled:
            return await self.refuse(attempt, context, name, Refusal(auth_pb2.AUTH_STATUS_INVALID,
                                                                      "account_disabled"), rules)
        if not verified or account is None or stored is None:
            fingerprint = self.guard.fingerprint(gate.subject, password[:MAX_PASSWORD_LENGTH])
            await self.count_failure(attempt, gate, fingerprint, rules)
            return await self.refuse(attempt, context, name, Refusal(auth_pb2.AUTH_STATUS_INVALID, reason), rules)

        enrolment_required = False
        if request.protocol == ADMIN_PROTOCOL:
            if creds.totp_enabled:
                code = request.totp_code.strip()[:MAX_CODE]
                if not code:
                    return await self.refuse(attempt, context, name, Refusal(
                        auth_pb2.AUTH_STATUS_SECOND_FACTOR_REQUIRED, "totp_missing"), rules)
                if not await self.check_second_factor(account.address, creds, code):
                    # A wrong code counts like a wrong password: the password alone must not
                    # allow a million guesses at the code.
                    await self.count_failure(attempt, gate, self.guard.fingerprint(gate.subject, "totp\0" + code),
                                              rules)
                    return await self.refuse(attempt, context, name, Refusal(
                        auth_pb2.AUTH_STATUS_SECOND_FACTOR_REQUIRED, "totp_wrong"), rules)
            elif account.role in ADMIN_ROLES:
                effective = await self.runtime.config.effective(account.domain, account.address)
                enrolment_required = effective.twofa.required_for_admins
        reply = await self.accept(attempt, account, client_ip, rules, verified_hash=None if app_name else stored,
                                   password=None if app_name else password, creds=creds)
        if app_name is not None:
            await self.creds.touch_app_password(account.address, app_name)
            reply.app_password = True
        reply.second_factor_enrolment_required = enrolment_required
        return reply

    async def account_of(self, name: LoginName) -> Account | None:
        """The directory record of the account ``name`` resolved to (the one read while resolving)."""
        if name.record is not None:
            return name.record
        return await self.directory.get_account(name.account) if name.account else None

    async def _match_app_password(
        self, account: str, creds: Credentials, password: str, always_hash: bool
    ) -> str | None:
        """The name of the app password ``password`` is; one Argon2id verification at most.

        ``always_hash``: spend one verification even when no tag matches, so that a wrong
        password costs the same time as a right one (R-LOG-4)."""
        canonical = canonical_app_password(password) if len(password) <= MAX_PASSWORD_LENGTH else None
        if canonical is not None:
            tag = app_password_tag(self.secret, account, canonical)
            for entry in creds.app_passwords():
                if hmac.compare_digest(entry.tag, tag):
                    return entry.name if await self.hasher.verify(entry.hash, canonical) else None
        if always_hash and password and len(password) <= MAX_PASSWORD_LENGTH:
            await self.hasher.verify_dummy(password)
        return None

    async def check_second_factor(self, account: str, creds: Credentials, code: str) -> bool:
        """A current TOTP code, used once (RFC 6238 section 5.2), or an unused recovery code."""
        secret = self.creds.totp_secret(creds)
        if secret is None:
            return False
        step = matching_step(secret, code, time.time())
        if step is not None:
            return await self.creds.claim_step(account, step)
        if looks_like_recovery_code(code) and await self.creds.use_recovery_code(account, code):
            log.warning("recovery code used", extra={"account": account})
            await self.runtime.events.publish("auth", "recovery_code_used", account=account)
            return True
        return False

    async def count_failure(self, attempt: Attempt, gate: Gate, fingerprint: str, rules: LoginSettings) -> None:
        if rules.lockout_mode == "off":
            return
        outcome = await self.guard.record_failure(gate.subject, fingerprint, time.time(), rules)
        if outcome.locked_now and gate.name.account:
            log.warning("account locked", extra={"account": gate.name.account, "failures": outcome.failures})
            await self.runtime.events.publish(
                "auth",
                "account_locked",
                account=gate.name.account,
                reason="too_many_failures",
                failures=str(outcome.failures),
                minutes=str(rules.lock_minutes),
                **attempt.fields,
            )

    async def accept(
        self,
        attempt: Attempt,
        account: Account,
        client_ip: str,
        rules: LoginSettings,
        verified_hash: str | None,
        password: str | None,
        creds: Credentials,
    ) -> auth_pb2.AuthenticateResponse:
        unlocked = await self.guard.record_success(account.address, client_ip, time.time(), rules)
        common = {"account": account.address, **attempt.fields}
        if unlocked:
            await self.runtime.events.publish("auth", "account_unlocked", reason="lock_expired", **common)
        if verified_hash is not None and password is not None:
            await self._upgrade_credentials(account.address, verified_hash, password, creds)
        log.info(
            "login ok",
            extra={"account": account.address, "session": common["session_id"], "protocol": common["protocol"]},
        )
        await self.runtime.events.publish("auth", "login_ok", **common)
        return auth_pb2.AuthenticateResponse(status=auth_pb2.AUTH_STATUS_OK, account=account.address, role=account.role)

    async def _upgrade_credentials(self, account: str, verified_hash: str, password: str, creds: Credentials) -> None:
        """While we hold the right password: re-hash when the cost changed or the hash was
        imported (migration), and derive SCRAM keys when they are missing or weaker."""
        scram = creds.scram
        rehash = self.hasher.needs_rehash(verified_hash)
        want_scram = scram is None or scram.iterations < self.settings.scram_iterations
        if not rehash and not want_scram:
            return
        fresh = await self.hasher.hash(password) if rehash else verified_hash
        if want_scram:
            scram = await self.hasher.scram_keys(password, self.settings.scram_iterations)
        if await self.creds.upgrade(account, verified_hash, fresh, scram) and scheme_of(verified_hash):
            log.info("imported hash upgraded", extra={"account": account, "scheme": scheme_of(verified_hash)})
            await self.runtime.events.publish("auth", "hash_upgraded", account=account, reason=scheme_of(verified_hash))

    async def refuse(
        self,
        attempt: Attempt,
        context: grpc.aio.ServicerContext,
        name: LoginName,
        refusal: Refusal,
        rules: LoginSettings,
    ) -> auth_pb2.AuthenticateResponse:
        log.info(
            "login failed",
            extra={"reason": refusal.reason, "account": name.account or "", "session": attempt.session_id[:MAX_FIELD]},
        )
        await self.runtime.events.publish(
            "auth",
            "login_failed",
            account=name.account or "",
            reason=refusal.reason,
            login=name.typed[:MAX_LOGIN_LENGTH],
            **attempt.fields,
        )
        # Every failure answers at the same moment after the call began (R-LOG-4).
        await self.sleep(rules.failure_delay_ms / 1000 - (time.monotonic() - attempt.started), context)
        return auth_pb2.AuthenticateResponse(status=refusal.status)

    @staticmethod
    async def sleep(seconds: float, context: grpc.aio.ServicerContext) -> None:
        remaining = context.time_remaining()
        if remaining is not None:
            seconds = min(seconds, remaining - DEADLINE_MARGIN)
        if seconds > 0:
            await asyncio.sleep(seconds)


def _retrieve(task: asyncio.Future[auth_pb2.AuthenticateResponse]) -> None:
    """Consume the outcome of an attempt whose caller went away (no "never retrieved" noise)."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("abandoned authentication attempt failed: %s", type(task.exception()).__name__)

