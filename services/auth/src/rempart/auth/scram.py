"""SCRAM-SHA-256 (RFC 5802, RFC 7677) on top of ``scramp``, split for a stateless service.

ScramStart and ScramFinish may land on different replicas, so the server side is rebuilt at
finish time from what ScramStart kept in Redis: the client-first message, the server nonce and
the account's keys. scramp's server is deterministic given those, so the rebuilt conversation
produces the same server-first message and checks the proof exactly as one object would.

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

MECHANISM = "SCRAM-SHA-256"
MIN_ITERATIONS = 4096  # RFC 7677 section 4: at least 4096
MAX_MESSAGE = 1024  # a client-first or client-final message; real ones are ~100 bytes
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

    def as_auth_info(self) -> tuple[bytes, bytes, bytes, int]:
        return self.salt, self.stored_key, self.server_key, self.iterations


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


@dataclass(frozen=True)
class ClientFirst:
    username: str  # unescaped (RFC 5802 section 5.1: "=2C" is ",", "=3D" is "=")
    authzid: str


def parse_client_first(message: str) -> ClientFirst:
    """The names in a client-first message; scramp checks the rest when the server runs."""
    if not message or len(message) > MAX_MESSAGE:
        raise ScramMessageError("bad length")
    parts = message.split(",", 3)
    if len(parts) < 4 or parts[0] not in ("n", "y") or not parts[2].startswith("n="):
        # "p" (channel binding) is refused: SCRAM-SHA-256-PLUS is not offered.
        raise ScramMessageError("malformed client-first")
    authzid = parts[1][2:] if parts[1].startswith("a=") else ""
    if parts[1] and not parts[1].startswith("a="):
        raise ScramMessageError("malformed authzid")
    return ClientFirst(_unescape(parts[2][2:]), _unescape(authzid))


def _unescape(name: str) -> str:
    if "=" in name.replace("=2C", "").replace("=3D", ""):
        raise ScramMessageError("bad escape in name")
    return name.replace("=2C", ",").replace("=3D", "=")


def server_first(client_first: str, keys: ScramKeys, s_nonce: str) -> str:
    server = _mechanism.make_server(lambda _user: keys.as_auth_info(), s_nonce=s_nonce)
    try:
        server.set_client_first(client_first)
        return str(server.get_server_first())
    except ScramException as exc:
        raise ScramMessageError("client-first refused") from exc


def finish(client_first: str, keys: ScramKeys, s_nonce: str, client_final: str) -> str | None:
    """The server-final message ("v=...") when the proof is right, None otherwise."""
    if not client_final or len(client_final) > MAX_MESSAGE:
        return None
    server = _mechanism.make_server(lambda _user: keys.as_auth_info(), s_nonce=s_nonce)
    try:
        server.set_client_first(client_first)
        server.get_server_first()
        server.set_client_final(client_final)
        return str(server.get_server_final())
    except ScramException:
        return None
