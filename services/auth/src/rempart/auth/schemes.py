"""Password hashes imported from another server (migration), Dovecot-style scheme prefixes.

Accepted: ``{ARGON2ID}`` (PHC string), ``{BLF-CRYPT}`` (bcrypt ``$2a$``/``$2b$``/``$2y$``),
``{SHA512-CRYPT}`` (crypt(3) ``$6$``) and ``{SSHA512}`` (base64 of SHA-512(password + salt)
followed by the salt). An imported hash is only ever verified, then replaced by a native Argon2id
hash at the first successful login. Every parameter an import may carry is capped, so that one
imported hash cannot make a login arbitrarily expensive.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import warnings

from argon2 import Type, extract_parameters
from argon2.exceptions import InvalidHashError

from rempart.auth.argon2id import verify_argon2id

with warnings.catch_warnings():
    # crypt is deprecated (PEP 594) but present in 3.11, and it is the system's own crypt(3):
    # libxcrypt implements $6$ and $2b$/$2y$, so no second implementation is needed.
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt

ARGON2ID = "{ARGON2ID}"
BLF_CRYPT = "{BLF-CRYPT}"
SHA512_CRYPT = "{SHA512-CRYPT}"
SSHA512 = "{SSHA512}"
SCHEMES = (ARGON2ID, BLF_CRYPT, SHA512_CRYPT, SSHA512)

MAX_IMPORTED_HASH = 512
MAX_ARGON2_MEMORY_KIB = 1024 * 1024
MAX_ARGON2_TIME_COST = 20
MAX_ARGON2_PARALLELISM = 16
BCRYPT_COSTS = range(4, 16)
MAX_SHA512_CRYPT_ROUNDS = 1_000_000
SHA512_DIGEST = 64
MAX_SSHA_SALT = 64

_BCRYPT = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_SHA512_CRYPT = re.compile(r"\$6\$(?:rounds=(\d{1,9})\$)?[^$:\s]{1,16}\$[./A-Za-z0-9]{86}")


class ImportRefused(ValueError):
    """The hash is not one we accept; the message names why, never the hash."""


def scheme_of(stored: str) -> str:
    """The scheme prefix of a stored imported hash, "" for a native Argon2id hash."""
    if stored.startswith("{"):
        return stored[: stored.find("}") + 1]
    return ""


def validate_import(scheme_hash: str) -> str:
    """The hash, checked and normalised (scheme upper-cased); raises :class:`ImportRefused`."""
    text = scheme_hash.strip()
    if len(text) > MAX_IMPORTED_HASH:
        raise ImportRefused(f"hash longer than {MAX_IMPORTED_HASH} characters")
    end = text.find("}")
    if not text.startswith("{") or end < 0:
        raise ImportRefused(f"no scheme prefix; expected one of {', '.join(SCHEMES)}")
    scheme, body = text[: end + 1].upper(), text[end + 1 :]
    if scheme == ARGON2ID:
        _check_argon2(body)
    elif scheme == BLF_CRYPT:
        match = _BCRYPT.fullmatch(body)
        if not match or int(match.group(1)) not in BCRYPT_COSTS:
            raise ImportRefused(f"{BLF_CRYPT}: not a bcrypt hash with cost 4..15")
    elif scheme == SHA512_CRYPT:
        match = _SHA512_CRYPT.fullmatch(body)
        if not match or (match.group(1) and int(match.group(1)) > MAX_SHA512_CRYPT_ROUNDS):
            raise ImportRefused(f"{SHA512_CRYPT}: not a $6$ crypt hash with at most {MAX_SHA512_CRYPT_ROUNDS} rounds")
    elif scheme == SSHA512:
        raw = _b64(body)
        if raw is None or not SHA512_DIGEST < len(raw) <= SHA512_DIGEST + MAX_SSHA_SALT:
            raise ImportRefused(f"{SSHA512}: not base64 of a SHA-512 digest and a salt of 1..{MAX_SSHA_SALT} bytes")
    else:
        raise ImportRefused(f"unsupported scheme; expected one of {', '.join(SCHEMES)}")
    return scheme + body


def _check_argon2(body: str) -> None:
    try:
        params = extract_parameters(body)
    except (InvalidHashError, ValueError) as exc:
        raise ImportRefused(f"{ARGON2ID}: not an Argon2 PHC string") from exc
    if params.type is not Type.ID:
        raise ImportRefused(f"{ARGON2ID}: not an argon2id hash")
    if (params.memory_cost > MAX_ARGON2_MEMORY_KIB or params.time_cost > MAX_ARGON2_TIME_COST
            or params.parallelism > MAX_ARGON2_PARALLELISM):
        raise ImportRefused(f"{ARGON2ID}: cost parameters above the accepted maximum")


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def verify_imported(stored: str, password: str) -> bool:
    """Check ``password`` against an imported hash (blocking: call it from a worker thread)."""
    scheme = scheme_of(stored)
    body = stored[len(scheme) :]
    if scheme == ARGON2ID:
        return verify_argon2id(body, password)
    if scheme in (BLF_CRYPT, SHA512_CRYPT):
        try:
            computed = crypt.crypt(password, body)
        except (ValueError, OSError):  # a NUL in the password, or a hash libcrypt refuses
            return False
        return computed is not None and hmac.compare_digest(computed, body)
    if scheme == SSHA512:
        raw = _b64(body)
        if raw is None or len(raw) <= SHA512_DIGEST:
            return False
        digest, salt = raw[:SHA512_DIGEST], raw[SHA512_DIGEST:]
        computed_digest = hashlib.sha512(password.encode("utf-8", "surrogatepass") + salt).digest()
        return hmac.compare_digest(computed_digest, digest)
    return False
