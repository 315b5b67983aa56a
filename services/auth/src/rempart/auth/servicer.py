"""The AuthService gRPC servicer: Authenticate (R-LOG-1..4), SetPassword and ImportHash
(R-PWD-1..2), SCRAM-SHA-256 (R-TLS-2), TOTP and app passwords (R-2FA-1..2).

Order of the checks in Authenticate, cheapest first (Postfix's rule: refuse before any
expensive work): login name, IP restriction (R-LOG-3) and lock (R-LOG-1) are refused before any
password hash is computed, so a locked account under a spray costs no CPU. Everything that
fails answers no sooner than ``failure_delay_ms`` after the call began, and an unknown user
still pays one Argon2 verification against a dummy hash, so that neither the status nor the
timing tells whether an account exists (R-LOG-4). SCRAM follows the same rules: the gate runs
at ScramStart, an unknown user gets a decoy server-first, and ScramFinish refuses like
Authenticate.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from rempart.auth.credentials import Credentials, CredentialStore
from rempart.auth.hashing import CredentialHasher
from rempart.auth.lockout import LoginGuard
from rempart.auth.login_names import MAX_LOGIN_LENGTH, LoginName, resolve_login
from rempart.auth.metrics import AUTH_ATTEMPTS, protocol_label
from rempart.auth.password_policy import MAX_PASSWORD_LENGTH, policy_violations
from rempart.auth.schemes import ImportRefused, scheme_of, validate_import
from rempart.auth.scram import (
    INVALID_PROOF,
    ScramKeys,
    ScramMessageError,
    decoy_keys,
    finish,
    server_first,
)
from rempart.auth.settings import AuthSettings
from rempart.auth.twofactor import (
    MAX_APP_PASSWORDS,
    app_password_tag,
    canonical_app_password,
    looks_like_recovery_code,
    matching_step,
    new_app_password,
    new_recovery_codes,
    new_totp_secret,
    otpauth_uri,
    valid_app_name,
)
from rempart.common import keys
from rempart.common.config import LoginSettings
from rempart.common.directory import Account, Directory, normalize_address
from rempart.common.pb.auth.v1 import auth_pb2, auth_pb2_grpc
from rempart.common.runtime import ServiceRuntime
from rempart.common.sasl import SaslMalformed, authzid_permitted, parse_client_first
from rempart.common.secretbox import SecretBox

log = logging.getLogger(__name__)

SERVICE_NAME = "rempart.auth.v1.AuthService"
MAX_FIELD = 128  # client_ip, protocol, session_id: only echoed into logs and events
DEADLINE_MARGIN = 0.25  # answer before the caller's deadline rather than let it time out

MAIL_PROTOCOLS = frozenset({"imap", "pop3", "smtp"})
ADMIN_PROTOCOL = "admin"
ADMIN_ROLES = frozenset({"superadmin", "domain_admin"})
MAX_CODE = 32  # a TOTP or recovery code

_RESULT_LABELS = {
    auth_pb2.AUTH_STATUS_OK: "ok",
    auth_pb2.AUTH_STATUS_INVALID: "invalid",
    auth_pb2.AUTH_STATUS_LOCKED: "locked",
    auth_pb2.AUTH_STATUS_IP_RESTRICTED: "ip_restricted",
    auth_pb2.AUTH_STATUS_SECOND_FACTOR_REQUIRED: "second_factor",
    auth_pb2.AUTH_STATUS_TEMPFAIL: "tempfail",
}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def clean_ip(raw: str) -> str:
    """The canonical text of a client IP, or "" when it is not one."""
    try:
        ip = ipaddress.ip_address(raw.strip()[:MAX_FIELD])
    except ValueError:
        return ""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@functools.lru_cache(maxsize=256)
def _networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    out: list[Network] = []
    for entry in entries:
        try:
            out.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            # Ignoring a bad entry narrows the list: a typo never opens the account wider.
            log.warning("ignoring invalid allowed_ips entry %r", entry)
    return tuple(out)


def ip_allowed(client_ip: str, allowed: list[str]) -> bool:
    """R-LOG-3: an empty list allows every IP; otherwise the client must be in one of them."""
    if not allowed:
        return True
    if not client_ip:
        return False
    ip = ipaddress.ip_address(client_ip)
    return any(ip.version == net.version and ip in net for net in _networks(tuple(allowed)))


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


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, settings: AuthSettings, runtime: ServiceRuntime) -> None:
        self._settings = settings
        self._rt = runtime
        self._redis: aioredis.Redis = runtime.redis
        self._directory = Directory(runtime.redis)
        self.hasher = CredentialHasher(
            settings.argon2_time_cost,
            settings.argon2_memory_kib,
            settings.argon2_parallelism,
            settings.max_concurrent_hashes,
        )
        self._secret = settings.secret_key.get_secret_value().encode()
        self._guard = LoginGuard(runtime.redis, self._secret)
        self._creds = CredentialStore(runtime.redis, SecretBox(settings.secret_key.get_secret_value()), self._secret)
        # The SCRAM server nonce; a test replaces it to replay RFC 7677's example exchange.
        self.scram_nonce: Callable[[], str] = lambda: secrets.token_urlsafe(18)

    async def start(self) -> None:
        await self.hasher.start()

    # Authenticate ----------------------------------------------------------------------------
    async def Authenticate(
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
        AUTH_ATTEMPTS.labels(protocol_label(request.protocol), _RESULT_LABELS.get(reply.status, "other")).inc()
        return reply

    async def _gate(self, login: str, client_ip: str, context: grpc.aio.ServicerContext) -> Gate:
        """Name resolution, IP restriction (R-LOG-3), lock and slow-down (R-LOG-1): no hash yet."""
        rules = self._rt.config.server.login
        name = await resolve_login(self._directory, self._redis, login, rules)
        subject = name.account or name.typed
        effective = await self._rt.config.effective(name.domain, name.account or "")
        if not ip_allowed(client_ip, effective.login.allowed_ips):
            return Gate(name, subject, Refusal(auth_pb2.AUTH_STATUS_IP_RESTRICTED, "ip_restricted"))
        now = time.time()
        state = await self._guard.state(subject, client_ip, now, rules)
        # A known IP (the user's own, R-LOG-1) is neither locked out nor slowed by an attack elsewhere.
        trusted_ip = rules.known_ip_bypass and state.ip_known
        if state.locked and not trusted_ip:
            return Gate(name, subject, Refusal(auth_pb2.AUTH_STATUS_LOCKED, "locked"))
        if rules.lockout_mode == "slow_down" and state.recent_failures and not trusted_ip:
            delay = min(self._settings.slow_down_step_ms * state.recent_failures, self._settings.slow_down_max_ms)
            remaining = context.time_remaining()
            if remaining is not None and delay / 1000 > remaining - DEADLINE_MARGIN:
                # The caller cannot wait that long: refuse rather than check the password early,
                # or a short deadline would switch the slow-down off.
                return Gate(name, subject, Refusal(auth_pb2.AUTH_STATUS_INVALID, "slowed_down"))
            await self._sleep(delay / 1000, context)
        return Gate(name, subject, None)

    async def _authenticate(
        self, request: auth_pb2.AuthenticateRequest, context: grpc.aio.ServicerContext, attempt: Attempt
    ) -> auth_pb2.AuthenticateResponse:
        rules = self._rt.config.server.login
        client_ip = clean_ip(request.client_ip)
        password = request.password
        gate = await self._gate(request.login, client_ip, context)
        name = gate.name
        if gate.refusal is not None:
            return await self._refuse(attempt, context, name, gate.refusal, rules)

        account = await self._directory.get_account(name.account) if name.account else None
        creds = await self._creds.load(account.address) if account else Credentials({})
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
            return await self._refuse(attempt, context, name, Refusal(auth_pb2.AUTH_STATUS_INVALID,
                                                                      "account_disabled"), rules)
        if not verified or account is None or stored is None:
            fingerprint = self._guard.fingerprint(gate.subject, password[:MAX_PASSWORD_LENGTH])
            await self._count_failure(attempt, gate, fingerprint, rules)
            return await self._refuse(attempt, context, name, Refusal(auth_pb2.AUTH_STATUS_INVALID, reason), rules)

        enrolment_required = False
        if request.protocol == ADMIN_PROTOCOL:
            if creds.totp_enabled:
                code = request.totp_code.strip()[:MAX_CODE]
                if not code:
                    return await self._refuse(attempt, context, name, Refusal(
                        auth_pb2.AUTH_STATUS_SECOND_FACTOR_REQUIRED, "totp_missing"), rules)
                if not await self._check_second_factor(account.address, creds, code):
                    # A wrong code counts like a wrong password: the password alone must not
                    # allow a million guesses at the code.
                    await self._count_failure(attempt, gate, self._guard.fingerprint(gate.subject, "totp\0" + code),
                                              rules)
                    return await self._refuse(attempt, context, name, Refusal(
                        auth_pb2.AUTH_STATUS_SECOND_FACTOR_REQUIRED, "totp_wrong"), rules)
            elif account.role in ADMIN_ROLES:
                effective = await self._rt.config.effective(account.domain, account.address)
                enrolment_required = effective.twofa.required_for_admins
        reply = await self._accept(attempt, account, client_ip, rules, verified_hash=None if app_name else stored,
                                   password=None if app_name else password, creds=creds)
        if app_name is not None:
            await self._creds.touch_app_password(account.address, app_name)
            reply.app_password = True
        reply.second_factor_enrolment_required = enrolment_required
        return reply

    async def _match_app_password(
        self, account: str, creds: Credentials, password: str, always_hash: bool
    ) -> str | None:
        """The name of the app password ``password`` is; one Argon2id verification at most.

        ``always_hash``: spend one verification even when no tag matches, so that a wrong
        password costs the same time as a right one (R-LOG-4)."""
        canonical = canonical_app_password(password) if len(password) <= MAX_PASSWORD_LENGTH else None
        if canonical is not None:
            tag = app_password_tag(self._secret, account, canonical)
            for entry in creds.app_passwords():
                if hmac.compare_digest(entry.tag, tag):
                    return entry.name if await self.hasher.verify(entry.hash, canonical) else None
        if always_hash and password and len(password) <= MAX_PASSWORD_LENGTH:
            await self.hasher.verify_dummy(password)
        return None

    async def _check_second_factor(self, account: str, creds: Credentials, code: str) -> bool:
        """A current TOTP code, used once (RFC 6238 section 5.2), or an unused recovery code."""
        secret = self._creds.totp_secret(creds)
        if secret is None:
            return False
        step = matching_step(secret, code, time.time())
        if step is not None:
            return await self._creds.claim_step(account, step)
        if looks_like_recovery_code(code) and await self._creds.use_recovery_code(account, code):
            log.warning("recovery code used", extra={"account": account})
            await self._rt.events.publish("auth", "recovery_code_used", account=account)
            return True
        return False

    async def _count_failure(self, attempt: Attempt, gate: Gate, fingerprint: str, rules: LoginSettings) -> None:
        if rules.lockout_mode == "off":
            return
        outcome = await self._guard.record_failure(gate.subject, fingerprint, time.time(), rules)
        if outcome.locked_now and gate.name.account:
            log.warning("account locked", extra={"account": gate.name.account, "failures": outcome.failures})
            await self._rt.events.publish(
                "auth",
                "account_locked",
                account=gate.name.account,
                reason="too_many_failures",
                failures=str(outcome.failures),
                minutes=str(rules.lock_minutes),
                **attempt.fields,
            )

    async def _accept(
        self,
        attempt: Attempt,
        account: Account,
        client_ip: str,
        rules: LoginSettings,
        verified_hash: str | None,
        password: str | None,
        creds: Credentials,
    ) -> auth_pb2.AuthenticateResponse:
        unlocked = await self._guard.record_success(account.address, client_ip, time.time(), rules)
        common = {"account": account.address, **attempt.fields}
        if unlocked:
            await self._rt.events.publish("auth", "account_unlocked", reason="lock_expired", **common)
        if verified_hash is not None and password is not None:
            await self._upgrade_credentials(account.address, verified_hash, password, creds)
        log.info(
            "login ok",
            extra={"account": account.address, "session": common["session_id"], "protocol": common["protocol"]},
        )
        await self._rt.events.publish("auth", "login_ok", **common)
        return auth_pb2.AuthenticateResponse(status=auth_pb2.AUTH_STATUS_OK, account=account.address, role=account.role)

    async def _upgrade_credentials(self, account: str, verified_hash: str, password: str, creds: Credentials) -> None:
        """While we hold the right password: re-hash when the cost changed or the hash was
        imported (migration), and derive SCRAM keys when they are missing or weaker."""
        scram = creds.scram
        rehash = self.hasher.needs_rehash(verified_hash)
        want_scram = scram is None or scram.iterations < self._settings.scram_iterations
        if not rehash and not want_scram:
            return
        fresh = await self.hasher.hash(password) if rehash else verified_hash
        if want_scram:
            scram = await self.hasher.scram_keys(password, self._settings.scram_iterations)
        if await self._creds.upgrade(account, verified_hash, fresh, scram) and scheme_of(verified_hash):
            log.info("imported hash upgraded", extra={"account": account, "scheme": scheme_of(verified_hash)})
            await self._rt.events.publish("auth", "hash_upgraded", account=account, reason=scheme_of(verified_hash))

    async def _refuse(
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
        await self._rt.events.publish(
            "auth",
            "login_failed",
            account=name.account or "",
            reason=refusal.reason,
            login=name.typed[:MAX_LOGIN_LENGTH],
            **attempt.fields,
        )
        # Every failure answers at the same moment after the call began (R-LOG-4).
        await self._sleep(rules.failure_delay_ms / 1000 - (time.monotonic() - attempt.started), context)
        return auth_pb2.AuthenticateResponse(status=refusal.status)

    @staticmethod
    async def _sleep(seconds: float, context: grpc.aio.ServicerContext) -> None:
        remaining = context.time_remaining()
        if remaining is not None:
            seconds = min(seconds, remaining - DEADLINE_MARGIN)
        if seconds > 0:
            await asyncio.sleep(seconds)

    # SCRAM-SHA-256 ---------------------------------------------------------------------------
    async def ScramStart(
        self, request: auth_pb2.ScramStartRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ScramStartResponse:
        attempt = Attempt(request.client_ip, request.protocol, request.session_id, time.monotonic())
        try:
            return await self._scram_start(request, context, attempt)
        except (RedisError, OSError, ValueError) as exc:
            log.warning("scram start tempfail: %s", type(exc).__name__,
                        extra={"session": request.session_id[:MAX_FIELD]})
            return auth_pb2.ScramStartResponse(status=auth_pb2.AUTH_STATUS_TEMPFAIL)

    async def _scram_start(
        self, request: auth_pb2.ScramStartRequest, context: grpc.aio.ServicerContext, attempt: Attempt
    ) -> auth_pb2.ScramStartResponse:
        if request.protocol not in MAIL_PROTOCOLS:
            return auth_pb2.ScramStartResponse(status=auth_pb2.AUTH_STATUS_INVALID)
        try:
            first = parse_client_first(request.client_first)
        except SaslMalformed:
            return auth_pb2.ScramStartResponse(status=auth_pb2.AUTH_STATUS_INVALID)
        client_ip = clean_ip(request.client_ip)
        gate = await self._gate(first.username, client_ip, context)
        refusal = gate.refusal
        if not authzid_permitted(first.authzid, first.username, self._rt.config.server.login):
            # Refused at finish like a wrong password, and counted like one (rempart.common.sasl).
            refusal = refusal or Refusal(auth_pb2.AUTH_STATUS_INVALID, "authzid_differs")
        account = await self._directory.get_account(gate.name.account) if gate.name.account else None
        creds = await self._creds.load(account.address) if account else Credentials({})
        scram_keys = creds.scram
        if account is None or scram_keys is None or creds.totp_enabled:
            # Unknown user, no SCRAM keys yet (imported hash), or 2FA on (R-2FA-2: app passwords
            # only, and SCRAM has no way to name one): a decoy server-first, refused at finish.
            scram_keys = decoy_keys(self._secret, gate.subject, self._settings.scram_iterations)
            if refusal is None:
                refusal = Refusal(auth_pb2.AUTH_STATUS_INVALID, "unknown_user" if account is None else
                                  ("totp_app_password_only" if creds.totp_enabled else "no_scram_keys"))
        s_nonce = self.scram_nonce()
        try:
            first_message = server_first(request.client_first, scram_keys, s_nonce)
        except ScramMessageError:
            return auth_pb2.ScramStartResponse(status=auth_pb2.AUTH_STATUS_INVALID)
        conversation_id = secrets.token_urlsafe(18)
        state = {
            "client_first": request.client_first,
            "s_nonce": s_nonce,
            "keys": scram_keys.encode(),
            "typed": gate.name.typed,
            "account": gate.name.account or "",
            "domain": gate.name.domain,
            "subject": gate.subject,
            "refusal_status": int(refusal.status) if refusal else 0,
            "refusal_reason": refusal.reason if refusal else "",
            **attempt.fields,
        }
        await self._redis.set(keys.scram_conversation(conversation_id), json.dumps(state),
                              ex=self._settings.scram_conversation_seconds)
        return auth_pb2.ScramStartResponse(
            status=auth_pb2.AUTH_STATUS_OK, conversation_id=conversation_id, server_first=first_message
        )

    async def ScramFinish(
        self, request: auth_pb2.ScramFinishRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ScramFinishResponse:
        started = time.monotonic()
        protocol = "other"
        try:
            reply, protocol = await self._scram_finish(request, context, started)
        except (RedisError, OSError, ValueError) as exc:
            log.warning("scram finish tempfail: %s", type(exc).__name__)
            reply = auth_pb2.ScramFinishResponse(status=auth_pb2.AUTH_STATUS_TEMPFAIL)
        AUTH_ATTEMPTS.labels(protocol_label(protocol), _RESULT_LABELS.get(reply.status, "other")).inc()
        return reply

    async def _scram_finish(
        self, request: auth_pb2.ScramFinishRequest, context: grpc.aio.ServicerContext, started: float
    ) -> tuple[auth_pb2.ScramFinishResponse, str]:
        rules = self._rt.config.server.login
        raw = None
        if request.conversation_id and len(request.conversation_id) <= MAX_FIELD:
            # GETDEL: a conversation finishes once, on whichever replica gets it.
            raw = await self._redis.getdel(keys.scram_conversation(request.conversation_id))
        if raw is None:
            await self._sleep(rules.failure_delay_ms / 1000 - (time.monotonic() - started), context)
            expired = auth_pb2.ScramFinishResponse(status=auth_pb2.AUTH_STATUS_INVALID, server_final=INVALID_PROOF)
            return expired, "other"
        state = json.loads(raw)
        attempt = Attempt(state["client_ip"], state["protocol"], state["session_id"], started)
        name = LoginName(state["typed"], state["account"] or None, state["domain"])
        gate = Gate(name, state["subject"], None)
        scram_keys = ScramKeys.decode(state["keys"])
        if scram_keys is None:
            raise ValueError("damaged SCRAM conversation")
        client_final = request.client_final

        def refused(reply: auth_pb2.AuthenticateResponse) -> tuple[auth_pb2.ScramFinishResponse, str]:
            return auth_pb2.ScramFinishResponse(status=reply.status, server_final=INVALID_PROOF), attempt.protocol

        def client_key_fingerprint() -> str:
            # A wrong proof cannot be compared across conversations (it mixes in both nonces and
            # the client's own StoredKey), so each failed SCRAM conversation counts once.
            return self._guard.fingerprint(gate.subject, "scram\0" + request.conversation_id)

        status, reason = int(state["refusal_status"]), str(state["refusal_reason"])
        if status:
            if status == auth_pb2.AUTH_STATUS_INVALID and reason != "slowed_down":
                await self._count_failure(attempt, gate, client_key_fingerprint(), rules)
            return refused(await self._refuse(attempt, context, name, Refusal(
                auth_pb2.AuthStatus.ValueType(status), reason), rules))
        server_final = finish(state["client_first"], scram_keys, state["s_nonce"], client_final)
        account = await self._directory.get_account(name.account) if name.account else None
        if server_final is None or account is None:
            await self._count_failure(attempt, gate, client_key_fingerprint(), rules)
            return refused(await self._refuse(attempt, context, name, Refusal(
                auth_pb2.AUTH_STATUS_INVALID, "bad_password"), rules))
        if not account.enabled:
            return refused(await self._refuse(attempt, context, name, Refusal(
                auth_pb2.AUTH_STATUS_INVALID, "account_disabled"), rules))
        client_ip = clean_ip(attempt.client_ip_raw)
        reply = await self._accept(attempt, account, client_ip, rules, None, None, Credentials({}))
        return auth_pb2.ScramFinishResponse(
            status=reply.status, server_final=server_final, account=reply.account, role=reply.role
        ), attempt.protocol

    # SetPassword and ImportHash --------------------------------------------------------------
    async def _account_or_abort(self, raw: str, context: grpc.aio.ServicerContext) -> Account:
        address = normalize_address(raw)
        if not address or len(address) > MAX_LOGIN_LENGTH:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "account: not an address")
        try:
            account = await self._directory.get_account(address)
        except (RedisError, OSError) as exc:
            log.warning("directory unavailable: %s", type(exc).__name__)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "credential store unavailable, try later")
            raise  # abort() raises; this line only tells the type checker
        if account is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown account")
        assert account is not None  # abort() raises
        return account

    async def SetPassword(
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
                effective = await self._rt.config.effective(account.domain, account.address)
                violations = await policy_violations(password, account.address, effective.password)
            if violations:
                return auth_pb2.SetPasswordResponse(ok=False, violations=violations)
            hashed = await self.hasher.hash(password)
            scram = await self.hasher.scram_keys(password, self._settings.scram_iterations)
            await self._creds.set_password(account.address, hashed, scram)
        except (RedisError, OSError, ValueError) as exc:
            log.warning("set password failed: %s", type(exc).__name__, extra={"account": account.address})
            await context.abort(grpc.StatusCode.UNAVAILABLE, "credential store unavailable, try later")
            raise  # abort() raises; this line only tells the type checker
        log.info("password changed", extra={"account": account.address, "policy_skipped": request.skip_policy})
        await self._rt.events.publish(
            "auth",
            "password_changed",
            account=account.address,
            reason="policy_skipped" if request.skip_policy else "",
        )
        return auth_pb2.SetPasswordResponse(ok=True)

    async def ImportHash(
        self, request: auth_pb2.ImportHashRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ImportHashResponse:
        """Migration: keep another server's hash until the next successful login upgrades it."""
        account = await self._account_or_abort(request.account, context)
        try:
            stored = validate_import(request.scheme_hash)
        except ImportRefused as exc:
            return auth_pb2.ImportHashResponse(ok=False, error=str(exc))
        try:
            await self._creds.set_password(account.address, stored, None)
        except (RedisError, OSError) as exc:
            log.warning("import hash failed: %s", type(exc).__name__, extra={"account": account.address})
            await context.abort(grpc.StatusCode.UNAVAILABLE, "credential store unavailable, try later")
        log.info("password hash imported", extra={"account": account.address, "scheme": scheme_of(stored)})
        await self._rt.events.publish("auth", "password_imported", account=account.address, reason=scheme_of(stored))
        return auth_pb2.ImportHashResponse(ok=True)

    # TOTP (R-2FA-1) --------------------------------------------------------------------------
    async def _unavailable(self, context: grpc.aio.ServicerContext, exc: Exception, what: str) -> None:
        log.warning("%s failed: %s", what, type(exc).__name__)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "credential store unavailable, try later")

    async def TotpEnrol(
        self, request: auth_pb2.TotpEnrolRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.TotpEnrolResponse:
        account = await self._account_or_abort(request.account, context)
        try:
            if (await self._creds.load(account.address)).totp_enabled:
                return auth_pb2.TotpEnrolResponse(already_enabled=True)
            secret = new_totp_secret()
            await self._creds.put_pending_totp(account.address, secret)
        except (RedisError, OSError, ValueError) as exc:
            await self._unavailable(context, exc, "totp enrol")
            raise
        uri = otpauth_uri(secret, account.address, request.issuer[:MAX_FIELD])
        return auth_pb2.TotpEnrolResponse(secret=secret, otpauth_uri=uri)

    async def TotpConfirm(
        self, request: auth_pb2.TotpConfirmRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.TotpConfirmResponse:
        account = await self._account_or_abort(request.account, context)
        try:
            creds = await self._creds.load(account.address)
            secret = self._creds.pending_totp(creds, time.time())
            if secret is None or creds.totp_enabled:
                return auth_pb2.TotpConfirmResponse(ok=False)
            step = matching_step(secret, request.code[:MAX_CODE], time.time())
            # The confirming code is used: the same code cannot log in a second time.
            if step is None or not await self._creds.claim_step(account.address, step):
                return auth_pb2.TotpConfirmResponse(ok=False)
            codes = new_recovery_codes()
            await self._creds.activate_totp(account.address, secret, codes)
        except (RedisError, OSError, ValueError) as exc:
            await self._unavailable(context, exc, "totp confirm")
            raise
        log.info("totp enabled", extra={"account": account.address})
        await self._rt.events.publish("auth", "totp_enabled", account=account.address)
        return auth_pb2.TotpConfirmResponse(ok=True, recovery_codes=codes)

    async def TotpDisable(
        self, request: auth_pb2.TotpDisableRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.TotpDisableResponse:
        account = await self._account_or_abort(request.account, context)
        rules = self._rt.config.server.login
        try:
            creds = await self._creds.load(account.address)
            if not creds.totp_enabled:
                return auth_pb2.TotpDisableResponse(ok=False)
            state = await self._guard.state(account.address, "", time.time(), rules)
            code = request.code.strip()[:MAX_CODE]
            if state.locked or not await self._check_second_factor(account.address, creds, code):
                if not state.locked and rules.lockout_mode != "off":
                    # Guessing codes to switch 2FA off counts like guessing passwords.
                    await self._guard.record_failure(
                        account.address, self._guard.fingerprint(account.address, "totp\0" + code), time.time(), rules
                    )
                return auth_pb2.TotpDisableResponse(ok=False)
            await self._creds.disable_totp(account.address)
        except (RedisError, OSError, ValueError) as exc:
            await self._unavailable(context, exc, "totp disable")
            raise
        log.info("totp disabled", extra={"account": account.address})
        await self._rt.events.publish("auth", "totp_disabled", account=account.address)
        return auth_pb2.TotpDisableResponse(ok=True)

    async def TotpStatus(
        self, request: auth_pb2.TotpStatusRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.TotpStatusResponse:
        account = await self._account_or_abort(request.account, context)
        try:
            creds = await self._creds.load(account.address)
        except (RedisError, OSError) as exc:
            await self._unavailable(context, exc, "totp status")
            raise
        return auth_pb2.TotpStatusResponse(enabled=creds.totp_enabled, recovery_codes_left=creds.recovery_codes_left())

    # App passwords (R-2FA-2) -----------------------------------------------------------------
    async def AppPasswordCreate(
        self, request: auth_pb2.AppPasswordCreateRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.AppPasswordCreateResponse:
        account = await self._account_or_abort(request.account, context)
        name = request.name.strip()
        if not valid_app_name(name):
            return auth_pb2.AppPasswordCreateResponse(error="bad_name")
        try:
            if len((await self._creds.load(account.address)).app_passwords()) >= MAX_APP_PASSWORDS:
                return auth_pb2.AppPasswordCreateResponse(error="too_many")
            password = new_app_password()
            canonical = canonical_app_password(password)
            assert canonical is not None
            hashed = await self.hasher.hash(canonical)
            created = await self._creds.add_app_password(
                account.address, name, hashed, app_password_tag(self._secret, account.address, canonical)
            )
        except (RedisError, OSError, ValueError) as exc:
            await self._unavailable(context, exc, "app password create")
            raise
        if created is None:
            return auth_pb2.AppPasswordCreateResponse(error="exists")
        log.info("app password created", extra={"account": account.address, "app_password": name})
        await self._rt.events.publish("auth", "app_password_created", account=account.address, reason=name)
        return auth_pb2.AppPasswordCreateResponse(password=password, created=created)

    async def AppPasswordList(
        self, request: auth_pb2.AppPasswordListRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.AppPasswordListResponse:
        account = await self._account_or_abort(request.account, context)
        try:
            entries = (await self._creds.load(account.address)).app_passwords()
        except (RedisError, OSError) as exc:
            await self._unavailable(context, exc, "app password list")
            raise
        return auth_pb2.AppPasswordListResponse(app_passwords=[
            auth_pb2.AppPassword(name=e.name, created=e.created, last_used=e.last_used) for e in entries
        ])

    async def AppPasswordRevoke(
        self, request: auth_pb2.AppPasswordRevokeRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.AppPasswordRevokeResponse:
        account = await self._account_or_abort(request.account, context)
        name = request.name.strip()
        if not valid_app_name(name):
            return auth_pb2.AppPasswordRevokeResponse(found=False)
        try:
            found = await self._creds.revoke_app_password(account.address, name)
        except (RedisError, OSError) as exc:
            await self._unavailable(context, exc, "app password revoke")
            raise
        if found:
            log.info("app password revoked", extra={"account": account.address, "app_password": name})
            await self._rt.events.publish("auth", "app_password_revoked", account=account.address, reason=name)
        return auth_pb2.AppPasswordRevokeResponse(found=found)

    # Helpdesk (R-ADM-4): the admin API decided the caller may; nothing here needs the user. -----
    async def Unlock(
        self, request: auth_pb2.UnlockRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.UnlockResponse:
        account = await self._account_or_abort(request.account, context)
        try:
            was_locked = await self._guard.unlock(account.address, time.time())
        except (RedisError, OSError, ValueError) as exc:
            await self._unavailable(context, exc, "unlock")
            raise
        log.info("account unlocked by an administrator", extra={"account": account.address, "was_locked": was_locked})
        await self._rt.events.publish("auth", "account_unlocked", account=account.address, reason="helpdesk")
        return auth_pb2.UnlockResponse(was_locked=was_locked)

    async def TotpReset(
        self, request: auth_pb2.TotpResetRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.TotpResetResponse:
        account = await self._account_or_abort(request.account, context)
        try:
            was_enabled = await self._creds.reset_totp(account.address)
        except (RedisError, OSError) as exc:
            await self._unavailable(context, exc, "totp reset")
            raise
        log.info("totp reset by an administrator", extra={"account": account.address, "was_enabled": was_enabled})
        await self._rt.events.publish("auth", "totp_disabled", account=account.address, reason="helpdesk")
        return auth_pb2.TotpResetResponse(was_enabled=was_enabled)

    async def AppPasswordRevokeAll(
        self, request: auth_pb2.AppPasswordRevokeAllRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.AppPasswordRevokeAllResponse:
        account = await self._account_or_abort(request.account, context)
        try:
            revoked = await self._creds.revoke_all_app_passwords(account.address)
        except (RedisError, OSError) as exc:
            await self._unavailable(context, exc, "app password revoke all")
            raise
        log.info("app passwords revoked by an administrator", extra={"account": account.address, "revoked": revoked})
        await self._rt.events.publish("auth", "app_password_revoked", account=account.address, reason="helpdesk",
                                      count=str(revoked))
        return auth_pb2.AppPasswordRevokeAllResponse(revoked=revoked)


def _retrieve(task: asyncio.Future[auth_pb2.AuthenticateResponse]) -> None:
    """Consume the outcome of an attempt whose caller went away (no "never retrieved" noise)."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("abandoned authentication attempt failed: %s", type(task.exception()).__name__)
