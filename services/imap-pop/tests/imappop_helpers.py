"""Clients bound to a chosen source address (127.0.0.x on loopback), and shared names."""

from __future__ import annotations

import imaplib
import poplib
import socket
from typing import Any

from rempart.common.pb.auth.v1 import auth_pb2, auth_pb2_grpc
from rempart.common.pb.policy.v1 import policy_pb2, policy_pb2_grpc

BOB = "bob@example.org"
BOB_PASSWORD = "correct horse 9!"
BLOCKED_IP = "127.0.0.9"
UNTRUSTED_IP = "127.0.0.2"
BLOCKED_TEXT = f"Intrusion prevention active for [{BLOCKED_IP}]"


class SourceIMAP(imaplib.IMAP4):
    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self._source = source
        super().__init__("127.0.0.1", port, timeout=10)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))


class SourcePOP3(poplib.POP3):
    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self._source = source
        super().__init__("127.0.0.1", port, timeout=10)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))


class Raw:
    """A line-oriented raw client for what imaplib will not send."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def until(self, prefix: bytes) -> list[bytes]:
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line.startswith(prefix):
                return lines

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            return True


def raw_connect(port: int, source: str = "127.0.0.1") -> Raw:
    return Raw(socket.create_connection(("127.0.0.1", port), 10, source_address=(source, 0)))


def simple_message(subject: str = "Hello", body: str = "Hi Bob,\r\nhow are you?\r\n") -> bytes:
    return (
        f"From: Alice <alice@example.net>\r\nTo: Bob <{BOB}>\r\nSubject: {subject}\r\n"
        f"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{subject.replace(' ', '.')}@example.net>\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}"
    ).encode()


def error_text(exc: Exception) -> str:
    """imaplib puts the server's bytes into its exception: show them as the server sent them."""
    text = str(exc)
    if text.startswith(("b'", 'b"')):
        import ast

        value = ast.literal_eval(text)
        return value.decode() if isinstance(value, bytes) else str(value)
    return text


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.requests: list[auth_pb2.AuthenticateRequest] = []

    async def Authenticate(self, request: auth_pb2.AuthenticateRequest, context: Any) -> auth_pb2.AuthenticateResponse:
        self.requests.append(request)
        if request.login == BOB and request.password == BOB_PASSWORD:
            return auth_pb2.AuthenticateResponse(status=auth_pb2.AUTH_STATUS_OK, account=BOB, role="user")
        if request.login == "locked@example.org":
            return auth_pb2.AuthenticateResponse(status=auth_pb2.AUTH_STATUS_LOCKED)
        return auth_pb2.AuthenticateResponse(status=auth_pb2.AUTH_STATUS_INVALID)


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.requests: list[policy_pb2.CheckRequest] = []

    async def Check(self, request: policy_pb2.CheckRequest, context: Any) -> policy_pb2.Verdict:
        self.requests.append(request)
        if request.stage == policy_pb2.STAGE_CONNECT and request.session.client_ip == BLOCKED_IP:
            return policy_pb2.Verdict(action=policy_pb2.ACTION_CLOSE, code=421, enhanced_code="4.0.0",
                                      text=f"421 4.0.0 {BLOCKED_TEXT}", rule="R-IPS-4")
        return policy_pb2.Verdict(action=policy_pb2.ACTION_ACCEPT, code=250)
