"""The credentials hash of one account (``keys.credentials``): password hash, SCRAM keys, TOTP,
recovery codes and app passwords, with the Redis operations that change them atomically."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from rempart.auth import twofactor as tf
from rempart.auth.scram import ScramKeys
from rempart.common import keys
from rempart.common.secretbox import SecretBox

# Replace the stored hash (and SCRAM keys) only if the hash is still the one that was verified:
# a password changed while this login was in flight must not be overwritten by the old one.
_UPGRADE = """
if redis.call('HGET', KEYS[1], 'hash') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'hash', ARGV[2])
  if ARGV[3] ~= '' then
    redis.call('HSET', KEYS[1], 'scram', ARGV[3])
  else
    redis.call('HDEL', KEYS[1], 'scram')
  end
  return 1
end
return 0
"""


@dataclass(frozen=True)
class AppPasswordEntry:
    name: str
    hash: str
    tag: str
    created: float
    last_used: float


@dataclass(frozen=True)
class Credentials:
    fields: dict[str, str]

    @property
    def password_hash(self) -> str | None:
        return self.fields.get("hash")

    @property
    def scram(self) -> ScramKeys | None:
        raw = self.fields.get("scram")
        return ScramKeys.decode(raw) if raw else None

    @property
    def totp_enabled(self) -> bool:
        return tf.TOTP_FIELD in self.fields

    def app_passwords(self) -> list[AppPasswordEntry]:
        out = []
        for field, value in self.fields.items():
            if not field.startswith(tf.APP_PREFIX):
                continue
            name = field[len(tf.APP_PREFIX):]
            try:
                doc = json.loads(value)
                out.append(AppPasswordEntry(name, str(doc["hash"]), str(doc["tag"]), float(doc["created"]),
                                            float(self.fields.get(tf.APP_USED_PREFIX + name, 0))))
            except (ValueError, KeyError, TypeError):
                continue  # a damaged entry never authenticates
        return sorted(out, key=lambda e: e.created)

    def recovery_codes_left(self) -> int:
        return sum(1 for f in self.fields if f.startswith(tf.RECOVERY_PREFIX))


class CredentialStore:
    def __init__(self, redis: aioredis.Redis, box: SecretBox, secret_key: bytes) -> None:
        self._redis = redis
        self._box = box
        self._secret = secret_key
        self._upgrade = redis.register_script(_UPGRADE)
        self._claim_step = redis.register_script(tf.CLAIM_STEP)
        self._touch = redis.register_script(tf.TOUCH_APP_ENTRY)

    async def load(self, account: str) -> Credentials:
        raw = await self._redis.hgetall(keys.credentials(account))
        return Credentials({str(k): str(v) for k, v in raw.items()})

    async def set_password(self, account: str, password_hash: str, scram: ScramKeys | None) -> None:
        key = keys.credentials(account)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"hash": password_hash, "changed": f"{time.time():.3f}"})
            if scram is not None:
                pipe.hset(key, "scram", scram.encode())
            else:
                pipe.hdel(key, "scram")
            await pipe.execute()

    async def upgrade(self, account: str, verified_hash: str, fresh_hash: str, scram: ScramKeys | None) -> bool:
        result = await self._upgrade(keys=[keys.credentials(account)],
                                     args=[verified_hash, fresh_hash, scram.encode() if scram else ""])
        return bool(int(result))

    # TOTP ------------------------------------------------------------------------------------
    def totp_secret(self, creds: Credentials, field: str = tf.TOTP_FIELD) -> str | None:
        sealed = creds.fields.get(field)
        return self._box.open(sealed).decode() if sealed else None

    async def put_pending_totp(self, account: str, secret: str) -> None:
        await self._redis.hset(keys.credentials(account), mapping={
            tf.TOTP_PENDING: self._box.seal(secret.encode()), tf.TOTP_PENDING_AT: f"{time.time():.3f}"})

    def pending_totp(self, creds: Credentials, now: float) -> str | None:
        try:
            created = float(creds.fields.get(tf.TOTP_PENDING_AT, "0"))
        except ValueError:
            return None
        if now - created > tf.PENDING_TOTP_SECONDS:
            return None
        return self.totp_secret(creds, tf.TOTP_PENDING)

    async def claim_step(self, account: str, step: int) -> bool:
        """RFC 6238 section 5.2: True once per time step and account, then never again."""
        return bool(int(await self._claim_step(keys=[keys.totp_last_step(account)],
                                               args=[step, tf.CLAIM_TTL_SECONDS])))

    async def activate_totp(self, account: str, secret: str, recovery_codes: list[str]) -> None:
        key = keys.credentials(account)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(key, tf.TOTP_PENDING, tf.TOTP_PENDING_AT)
            old = [f for f in (await self.load(account)).fields if f.startswith(tf.RECOVERY_PREFIX)]
            if old:
                pipe.hdel(key, *old)
            pipe.hset(key, mapping={tf.TOTP_FIELD: self._box.seal(secret.encode()),
                                    tf.TOTP_ENABLED_AT: f"{time.time():.3f}"})
            for code in recovery_codes:
                pipe.hset(key, tf.recovery_field(self._secret, account, code), "1")
            await pipe.execute()

    async def disable_totp(self, account: str) -> None:
        creds = await self.load(account)
        fields = [f for f in creds.fields if f.startswith(tf.RECOVERY_PREFIX)]
        await self._redis.hdel(keys.credentials(account), tf.TOTP_FIELD, tf.TOTP_ENABLED_AT, *fields)

    async def reset_totp(self, account: str) -> bool:
        """Helpdesk (R-ADM-4): TOTP off without a code, pending enrolment and recovery codes gone.
        True when TOTP was active."""
        creds = await self.load(account)
        fields = [f for f in creds.fields if f.startswith(tf.RECOVERY_PREFIX)]
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(keys.credentials(account), tf.TOTP_FIELD, tf.TOTP_ENABLED_AT, tf.TOTP_PENDING,
                      tf.TOTP_PENDING_AT, *fields)
            # The replay guard belonged to the old secret: the user may enrol a new one at once.
            pipe.delete(keys.totp_last_step(account))
            await pipe.execute()
        return creds.totp_enabled

    async def use_recovery_code(self, account: str, code: str) -> bool:
        field = tf.recovery_field(self._secret, account, code)
        return bool(await self._redis.hdel(keys.credentials(account), field))

    # App passwords ---------------------------------------------------------------------------
    async def add_app_password(self, account: str, name: str, password_hash: str, tag: str) -> float | None:
        """The creation time, or None when the name exists (HSETNX: two calls cannot both win)."""
        created = time.time()
        doc = json.dumps({"hash": password_hash, "tag": tag, "created": created})
        if not await self._redis.hsetnx(keys.credentials(account), tf.APP_PREFIX + name, doc):
            return None
        return created

    async def revoke_app_password(self, account: str, name: str) -> bool:
        removed = await self._redis.hdel(keys.credentials(account), tf.APP_PREFIX + name, tf.APP_USED_PREFIX + name)
        return bool(removed)

    async def revoke_all_app_passwords(self, account: str) -> int:
        """Helpdesk (R-ADM-4): every app password of the account; returns how many there were."""
        creds = await self.load(account)
        fields = [f for f in creds.fields if f.startswith((tf.APP_PREFIX, tf.APP_USED_PREFIX))]
        if not fields:
            return 0
        await self._redis.hdel(keys.credentials(account), *fields)
        return sum(1 for f in fields if f.startswith(tf.APP_PREFIX))

    async def touch_app_password(self, account: str, name: str) -> None:
        await self._touch(keys=[keys.credentials(account)], args=[name, f"{time.time():.3f}"])
