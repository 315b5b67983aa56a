"""SCRAM-SHA-256 (RFC 5802, RFC 7677), split for a stateless service.

ScramStart and ScramFinish may land on different replicas, so the server side is rebuilt at
finish time from what ScramStart kept in Redis: the client-first message, the server nonce and
the account's keys. The messages and the proof check are the edge kit's (rempart.common.sasl),
deterministic given those, so the rebuilt conversation produces the same server-first message
and checks the proof exactly as one object would; an authzid is checked by the service
(the one rule of rempart.common.sasl). The keys are derived with ``scramp`` (its SASLprep).

The stored keys use the RFC 5803 text form ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>``:
the password itself is never stored, and the keys do not let anyone log in over any other
mechanism.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass

from scramp import ScramException, ScramMechanism

from rempart.common.sasl import (
    SaslMalformed,
    parse_client_final,
    parse_client_first,
    scram_server_final,
    scram_server_first,
)

MECHANISM = "SCRAM-SHA-256"
MIN_ITERATIONS = 4096  # RFC 7677 section 4: at least 4096
INVALID_PROOF = "e=invalid-proof"
_mechanism = ScramMechanism(MECHANISM)


class ScramMessageError(ValueError):
    """The client's message is not a SCRAM message we accept."""


@dataclass(frozen=True)
class ScramKeys:
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    def encode(self) -> str:
        b64 = base64.b64encode
        return (f"{MECHANISM}${self.iterations}:{b64(self.salt).decode()}"
                f"${b64(self.stored_key).decode()}:{b64(self.server_key).decode()}")

    @classmethod
    def decode(cls, text: str) -> ScramKeys | None:
        try:
            mech, params, key_part = text.split("$")
            iterations, salt = params.split(":")
            stored, server = key_part.split(":")
            if mech != MECHANISM:
                return None
            return cls(base64.b64decode(salt, validate=True), int(iterations),
                       base64.b64decode(stored, validate=True), base64.b64decode(server, validate=True))
        except (ValueError, binascii.Error):
            return None


def derive_scram_keys(password: str, iterations: int, salt: bytes | None = None) -> ScramKeys | None:
    """The keys of ``password``; None when SASLprep (RFC 4013) forbids a character in it, in
    which case no SCRAM client could produce a proof for it either."""
    try:
        salt_out, stored, server, count = _mechanism.make_auth_info(
            password, iteration_count=max(iterations, MIN_ITERATIONS), salt=salt
        )
    except ScramException:
        return None
    return ScramKeys(salt_out, count, stored, server)


def decoy_keys(secret: bytes, subject: str, iterations: int) -> ScramKeys:
    """Keys for a name without usable keys (unknown, locked, no SCRAM keys yet): the salt is a
    keyed function of the name, so that asking twice gives the same salt, as for a real account
    (R-LOG-4: the server-first must not tell whether the account exists). No proof matches."""
    # 32 bytes: the length scramp gives a real account's salt.
    salt = hmac.new(secret, b"rempart-scram-salt\0" + subject.encode(), hashlib.sha256).digest()
    unusable = hmac.new(secret, b"rempart-scram-decoy\0" + subject.encode(), hashlib.sha256).digest()
    return ScramKeys(salt, max(iterations, MIN_ITERATIONS), unusable, unusable)


def server_first(client_first: str, keys: ScramKeys, s_nonce: str) -> str:
    try:
        first = parse_client_first(client_first)
    except SaslMalformed as exc:
        raise ScramMessageError("client-first refused") from exc
    return scram_server_first(first, s_nonce, keys.salt, keys.iterations)


def finish(client_first: str, keys: ScramKeys, s_nonce: str, client_final: str) -> str | None:
    """The server-final message ("v=...") when the proof is right, None otherwise."""
    try:
        first = parse_client_first(client_first)
        final = parse_client_final(client_final)
    except SaslMalformed:
        return None
    return scram_server_final(first, server_first(client_first, keys, s_nonce), final, keys.stored_key,
                              keys.server_key)
