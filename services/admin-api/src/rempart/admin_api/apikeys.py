"""API keys (R-ADM-1, R-ADM-3): bearer credentials for scripts, scoped, hashed, revocable.

A key is ``rpk_<id>_<secret>``: the id names its record, the secret is 256 random bits. Only an
HMAC-SHA256 of the whole key (keyed with ``REMPART_SECRET_KEY``) is stored: a key is random and
long, so a fast keyed hash is as good as a slow password hash against a stolen Redis dump, and
costs nothing per request. The key is shown once, when it is made.

What a key may do is worked out again on every request and is never more than its creator may
do now: the creator's account must still exist (the same incarnation), be enabled, hold an
admin role and not have ended its sessions since the key was made (R-ADM-4: a password change
or reset, a 2FA reset and "end sessions" move the account's session epoch, which each key
records when it is made; those actions also delete the account's keys); a key confined to a
domain acts as that domain's admin (and a domain admin's keys are always confined to its domain);
a ``read`` key may only read. A key past its expiry, or revoked (its record deleted), is refused with 401.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis

from rempart.common import keys

KeyScope = Literal["read", "write"]
PREFIX = "rpk_"
ID_HEX = 16
SECRET_BYTES = 32
MAX_KEY_CHARS = 128
MAX_KEYS = 10_000  # across the server: creation is refused beyond (a bound on what a client makes)


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    owner: str
    owner_created: float
    scope: KeyScope
    domain: str  # the domain the key is confined to; "" for a superadmin's unconfined key
    created: float
    expires: float  # 0: never
    last_used: float  # 0: never
    last_ip: str
    owner_epoch: int = -1  # the creator's session epoch when it was made; -1: unknown (never valid)

    def expired(self, now: float) -> bool:
        return bool(self.expires) and now >= self.expires


def parse_key(token: str) -> str | None:
    """The key id of a well-formed key, else None."""
    if not token.startswith(PREFIX) or len(token) > MAX_KEY_CHARS:
        return None
    key_id, sep, secret = token[len(PREFIX):].partition("_")
    if not sep or len(key_id) != ID_HEX or not secret or any(c not in "0123456789abcdef" for c in key_id):
        return None
    return key_id


# The use is written only into a record that still exists (one step in Redis, no race with a revoke).
_RECORD_USE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'last_used', ARGV[1], 'last_ip', ARGV[2])
return 1
"""


def _epoch(raw: Any) -> int:
    # A record without a readable epoch is never valid: fail closed.
    try:
        return int(raw)
    except (TypeError, ValueError):
        return -1


class ApiKeyStore:
    def __init__(self, redis: aioredis.Redis, secret_key: str) -> None:
        self._redis = redis
        self._hmac_key = hashlib.sha256(b"rempart-admin-api-key\0" + secret_key.encode()).digest()

    def _digest(self, token: str) -> str:
        return hmac.new(self._hmac_key, token.encode(), hashlib.sha256).hexdigest()

    async def count(self) -> int:
        return int(await self._redis.zcard(keys.ADMIN_API_KEYS))

    async def create(self, *, name: str, owner: str, owner_created: float, owner_epoch: int, scope: KeyScope,
                     domain: str, expires: float) -> tuple[str, ApiKey]:
        """A new key: (the key, shown once; its record). ``owner_epoch`` is the creator's session
        epoch now: the key is dead once it moves (R-ADM-4)."""
        key_id = secrets.token_hex(ID_HEX // 2)
        token = f"{PREFIX}{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"
        now = time.time()
        record = ApiKey(key_id, name, owner, owner_created, scope, domain, now, expires, 0.0, "", owner_epoch)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.admin_api_key(key_id), mapping={
                "name": name, "owner": owner, "owner_created": repr(owner_created),
                "owner_epoch": str(owner_epoch), "scope": scope,
                "domain": domain, "created": repr(now), "expires": repr(expires), "hash": self._digest(token),
            })
            if expires:
                # Redis forgets it a day after it stopped working (the listing shows it expired meanwhile).
                pipe.expireat(keys.admin_api_key(key_id), int(expires) + 86400)
            pipe.zadd(keys.ADMIN_API_KEYS, {key_id: now})
            await pipe.execute()
        return token, record

    async def get(self, key_id: str, prune: bool = True) -> ApiKey | None:
        fields = await self._redis.hgetall(keys.admin_api_key(key_id))
        if not fields:
            if prune:
                await self._redis.zrem(keys.ADMIN_API_KEYS, key_id)  # expired by Redis: the index follows
            return None
        scope = str(fields.get("scope", "read"))
        return ApiKey(
            id=key_id,
            name=str(fields.get("name", "")),
            owner=str(fields.get("owner", "")),
            owner_created=float(fields.get("owner_created", 0) or 0),
            scope="write" if scope == "write" else "read",  # anything unreadable is the lesser right
            domain=str(fields.get("domain", "")),
            created=float(fields.get("created", 0) or 0),
            expires=float(fields.get("expires", 0) or 0),
            last_used=float(fields.get("last_used", 0) or 0),
            last_ip=str(fields.get("last_ip", "")),
            owner_epoch=_epoch(fields.get("owner_epoch")),
        )

    async def authenticate(self, token: str, client_ip: str) -> ApiKey | None:
        """The key's record when ``token`` is a live key (its use recorded), else None."""
        key_id = parse_key(token)
        if key_id is None:
            return None
        stored = await self._redis.hget(keys.admin_api_key(key_id), "hash")
        if stored is None or not hmac.compare_digest(str(stored), self._digest(token)):
            return None
        record = await self.get(key_id)
        if record is None or record.expired(time.time()):
            return None
        await self.record_use(key_id, client_ip)
        return record

    async def record_use(self, key_id: str, client_ip: str) -> bool:
        """Note the key's last use and IP, only while its record exists: a plain HSET after a
        revocation made meanwhile would bring back a partial record without a TTL. False when
        the record is gone."""
        written = await self._redis.eval(_RECORD_USE, 1, keys.admin_api_key(key_id), repr(time.time()), client_ip)
        return bool(written)

    async def page(self, after: tuple[float, str] | None, limit: int) -> list[ApiKey]:
        """Keys in creation order, after (created, id), up to ``limit``; expired records dropped."""
        low = "-inf" if after is None else after[0]
        found: list[ApiKey] = []
        offset = 0
        while len(found) < limit:
            ids = await self._redis.zrangebyscore(keys.ADMIN_API_KEYS, low, "+inf", start=offset, num=limit * 2,
                                                  withscores=True)
            if not ids:
                break
            offset += len(ids)
            raw: list[Any] = list(ids)
            pairs = [(str(item[0]), float(item[1])) for item in raw]
            for key_id, score in pairs:
                if after is not None and (score, key_id) <= after:
                    continue
                record = await self.get(key_id, prune=False)
                if record is not None:
                    found.append(record)
        return found[:limit]

    async def revoke(self, key_id: str) -> bool:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.admin_api_key(key_id))
            pipe.zrem(keys.ADMIN_API_KEYS, key_id)
            removed = await pipe.execute()
        return bool(int(removed[0]))



async def revoke_keys_of(redis: aioredis.Redis, owner: str) -> list[str]:
    """Delete every key made by ``owner`` (R-ADM-4: what ends its sessions ends its keys), so that
    the listing no longer shows them; the ids deleted. At most :data:`MAX_KEYS` records are read."""
    ids = [str(i) for i in await redis.zrange(keys.ADMIN_API_KEYS, 0, MAX_KEYS - 1)]
    if not ids:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for key_id in ids:
            pipe.hget(keys.admin_api_key(key_id), "owner")
        owners = await pipe.execute()
    owned = [key_id for key_id, found in zip(ids, owners, strict=True) if found is not None and str(found) == owner]
    if owned:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.delete(*(keys.admin_api_key(key_id) for key_id in owned))
            pipe.zrem(keys.ADMIN_API_KEYS, *owned)
            await pipe.execute()
    return owned
