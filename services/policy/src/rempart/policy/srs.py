"""The Sender Rewriting Scheme (R-DNS-6), on srslib (the Guarded scheme of libsrs2).

Forwarding a remote sender's mail through a local alias to another remote domain would fail the
destination's SPF check on the original sender's domain; rewriting the envelope sender to
``SRS0=hash=ts=origdomain=origlocal@ourdomain`` makes the forwarder the sender, and bounces come
back to us, where :func:`reverse` restores the original address.

Keys rotate: the first secret signs, every listed secret verifies. With no secret configured a
key derived from the process secret (``REMPART_SECRET_KEY``) signs, so SRS works out of the box
without putting a secret in the settings store.

srslib compares a hash of whatever length the address carries; an attacker could then send a
one-character hash and forge a reversible address (an open relay) with one try in 36. So the
address must match the exact form we generate, with a hash of :data:`HASH_LENGTH`, before srslib
sees it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence

import srslib

HASH_LENGTH = 6  # base64 characters of HMAC-SHA1; compared case-insensitively (libsrs2)
VALIDITY_DAYS = 21

_SRS0 = re.compile(rf"^srs0[=+-][a-z0-9+/]{{{HASH_LENGTH}}}=[a-z2-7]{{2}}=[^=@]+=[^@]+$", re.IGNORECASE)
_SRS1 = re.compile(rf"^srs1[=+-][a-z0-9+/]{{{HASH_LENGTH}}}=[^=@]+=[=+-][^@]+$", re.IGNORECASE)
_SRS_PREFIX = re.compile(r"^srs[01][=+-]", re.IGNORECASE)


class SrsError(ValueError):
    """Not an address we issued, or one that expired."""


def looks_like_srs(local_part: str) -> bool:
    return bool(_SRS_PREFIX.match(local_part))


class SrsKeys:
    """The signing and verifying schemes for the configured secrets (cached per secret list)."""

    def __init__(self, process_secret: str) -> None:
        self._derived = hmac.new(process_secret.encode(), b"rempart srs v1", hashlib.sha256).hexdigest()
        self._schemes: dict[tuple[str, ...], srslib.SRS] = {}

    def scheme(self, secrets: Sequence[str]) -> srslib.SRS:
        keys = tuple(s for s in secrets if s) or (self._derived,)
        found = self._schemes.get(keys)
        if found is None:
            if len(self._schemes) > 16:
                self._schemes.clear()  # old rotations: never more than a few live
            found = srslib.SRS(keys[0], prev_secrets=list(keys[1:]), validity_days=VALIDITY_DAYS,
                               hash_length=HASH_LENGTH)
            self._schemes[keys] = found
        return found

    def forward(self, secrets: Sequence[str], sender: str, alias_domain: str) -> str:
        """The SRS0 (or, for an SRS address from another forwarder, SRS1) envelope sender."""
        return str(self.scheme(secrets).forward(sender, alias_domain))

    def reverse(self, secrets: Sequence[str], address: str) -> str:
        """The address an SRS recipient stands for; raises SrsError when forged or expired."""
        local = address.rpartition("@")[0]
        if not (_SRS0.match(local) or _SRS1.match(local)):
            raise SrsError("not an SRS address of ours")
        try:
            return str(self.scheme(secrets).reverse(address))
        except srslib.Error as exc:
            raise SrsError(str(exc)) from exc
