"""The AuthService gRPC servicer: Authenticate (R-LOG-1..4) and SetPassword (R-PWD-1..2).

Order of the checks in Authenticate, cheapest first (Postfix's rule: refuse before any
expensive work): login name, IP restriction (R-LOG-3) and lock (R-LOG-1) are refused before any
password hash is computed, so a locked account under a spray costs no CPU. Everything that
fails answers no sooner than ``failure_delay_ms`` after the call began, and an unknown user
still pays one Argon2 verification against a dummy hash, so that neither the status nor the
timing tells whether an account exists (R-LOG-4).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import time

import grpc
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from rempart.auth.hashing import CredentialHasher
from rempart.auth.lockout import LoginGuard
from rempart.auth.login_names import MAX_LOGIN_LENGTH, LoginName, resolve_login
from rempart.auth.metrics import AUTH_ATTEMPTS, protocol_label
from rempart.auth.password_policy import MAX_PASSWORD_LENGTH, policy_violations
from rempart.auth.settings import AuthSettings
from rempart.common import keys
from rempart.common.config import LoginSettings
from rempart.common.directory import Account, Directory, normalize_address
from rempart.common.pb.auth.v1 import auth_pb2, auth_pb2_grpc
from rempart.common.runtime import ServiceRuntime

log = logging.getLogger(__name__)

SERVICE_NAME = "rempart.auth.v1.AuthService"
MAX_FIELD = 128  # client_ip, protocol, session_id: only echoed into logs and events
DEADLINE_MARGIN = 0.25  # answer before the caller's deadline rather than let it time out

# Replace the stored hash only if it is still the one that was verified: a password changed
# while this login was in flight must not be overwritten by a re-hash of the old one.
_REHASH = """
if redis.call('HGET', KEYS[1], 'hash') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'hash', ARGV[2])
  return 1
end
return 0
"""

_RESULT_LABELS = {
    auth_pb2.AUTH_STATUS_OK: "ok",
    auth_pb2.AUTH_STATUS_INVALID: "invalid",
    auth_pb2.AUTH_STATUS_LOCKED: "locked",
    auth_pb2.AUTH_STATUS_IP_RESTRICTED: "ip_restricted",
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
        self._guard = LoginGuard(runtime.redis, settings.secret_key.get_secret_value().encode())
        self._rehash = runtime.redis.register_script(_REHASH)

    async def start(self) -> None:
        await self.hasher.start()

    # Authenticate ----------------------------------------------------------------------------
    async def Authenticate(
        self, request: auth_pb2.AuthenticateRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.AuthenticateResponse:
        started = time.monotonic()
        try:
            reply = await self._authenticate(request, context, started)
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

    async def _authenticate(
        self, request: auth_pb2.AuthenticateRequest, context: grpc.aio.ServicerContext, started: float
    ) -> auth_pb2.AuthenticateResponse:
        rules = self._rt.config.server.login
        client_ip = clean_ip(request.client_ip)
        password = request.password
        name = await resolve_login(self._directory, self._redis, request.login, rules)
        subject = name.account or name.typed
        effective = await self._rt.config.effective(name.domain, name.account or "")
        if not ip_allowed(client_ip, effective.login.allowed_ips):
            return await self._refuse(
                request, context, started, name, auth_pb2.AUTH_STATUS_IP_RESTRICTED, "ip_restricted", rules
            )
        now = time.time()
        state = await self._guard.state(subject, client_ip, now, rules)
        # A known IP (the user's own, R-LOG-1) is neither locked out nor slowed by an attack elsewhere.
        trusted_ip = rules.known_ip_bypass and state.ip_known
        if state.locked and not trusted_ip:
            return await self._refuse(request, context, started, name, auth_pb2.AUTH_STATUS_LOCKED, "locked", rules)
        if rules.lockout_mode == "slow_down" and state.recent_failures and not trusted_ip:
            delay = min(self._settings.slow_down_step_ms * state.recent_failures, self._settings.slow_down_max_ms)
            remaining = context.time_remaining()
            if remaining is not None and delay / 1000 > remaining - DEADLINE_MARGIN:
                # The caller cannot wait that long: refuse rather than check the password early,
                # or a short deadline would switch the slow-down off.
                return await self._refuse(
                    request, context, started, name, auth_pb2.AUTH_STATUS_INVALID, "slowed_down", rules
                )
            await self._sleep(delay / 1000, context)

        account = await self._directory.get_account(name.account) if name.account else None
        stored = await self._redis.hget(keys.credentials(account.address), "hash") if account else None
        usable = bool(password) and len(password) <= MAX_PASSWORD_LENGTH
        if stored is None:
            if usable:
                await self.hasher.verify_dummy(password)
            reason = "unknown_user" if account is None else "no_password"
            verified = False
        else:
            verified = usable and await self.hasher.verify(str(stored), password)
            reason = "bad_password"

        if verified and account is not None and not account.enabled:
            return await self._refuse(
                request, context, started, name, auth_pb2.AUTH_STATUS_INVALID, "account_disabled", rules
            )
        if not verified or account is None or stored is None:
            await self._count_failure(request, subject, name, password, rules)
            return await self._refuse(request, context, started, name, auth_pb2.AUTH_STATUS_INVALID, reason, rules)
        return await self._accept(request, account, str(stored), password, client_ip, rules)

    async def _count_failure(
        self,
        request: auth_pb2.AuthenticateRequest,
        subject: str,
        name: LoginName,
        password: str,
        rules: LoginSettings,
    ) -> None:
        if rules.lockout_mode == "off":
            return
        fingerprint = self._guard.fingerprint(subject, password[:MAX_PASSWORD_LENGTH])
        outcome = await self._guard.record_failure(subject, fingerprint, time.time(), rules)
        if outcome.locked_now and name.account:
            log.warning("account locked", extra={"account": name.account, "failures": outcome.failures})
            await self._rt.events.publish(
                "auth",
                "account_locked",
                client_ip=request.client_ip[:MAX_FIELD],
                account=name.account,
                protocol=request.protocol[:MAX_FIELD],
                session_id=request.session_id[:MAX_FIELD],
                reason="too_many_failures",
                failures=str(outcome.failures),
                minutes=str(rules.lock_minutes),
            )

    async def _accept(
        self,
        request: auth_pb2.AuthenticateRequest,
        account: Account,
        stored: str,
        password: str,
        client_ip: str,
        rules: LoginSettings,
    ) -> auth_pb2.AuthenticateResponse:
        unlocked = await self._guard.record_success(account.address, client_ip, time.time(), rules)
        common = {
            "client_ip": request.client_ip[:MAX_FIELD],
            "account": account.address,
            "protocol": request.protocol[:MAX_FIELD],
            "session_id": request.session_id[:MAX_FIELD],
        }
        if unlocked:
            await self._rt.events.publish("auth", "account_unlocked", reason="lock_expired", **common)
        if self.hasher.needs_rehash(stored):
            # The cost parameters changed since this hash was made: upgrade it while we hold the password.
            fresh = await self.hasher.hash(password)
            await self._rehash(keys=[keys.credentials(account.address)], args=[stored, fresh])
        log.info(
            "login ok",
            extra={"account": account.address, "session": common["session_id"], "protocol": common["protocol"]},
        )
        await self._rt.events.publish("auth", "login_ok", **common)
        return auth_pb2.AuthenticateResponse(status=auth_pb2.AUTH_STATUS_OK, account=account.address, role=account.role)

    async def _refuse(
        self,
        request: auth_pb2.AuthenticateRequest,
        context: grpc.aio.ServicerContext,
        started: float,
        name: LoginName,
        status: auth_pb2.AuthStatus.ValueType,
        reason: str,
        rules: LoginSettings,
    ) -> auth_pb2.AuthenticateResponse:
        log.info(
            "login failed",
            extra={"reason": reason, "account": name.account or "", "session": request.session_id[:MAX_FIELD]},
        )
        await self._rt.events.publish(
            "auth",
            "login_failed",
            client_ip=request.client_ip[:MAX_FIELD],
            account=name.account or "",
            protocol=request.protocol[:MAX_FIELD],
            session_id=request.session_id[:MAX_FIELD],
            reason=reason,
            login=name.typed[:MAX_LOGIN_LENGTH],
        )
        # Every failure answers at the same moment after the call began (R-LOG-4).
        await self._sleep(rules.failure_delay_ms / 1000 - (time.monotonic() - started), context)
        return auth_pb2.AuthenticateResponse(status=status)

    @staticmethod
    async def _sleep(seconds: float, context: grpc.aio.ServicerContext) -> None:
        remaining = context.time_remaining()
        if remaining is not None:
            seconds = min(seconds, remaining - DEADLINE_MARGIN)
        if seconds > 0:
            await asyncio.sleep(seconds)

    # SetPassword -----------------------------------------------------------------------------
    async def SetPassword(
        self, request: auth_pb2.SetPasswordRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.SetPasswordResponse:
        address = normalize_address(request.account)
        if not address or len(address) > MAX_LOGIN_LENGTH:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "account: not an address")
        try:
            account = await self._directory.get_account(address)
            if account is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, "unknown account")
            assert account is not None  # abort() raises
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
            await self._redis.hset(
                keys.credentials(account.address), mapping={"hash": hashed, "changed": f"{time.time():.3f}"}
            )
        except (RedisError, OSError, ValueError) as exc:
            log.warning("set password failed: %s", type(exc).__name__, extra={"account": address})
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
