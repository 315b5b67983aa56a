"""Verifying an Argon2id PHC string (R-PWD-2) with libsodium where it can, argon2-cffi otherwise.

The same hash at the same cost verifies in about half the CPU time in libsodium (PyNaCl's
bundled build picks AVX2 or AVX-512 code at run time) as in argon2-cffi's portable code: on
the benchmark machine 62 against 116 ms for t=3, m=64 MiB, p=1, the auth service's default.
A login's CPU is nearly all that verification, so this is what sets logins per second (Dovecot
verifies with libsodium too). The cost itself is unchanged: the parameters come from the
stored string, and the hashes are still written by argon2-cffi.

libsodium is given only strings both libraries read the same way: type argon2id, version 19,
no secret or associated data, at most 127 bytes (PyNaCl's limit). Its verification answers
"no" both for a wrong password and for a string it cannot use, as the argon2-cffi path here
does, so a string outside that shape goes to argon2-cffi, which knows the older forms.
"""

from __future__ import annotations

import re

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from nacl.bindings import crypto_pwhash_str_verify
from nacl.exceptions import InvalidkeyError

SODIUM_MAX_ENCODED = 127
# m, t and p as decimal numbers without leading zeros (libsodium and argon2-cffi parse the same
# digits the same way), then the salt and the hash in unpadded standard base64.
_SODIUM_SHAPE = re.compile(
    r"\$argon2id\$v=19\$m=[1-9][0-9]{0,9},t=[1-9][0-9]{0,9},p=[1-9][0-9]{0,7}"
    r"\$[A-Za-z0-9+/]{11,}\$[A-Za-z0-9+/]{6,}"
)
_fallback = PasswordHasher()  # verify() takes every parameter from the string


def sodium_verifies(encoded: str) -> bool:
    """Whether :func:`verify_argon2id` hands ``encoded`` to libsodium."""
    return len(encoded) <= SODIUM_MAX_ENCODED and _SODIUM_SHAPE.fullmatch(encoded) is not None


def verify_argon2id(encoded: str, password: str) -> bool:
    """True when ``password`` is the one ``encoded`` was made from; False for a wrong password
    and for a string that is not a usable Argon2 hash. Blocking: call it from a worker thread
    (both libraries release the GIL while they hash)."""
    secret = password.encode("utf-8")  # what argon2-cffi hashes for a str
    if sodium_verifies(encoded):
        try:
            return crypto_pwhash_str_verify(encoded.encode("ascii"), secret)
        except InvalidkeyError:
            return False
    try:
        return _fallback.verify(encoded, secret)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
