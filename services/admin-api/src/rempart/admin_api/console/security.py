"""What keeps the console's pages safe in a browser: cookies, CSRF tokens, response headers.

- The session cookie holds the same opaque token as an API bearer session (one session store,
  one lockout, one audit). It is ``HttpOnly``, ``SameSite=Strict`` and ``Secure``; with Secure on
  its name carries the ``__Host-`` prefix, so that a sibling subdomain cannot plant or shadow it.
- Every form carries a CSRF token. Signed in, it is an HMAC of the session token's digest (no
  server state; a new login gives a new token). Before login, the login forms are bound to a
  random nonce cookie the same way, which stops login CSRF (being signed into an attacker's
  account). SameSite=Strict is the second line, not the only one.
- Between the password and the TOTP code, the typed credentials wait in a short-lived cookie,
  sealed (authenticated encryption) with ``REMPART_SECRET_KEY``, because the auth service checks
  the password and the code in one call; nothing about a half-done login is kept server-side.
- Every response gets a strict Content-Security-Policy (scripts and styles only from the
  console's own files, nothing inline), ``frame-ancestors 'none'`` and ``X-Frame-Options: DENY``
  against clickjacking, ``nosniff`` and no referrer.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time

from fastapi import Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rempart.admin_api.sessions import MAX_TOKEN_CHARS, token_digest
from rempart.common.secretbox import SecretBox

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
)
HSTS = (b"strict-transport-security", b"max-age=31536000")
PENDING_LOGIN_SECONDS = 300
NONCE_BYTES = 24


class SecurityHeaders:
    """ASGI middleware: the headers above on every response (API answers included), unless the
    route set its own."""

    def __init__(self, app: ASGIApp, hsts: bool) -> None:
        self.app = app
        self.hsts = hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # HSTS only means something over https (RFC 6797 section 7.2: ignored over http).
        headers = (*SECURITY_HEADERS, HSTS) if self.hsts and scope.get("scheme") == "https" else SECURITY_HEADERS

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(name, value) for name, value in headers if name not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


class ConsoleSecurity:
    """Cookie names and flags, CSRF tokens and the sealed pending login, from one secret key."""

    def __init__(self, secret_key: str, secure: bool) -> None:
        self.secure = secure
        prefix = "__Host-" if secure else ""
        self.session_cookie = f"{prefix}rempart-session"
        self.login_cookie = f"{prefix}rempart-login"
        self.pending_cookie = f"{prefix}rempart-pending"
        self._csrf_key = hashlib.sha256(b"rempart-console-csrf\0" + secret_key.encode()).digest()
        self._box = SecretBox("rempart-console-pending\0" + secret_key)

    # Cookies ------------------------------------------------------------------------------------
    def set_cookie(self, response: Response, name: str, value: str, max_age: int | None = None) -> None:
        response.set_cookie(name, value, max_age=max_age, path="/", secure=self.secure, httponly=True,
                            samesite="strict")

    def clear_cookie(self, response: Response, name: str) -> None:
        response.delete_cookie(name, path="/", secure=self.secure, httponly=True, samesite="strict")

    def session_token(self, request: Request) -> str:
        token = request.cookies.get(self.session_cookie, "")
        return token if len(token) <= MAX_TOKEN_CHARS else ""

    def login_nonce(self, request: Request) -> str:
        nonce = request.cookies.get(self.login_cookie, "")
        return nonce if 16 <= len(nonce) <= 64 else ""

    @staticmethod
    def new_nonce() -> str:
        return secrets.token_urlsafe(NONCE_BYTES)

    # CSRF ---------------------------------------------------------------------------------------
    def _mac(self, purpose: str, value: str) -> str:
        return hmac.new(self._csrf_key, f"{purpose}\0{value}".encode(), hashlib.sha256).hexdigest()

    def session_csrf(self, session_token: str) -> str:
        return self._mac("session", token_digest(session_token))

    def login_csrf(self, nonce: str) -> str:
        return self._mac("login", nonce)

    @staticmethod
    def same(expected: str, given: str) -> bool:
        return bool(expected) and hmac.compare_digest(expected.encode(), given.encode())

    # The login between password and code --------------------------------------------------------
    def seal_pending(self, login: str, password: str) -> str:
        payload = {"login": login, "password": password, "until": time.time() + PENDING_LOGIN_SECONDS}
        return self._box.seal(json.dumps(payload).encode())

    def open_pending(self, sealed: str) -> tuple[str, str] | None:
        if not sealed or len(sealed) > 8192:
            return None
        try:
            payload = json.loads(self._box.open(sealed))
        except ValueError:
            return None
        if not isinstance(payload, dict) or float(payload.get("until", 0)) < time.time():
            return None
        login, password = payload.get("login"), payload.get("password")
        if not isinstance(login, str) or not isinstance(password, str):
            return None
        return login, password
