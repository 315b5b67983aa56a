"""Admin API sessions: opaque random bearer tokens, stored in Redis only as their SHA-256.

A stolen Redis dump therefore yields no usable token; the token is shown once, at login.
Sessions expire after ``session_ttl_seconds`` (8 h by default) and on logout. A *restricted*
session (an admin who must first enrol TOTP, R-2FA-1) reaches only the enrolment routes.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from rempart.common import keys

TOKEN_BYTES = 32
MAX_TOKEN_CHARS = 128


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Session:
    account: str
    account_created: float
    restricted: bool
    epoch: int = 0


class SessionStore:
    def __init__(self, redis: aioredis.Redis, ttl_seconds: int) -> None:
        self._redis = redis
        self.ttl_seconds = ttl_seconds

    async def create(
        self, account: str, account_created: float, client_ip: str, restricted: bool = False, epoch: int = 0
    ) -> str:
        """``account_created`` ties the session to this incarnation of the account: a deleted and
        re-created address does not inherit the old sessions. ``epoch`` is the account's session
        epoch now: bumping it (:meth:`rempart.common.directory.Directory.end_sessions`) ends
        every session made before, on every replica, without an index of sessions per account."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        key = keys.admin_session(token_digest(token))
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                key,
                mapping={
                    "account": account,
                    "account_created": repr(account_created),
                    "client_ip": client_ip,
                    "created": repr(time.time()),
                    "restricted": "1" if restricted else "0",
                    "epoch": str(epoch),
                },
            )
            pipe.expire(key, self.ttl_seconds)
            await pipe.execute()
        return token

    async def account_for(self, token: str) -> Session | None:
        """The session (account, that account's creation time, restriction), or None."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        key = keys.admin_session(token_digest(token))
        fields = await self._redis.hmget(key, ["account", "account_created", "restricted", "epoch"])
        account, created, restricted, epoch = fields
        if not account or not created:
            return None
        # A session written without the field is unrestricted only if it predates 2FA: treat
        # anything but an explicit "0" as restricted, so a damaged record never widens access.
        return Session(str(account), float(created), restricted != "0", int(epoch or 0))

    async def lift_restriction(self, token: str) -> None:
        """After TOTP is confirmed (R-2FA-1), the session that enrolled becomes a full one."""
        key = keys.admin_session(token_digest(token))
        await self._redis.hset(key, "restricted", "0")

    async def adopt_epoch(self, token: str, epoch: int) -> None:
        """Keep this session alive across an epoch bump it made (a user's own password change)."""
        key = keys.admin_session(token_digest(token))
        await self._redis.hset(key, "epoch", str(epoch))

    async def revoke(self, token: str) -> None:
        await self._redis.delete(keys.admin_session(token_digest(token)))
