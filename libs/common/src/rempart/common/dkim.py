"""DKIM signing keys and signatures (RFC 6376, RFC 8463; SPEC R-OUT-5).

Keys live in Redis, one hash per local domain (selector -> key record), so that every relay
replica signs with the same keys and the admin API is their only writer. The private key is
sealed with ``REMPART_SECRET_KEY`` (:class:`rempart.common.secretbox.SecretBox`) before it is
stored and opened only by :meth:`DkimKeyStore.signing_keys`, the relay's path: nothing that
lists or shows a key (:class:`DkimKey`) carries it.

Per domain and algorithm at most one key is *active* (signs); a rotation makes a new selector
active and *retires* the old one, which stays listed, with its TXT record, until it is deleted,
so that mail signed just before the rotation still verifies while it is in transit (RFC 6376
3.1: selectors exist for exactly this). RFC 8463 3 recommends signing with both rsa-sha256 and
ed25519-sha256 while verifiers learn Ed25519: with an active key of each, a message carries
both signatures, computed independently over the same message.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast, get_args

import dkim as dkimpy
import redis.asyncio as aioredis
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from redis.exceptions import WatchError

from rempart.common import keys
from rempart.common.secretbox import SecretBox

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
ALGORITHMS: tuple[Algorithm, ...] = get_args(Algorithm)
RSA_BITS = 2048  # RFC 8301 3.2: at least 1024, 2048 recommended
TXT_STRING_MAX = 255  # RFC 1035 3.3.14: one character-string of a TXT record
# A selector is one or more DNS labels (RFC 6376 3.1); kept to LDH and lower case here.
SELECTOR = re.compile(r"^(?=.{1,63}$)[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*$")
# What is signed (RFC 6376 5.4.1's list, with the MIME headers and RFC 8058's List-Unsubscribe-Post),
# each occurrence present; From is signed once more than it occurs (oversigned, RFC 6376 8.15), so
# that a second From added in transit breaks the signature instead of being shown to the reader.
SIGNED_HEADERS = (
    "from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id", "in-reply-to", "references",
    "mime-version", "content-type", "content-transfer-encoding", "content-id", "content-description",
    "list-id", "list-unsubscribe", "list-unsubscribe-post",
)
CANONICALIZATION = (b"relaxed", b"relaxed")
_HEADER_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.M)


class DkimError(Exception):
    """A key operation that cannot be done (the message says why, for an API answer)."""


class SelectorTaken(DkimError):
    pass


class ActiveKeyExists(DkimError):
    pass


class KeyNotActive(DkimError):
    pass


def key_type(algorithm: Algorithm) -> Literal["rsa", "ed25519"]:
    return "rsa" if algorithm == "rsa-sha256" else "ed25519"


def default_selector(algorithm: Algorithm, now: float) -> str:
    """``rp<yyyymm>`` for RSA, ``rp<yyyymm>e`` for Ed25519 (both may be made the same month)."""
    month = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y%m")
    return f"rp{month}" + ("e" if algorithm == "ed25519-sha256" else "")


@dataclass(frozen=True)
class DkimKey:
    """A key as anyone may see it: the public half and what to publish, never the private key."""

    domain: str
    selector: str
    algorithm: Algorithm
    public_key: str  # the p= value: base64 of the SubjectPublicKeyInfo (RSA) or the raw key (Ed25519)
    bits: int
    created: float
    active: bool
    retired_at: float = 0.0

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def txt_value(self) -> str:
        return f"v=DKIM1; k={key_type(self.algorithm)}; p={self.public_key}"

    def txt_strings(self) -> list[str]:
        """The record as TXT character-strings of at most 255 bytes (a 2048-bit RSA key needs two)."""
        value = self.txt_value
        return [value[i:i + TXT_STRING_MAX] for i in range(0, len(value), TXT_STRING_MAX)]

    @property
    def zone_line(self) -> str:
        strings = " ".join(f'"{s}"' for s in self.txt_strings())
        return f"{self.dns_name}. IN TXT {strings}"


@dataclass(frozen=True)
class SigningKey:
    """An active key with its private half: only the relay builds these, in memory."""

    domain: str
    selector: str
    algorithm: Algorithm
    private_key: bytes = b""

    def __repr__(self) -> str:  # never in a log line or a traceback
        return f"SigningKey(domain={self.domain!r}, selector={self.selector!r}, algorithm={self.algorithm!r})"


@dataclass
class _Stored:
    algorithm: Algorithm
    public_key: str
    private_sealed: str
    bits: int
    created: float
    active: bool
    retired_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> _Stored:
        data = json.loads(raw)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def public(self, domain: str, selector: str) -> DkimKey:
        return DkimKey(domain, selector, self.algorithm, self.public_key, self.bits, self.created, self.active,
                       self.retired_at)


def generate_key_pair(algorithm: Algorithm) -> tuple[bytes, str, int]:
    """A new private key in the form dkimpy signs with (PEM for RSA, the base64 32-byte seed for
    Ed25519, RFC 8463 4), the p= value and the key size in bits."""
    if algorithm == "rsa-sha256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        spki = private.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
        return pem, base64.b64encode(spki).decode(), RSA_BITS
    edkey = ed25519.Ed25519PrivateKey.generate()
    seed = edkey.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                               serialization.NoEncryption())
    raw_public = edkey.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(seed), base64.b64encode(raw_public).decode(), 256


class DkimKeyStore:
    def __init__(self, redis: aioredis.Redis, box: SecretBox) -> None:
        self._redis = redis
        self._box = box

    async def version(self) -> int:
        return int(await self._redis.get(keys.DKIM_VERSION) or 0)

    async def _records(self, domain: str) -> dict[str, _Stored]:
        raw = await self._redis.hgetall(keys.dkim_keys(domain))
        return {str(selector): _Stored.from_json(str(value)) for selector, value in raw.items()}

    async def list_keys(self, domain: str) -> list[DkimKey]:
        records = await self._records(domain)
        found = [record.public(domain, selector) for selector, record in records.items()]
        return sorted(found, key=lambda k: (k.created, k.selector))

    async def get(self, domain: str, selector: str) -> DkimKey | None:
        raw = await self._redis.hget(keys.dkim_keys(domain), selector)
        return None if raw is None else _Stored.from_json(str(raw)).public(domain, selector)

    async def generate(self, domain: str, algorithm: Algorithm, selector: str | None, now: float) -> DkimKey:
        """A new active key; refused when ``selector`` is taken or the domain already has an
        active key of this algorithm (that one is rotated instead)."""
        return await self._add(domain, algorithm, selector, now, retire=None)

    async def rotate(self, domain: str, selector: str, new_selector: str | None, now: float) -> tuple[DkimKey, DkimKey]:
        """A new active key of the same algorithm as ``selector``, which is retired (and stays
        published); the new key and the retired one."""
        current = await self.get(domain, selector)
        if current is None:
            raise KeyError(selector)
        new = await self._add(domain, current.algorithm, new_selector, now, retire=selector)
        retired = await self.get(domain, selector)
        assert retired is not None
        return new, retired

    async def _add(self, domain: str, algorithm: Algorithm, selector: str | None, now: float,
                   retire: str | None) -> DkimKey:
        # RSA key generation takes a noticeable fraction of a second: not on the event loop.
        private, public, bits = await asyncio.to_thread(generate_key_pair, algorithm)
        key = keys.dkim_keys(domain)
        while True:
            async with self._redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    raw = await pipe.hgetall(key)
                    records = {str(s): _Stored.from_json(str(v)) for s, v in raw.items()}
                    name = selector or _free_selector(default_selector(algorithm, now), records)
                    if name in records:
                        raise SelectorTaken(f"selector {name} exists for {domain}")
                    active = [s for s, r in records.items() if r.active and r.algorithm == algorithm]
                    if retire is None and active:
                        raise ActiveKeyExists(
                            f"{domain} already has an active {algorithm} key ({active[0]}): rotate it")
                    if retire is not None:
                        old = records.get(retire)
                        if old is None:
                            raise KeyError(retire)
                        if not old.active:
                            raise KeyNotActive(f"selector {retire} is not active")
                    stored = _Stored(algorithm, public, self._box.seal(private), bits, now, True)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hset(key, name, stored.to_json())
                    for other in active:  # retire=None never gets here with one
                        records[other].active, records[other].retired_at = False, now
                        pipe.hset(key, other, records[other].to_json())
                    pipe.incr(keys.DKIM_VERSION)
                    await pipe.execute()
                    return stored.public(domain, name)
                except WatchError:
                    continue

    async def delete(self, domain: str, selector: str) -> bool:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(keys.dkim_keys(domain), selector)
            pipe.incr(keys.DKIM_VERSION)
            removed, _ = await pipe.execute()
        return bool(removed)

    async def signing_keys(self, domain: str) -> list[SigningKey]:
        """The domain's active keys, private halves opened (the relay's path only)."""
        out = []
        for selector, record in sorted((await self._records(domain)).items()):
            if record.active:
                out.append(SigningKey(domain, selector, record.algorithm, self._box.open(record.private_sealed)))
        return out


def _free_selector(base: str, taken: dict[str, _Stored]) -> str:
    if base not in taken:
        return base
    n = 2
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"


def headers_to_sign(message: bytes) -> list[bytes]:
    """The ``h=`` list for this message: every present occurrence of :data:`SIGNED_HEADERS`
    (bottom-up selection is dkimpy's, RFC 6376 5.4.2), plus one more ``from``."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        end = message.find(b"\n\n")
    head = message if end < 0 else message[:end]
    present = [m.group(1).lower() for m in _HEADER_NAME.finditer(head)]
    wanted = {h.encode() for h in SIGNED_HEADERS}
    chosen = [name for name in present if name in wanted]
    if b"from" not in chosen:
        return []
    return [*chosen, b"from"]


# dkimpy computes RSA signatures in Python (about 5 ms of CPU for a 2048-bit key, holding the
# GIL); OpenSSL does the same PKCS#1 v1.5 signature in about 0.2 ms. dkimpy's signer looks the
# function up in its module at each call: it is given this one, which signs the same digest
# with the same key (RFC 8017 8.2.1), so the DKIM-Signature is bit for bit what dkimpy makes.
_OPENSSL_KEYS: dict[int, rsa.RSAPrivateKey] = {}
_DIGESTS: dict[str, type[hashes.HashAlgorithm]] = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}


def _openssl_rsa_sign(digest: Any, key: dict[str, int]) -> bytes:
    """dkimpy's ``RSASSA_PKCS1_v1_5_sign(hash, private_key)`` by OpenSSL."""
    private = _OPENSSL_KEYS.get(key["modulus"])
    if private is None:
        private = rsa.RSAPrivateNumbers(
            p=key["prime1"], q=key["prime2"], d=key["privateExponent"], dmp1=key["exponent1"],
            dmq1=key["exponent2"], iqmp=key["coefficient"],
            public_numbers=rsa.RSAPublicNumbers(key["publicExponent"], key["modulus"])).private_key()
        if len(_OPENSSL_KEYS) >= 1024:
            _OPENSSL_KEYS.clear()
        _OPENSSL_KEYS[key["modulus"]] = private
    algorithm = _DIGESTS[str(digest.name).lower()]()
    return private.sign(digest.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm))


dkimpy.RSASSA_PKCS1_v1_5_sign = _openssl_rsa_sign


def sign(message: bytes, signing_keys: Sequence[SigningKey]) -> bytes:
    """``message`` with one ``DKIM-Signature`` field per key in front (relaxed/relaxed). A
    message without a From field is returned as it is (RFC 6376 5.4: From must be signed).
    CPU-bound (RSA, hashing the body): callers in an event loop run it in a thread."""
    include = headers_to_sign(message)
    if not include or not signing_keys:
        return message
    fields = []
    for key in signing_keys:
        signer = dkimpy.DKIM(message, signature_algorithm=key.algorithm.encode(), linesep=b"\r\n")
        fields.append(cast(bytes, signer.sign(key.selector.encode(), key.domain.encode(), key.private_key,
                                              canonicalize=CANONICALIZATION, include_headers=include)))
    return b"".join(fields) + message


def valid_selector(selector: str) -> bool:
    return bool(SELECTOR.match(selector))
