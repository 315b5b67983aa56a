"""DKIM signing of what the relay sends (R-OUT-5, RFC 6376, RFC 8463).

The signing domain (``d=``) is the domain of the message's From address when it is a local
domain with active keys (what DMARC aligns on), else the envelope sender's domain on the same
terms (a forwarded copy leaves with a local SRS sender, R-DNS-6); otherwise the message leaves
unsigned. Keys come from :class:`rempart.common.dkim.DkimKeyStore` (Redis, written by the admin
API); each replica keeps them in memory and rereads a domain's when the store's version moves
(looked at once a second at most) or after :data:`KEY_CACHE_SECONDS`.

A key that cannot be opened or a message dkimpy cannot sign is logged and the message leaves
unsigned: holding mail back would not make it more deliverable later.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import email.utils
import logging
import time
from dataclasses import dataclass, field

from prometheus_client import Counter

from rempart.common import dkim
from rempart.common.directory import Directory

log = logging.getLogger(__name__)

KEY_CACHE_SECONDS = 30.0
VERSION_CHECK_SECONDS = 1.0
SIGNED = Counter("rempart_relay_dkim_signatures_total", "DKIM signatures added by the relay", ["algorithm"])
_HEADERS = email.parser.BytesHeaderParser(policy=email.policy.compat32)


def from_domain(message: bytes) -> str:
    """The domain of the (first) From address, lower case; "" when there is none."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        end = message.find(b"\n\n")
    head = message if end < 0 else message[:end + 2]
    values = _HEADERS.parsebytes(head).get_all("From") or []
    for _name, address in email.utils.getaddresses([str(v) for v in values]):
        if "@" in address:
            return address.rpartition("@")[2].strip().lower().rstrip(".")
    return ""


@dataclass
class _Cached:
    keys: list[dkim.SigningKey]
    until: float


@dataclass
class DkimSigner:
    store: dkim.DkimKeyStore
    directory: Directory
    _cache: dict[str, _Cached] = field(default_factory=dict)
    _version: int = -1
    _version_checked: float = 0.0

    async def _refresh_version(self) -> None:
        now = time.monotonic()
        if now - self._version_checked < VERSION_CHECK_SECONDS:
            return
        self._version_checked = now
        version = await self.store.version()
        if version != self._version:
            self._cache.clear()
            self._version = version

    async def keys_for(self, domain: str) -> list[dkim.SigningKey]:
        if not domain:
            return []
        await self._refresh_version()
        cached = self._cache.get(domain)
        if cached is not None and cached.until > time.monotonic():
            return cached.keys
        found: list[dkim.SigningKey] = []
        if await self.directory.canonical_domain(domain) == domain:
            try:
                found = await self.store.signing_keys(domain)
            except ValueError as exc:  # sealed under another REMPART_SECRET_KEY
                log.error("DKIM keys of %s cannot be opened: %s", domain, exc)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[domain] = _Cached(found, time.monotonic() + KEY_CACHE_SECONDS)
        return found

    async def sign(self, message: bytes, envelope_sender: str) -> bytes:
        sender_domain = envelope_sender.rpartition("@")[2].lower() if "@" in envelope_sender else ""
        for domain in dict.fromkeys(d for d in (from_domain(message), sender_domain) if d):
            signing_keys = await self.keys_for(domain)
            if not signing_keys:
                continue
            try:
                signed = await asyncio.to_thread(dkim.sign, message, signing_keys)
            except Exception as exc:  # noqa: BLE001 - dkimpy's errors: send unsigned, loudly
                log.error("DKIM signing failed, sending unsigned: %s", exc, extra={"domain": domain})
                return message
            for key in signing_keys:
                SIGNED.labels(key.algorithm).inc()
            return signed
        return message
