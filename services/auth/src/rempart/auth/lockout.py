"""R-LOG-1: failed-login counting, account locks and known client IPs, shared in Redis.

Every auth replica reads and writes the same keys, and each change is one Lua script, so that
two replicas counting failures at once can neither lose a failure nor lock twice.

- Failures: a sorted set per login subject; member = a keyed hash (HMAC with the secret key) of
  the wrong password, score = time. Re-adding a member only moves its score, so a client that
  retries the same wrong password (a phone with a stale password) counts once. The password
  itself is never stored, and without the secret key the member cannot be tested offline.
- Lock: a string holding the unlock time; it outlives the lock so that the first successful
  login after expiry can report ``account_unlocked``.
- Known IPs: a sorted set client IP -> time of the last successful login; within
  ``known_ip_days`` such an IP keeps working while the account is locked for everyone else.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass

import redis.asyncio as aioredis

from rempart.common import keys
from rempart.common.config import LoginSettings

# Upper bounds on what one subject can make Redis hold.
MAX_KNOWN_IPS = 64
EXTRA_FAILURE_MEMBERS = 64
# How long a lock's record stays after it expired, to notice the first login after it.
LOCK_RECORD_SECONDS = 7 * 24 * 3600

_RECORD_FAILURE = """
local fail, lock = KEYS[1], KEYS[2]
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local member = ARGV[3]
local max_failures = tonumber(ARGV[4])
local lock_seconds = tonumber(ARGV[5])
local mode = ARGV[6]
local keep = tonumber(ARGV[7])
redis.call('ZREMRANGEBYSCORE', fail, '-inf', now - window)
redis.call('ZADD', fail, now, member)
redis.call('EXPIRE', fail, window + 1)
local extra = redis.call('ZCARD', fail) - (max_failures + tonumber(ARGV[8]))
if extra > 0 then
  redis.call('ZREMRANGEBYRANK', fail, 0, extra - 1)
end
local count = redis.call('ZCARD', fail)
if mode == 'lock' and count >= max_failures then
  local current = redis.call('GET', lock)
  if (not current) or tonumber(current) <= now then
    redis.call('SET', lock, string.format('%.3f', now + lock_seconds), 'EX', lock_seconds + keep)
    redis.call('DEL', fail)
    return {count, 1}
  end
end
return {count, 0}
"""

_RECORD_SUCCESS = """
local fail, lock, known = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[1])
local ip = ARGV[2]
local known_seconds = tonumber(ARGV[3])
local max_known = tonumber(ARGV[4])
redis.call('DEL', fail)
if ip ~= '' then
  redis.call('ZADD', known, now, ip)
  redis.call('ZREMRANGEBYSCORE', known, '-inf', now - known_seconds)
  local extra = redis.call('ZCARD', known) - max_known
  if extra > 0 then
    redis.call('ZREMRANGEBYRANK', known, 0, extra - 1)
  end
  redis.call('EXPIRE', known, known_seconds)
end
local current = redis.call('GET', lock)
if current and tonumber(current) <= now then
  redis.call('DEL', lock)
  return 1
end
return 0
"""


@dataclass(frozen=True)
class GuardState:
    locked: bool
    ip_known: bool
    recent_failures: int


@dataclass(frozen=True)
class FailureOutcome:
    failures: int
    locked_now: bool


class LoginGuard:
    def __init__(self, redis: aioredis.Redis, secret_key: bytes) -> None:
        self._redis = redis
        self._secret = secret_key
        self._record_failure = redis.register_script(_RECORD_FAILURE)
        self._record_success = redis.register_script(_RECORD_SUCCESS)

    def fingerprint(self, subject: str, password: str) -> str:
        """A keyed, truncated hash of a wrong password: equal passwords match, nothing else leaks."""
        mac = hmac.new(self._secret, b"rempart-auth-failure\0", hashlib.sha256)
        mac.update(subject.encode() + b"\0" + password.encode("utf-8", "surrogatepass"))
        return mac.hexdigest()[:32]

    async def state(self, subject: str, client_ip: str, now: float, rules: LoginSettings) -> GuardState:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.login_lock(subject))
            pipe.zscore(keys.known_login_ips(subject), client_ip or "-")
            pipe.zcount(keys.login_failures(subject), now - rules.failure_window_minutes * 60, "+inf")
            lock_until, known_at, failures = await pipe.execute()
        locked = lock_until is not None and float(lock_until) > now
        ip_known = bool(client_ip) and known_at is not None and float(known_at) >= now - rules.known_ip_days * 86400
        return GuardState(locked=locked, ip_known=ip_known, recent_failures=int(failures))

    async def record_failure(self, subject: str, fingerprint: str, now: float, rules: LoginSettings) -> FailureOutcome:
        result = await self._record_failure(
            keys=[keys.login_failures(subject), keys.login_lock(subject)],
            args=[
                f"{now:.3f}",
                rules.failure_window_minutes * 60,
                fingerprint,
                rules.max_failures,
                rules.lock_minutes * 60,
                rules.lockout_mode,
                LOCK_RECORD_SECONDS,
                EXTRA_FAILURE_MEMBERS,
            ],
        )
        return FailureOutcome(failures=int(result[0]), locked_now=bool(int(result[1])))

    async def unlock(self, subject: str, now: float) -> bool:
        """Helpdesk (R-ADM-4): end the lock and forget recent failures; True when a lock was in force."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(keys.login_lock(subject))
            pipe.delete(keys.login_lock(subject), keys.login_failures(subject))
            lock_until, _ = await pipe.execute()
        return lock_until is not None and float(lock_until) > now

    async def record_success(self, subject: str, client_ip: str, now: float, rules: LoginSettings) -> bool:
        """Clear failures and remember the IP; True when this login ends an expired lock."""
        result = await self._record_success(
            keys=[keys.login_failures(subject), keys.login_lock(subject), keys.known_login_ips(subject)],
            args=[f"{now:.3f}", client_ip, math.ceil(rules.known_ip_days * 86400), MAX_KNOWN_IPS],
        )
        return bool(int(result))
