"""R-2FA-1 (TOTP, recovery codes) and R-2FA-2 (app passwords): formats and checks.

Everything lives in the account's credentials hash (``keys.credentials``), so deleting an account
removes its second factor with its password:

- ``totp``: the active TOTP secret, sealed with :class:`rempart.common.secretbox.SecretBox`;
  ``totp_pending`` (+ ``totp_pending_at``): a secret shown at enrolment, not yet confirmed.
- ``rc:<hmac>``: one field per unused recovery code; using one is an ``HDEL`` (atomic, once).
- ``app:<name>``: JSON ``{"hash": <argon2id>, "tag": <keyed 32-bit tag>, "created": <time>}``;
  ``appused:<name>``: last successful use.

The TOTP replay guard (RFC 6238 section 5.2: "the verifier MUST NOT accept the second attempt of
the same OTP") is the last accepted time step, in Redis, raised by one Lua script, so two
replicas cannot both accept the same code.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

import pyotp

TOTP_STEP_SECONDS = 30  # RFC 6238 default; every authenticator app uses it
TOTP_DIGITS = 6
TOTP_WINDOW = 1  # accept the previous and next step too (clock drift)
PENDING_TOTP_SECONDS = 15 * 60
RECOVERY_CODES = 10
RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/l/i: read aloud, typed by hand
RECOVERY_GROUP = 5
APP_LETTERS = "abcdefghijklmnopqrstuvwxyz"
APP_PASSWORD_GROUPS = 4  # "abcd-efgh-ijkl-mnop": 16 letters, 75 bits
APP_PASSWORD_GROUP = 4
MAX_APP_PASSWORDS = 20
APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")

TOTP_FIELD = "totp"
TOTP_ENABLED_AT = "totp_enabled_at"
TOTP_PENDING = "totp_pending"
TOTP_PENDING_AT = "totp_pending_at"
RECOVERY_PREFIX = "rc:"
APP_PREFIX = "app:"
APP_USED_PREFIX = "appused:"

# KEYS[1] = last accepted step; ARGV = step, ttl. 1 when this step is newer and now taken.
CLAIM_STEP = """
local last = tonumber(redis.call('GET', KEYS[1]) or '-1')
local step = tonumber(ARGV[1])
if step > last then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
  return 1
end
return 0
"""
CLAIM_TTL_SECONDS = TOTP_STEP_SECONDS * (2 * TOTP_WINDOW + 2)

# KEYS[1] = credentials; ARGV = name, time. Only for an app password that still exists.
TOUCH_APP_ENTRY = """
if redis.call('HEXISTS', KEYS[1], 'app:' .. ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'appused:' .. ARGV[1], ARGV[2])
end
return 0
"""


def new_totp_secret() -> str:
    return pyotp.random_base32(32)  # 160 bits, RFC 4226 section 4's recommended length


def otpauth_uri(secret: str, account: str, issuer: str) -> str:
    return pyotp.TOTP(secret).provisioning_uri(name=account, issuer_name=issuer or "Rempart")


def matching_step(secret: str, code: str, now: float) -> int | None:
    """The time step whose code ``code`` is, within the window; None when none matches."""
    code = code.strip().replace(" ", "")
    if len(code) != TOTP_DIGITS or not code.isascii() or not code.isdigit():
        return None
    totp = pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_STEP_SECONDS)
    current = int(now // TOTP_STEP_SECONDS)
    found = None
    for step in range(current - TOTP_WINDOW, current + TOTP_WINDOW + 1):
        # Compare every candidate: the time taken does not tell which step matched.
        if hmac.compare_digest(totp.at(step * TOTP_STEP_SECONDS), code):
            found = step
    return found


def _grouped(alphabet: str, groups: int, size: int) -> str:
    return "-".join("".join(secrets.choice(alphabet) for _ in range(size)) for _ in range(groups))


def new_recovery_codes() -> list[str]:
    return [_grouped(RECOVERY_ALPHABET, 2, RECOVERY_GROUP) for _ in range(RECOVERY_CODES)]


def canonical_code(code: str) -> str:
    return code.strip().lower().replace("-", "").replace(" ", "")


def looks_like_recovery_code(code: str) -> bool:
    text = canonical_code(code)
    return len(text) == 2 * RECOVERY_GROUP and all(c in RECOVERY_ALPHABET for c in text)


def recovery_field(secret_key: bytes, account: str, code: str) -> str:
    # 50 random bits per code, so a keyed SHA-256 is enough; an offline guess needs the key.
    mac = hmac.new(secret_key, b"rempart-recovery\0" + account.encode() + b"\0", hashlib.sha256)
    mac.update(canonical_code(code).encode())
    return RECOVERY_PREFIX + mac.hexdigest()


def new_app_password() -> str:
    return _grouped(APP_LETTERS, APP_PASSWORD_GROUPS, APP_PASSWORD_GROUP)


def canonical_app_password(password: str) -> str | None:
    """The 16 letters of an app password as typed ("abcd efgh ..." or with dashes), or None."""
    text = password.strip().lower().replace("-", "").replace(" ", "")
    size = APP_PASSWORD_GROUPS * APP_PASSWORD_GROUP
    if len(text) != size or not all(c in APP_LETTERS for c in text):
        return None
    return text


def app_password_tag(secret_key: bytes, account: str, canonical: str) -> str:
    """A keyed 32-bit tag: which app password to verify with Argon2id, so that a login costs one
    hash however many app passwords the account has. 32 bits of a keyed MAC of a 75-bit secret
    tell an attacker who reads Redis nothing usable."""
    mac = hmac.new(secret_key, b"rempart-app-password\0" + account.encode() + b"\0", hashlib.sha256)
    mac.update(canonical.encode())
    return mac.hexdigest()[:8]


def valid_app_name(name: str) -> bool:
    return APP_NAME.fullmatch(name) is not None
