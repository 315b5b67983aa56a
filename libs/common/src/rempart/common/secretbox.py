"""Encryption of secrets at rest (TOTP seeds, uploaded TLS keys) with REMPART_SECRET_KEY."""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken


class SecretBox:
    def __init__(self, key: str) -> None:
        # Any string works as the configured key; derive the 32-byte Fernet key from it.
        digest = hashlib.sha256(b"rempart-secretbox\x00" + key.encode()).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(digest))

    def seal(self, plaintext: bytes) -> str:
        return self._fernet.encrypt(plaintext).decode()

    def open(self, token: str) -> bytes:
        try:
            return self._fernet.decrypt(token.encode())
        except InvalidToken as exc:
            raise ValueError("secret cannot be decrypted with this key") from exc
