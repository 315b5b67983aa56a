"""Clients bound to a chosen source address (127.0.0.x on loopback), and shared names."""

from __future__ import annotations

import asyncio
import imaplib
import os
import poplib
import socket
from typing import Any

from scramp import ScramException, ScramMechanism

from rempart.common.pb.auth.v1 import auth_pb2, auth_pb2_grpc
from rempart.common.pb.policy.v1 import policy_pb2, policy_pb2_grpc

BOB = "bob@example.org"
BOB_PASSWORD = "correct horse 9!"
CAROL = "carol@example.org"  # a second mailbox, same password
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
    """The auth contract, small: BOB's password, a locked account, and SCRAM-SHA-256 on
    scramp's server side (conversations kept here, by id)."""

    def __init__(self) -> None:
        self.requests: list[auth_pb2.AuthenticateRequest] = []
        self.scram_requests: list[auth_pb2.ScramStartRequest] = []
        self._scram = ScramMechanism("SCRAM-SHA-256")
        self._bob_keys = self._scram.make_auth_info(BOB_PASSWORD, iteration_count=4096)
        self._conversations: dict[str, Any] = {}

    def _keys(self, username: str) -> tuple[bytes, bytes, bytes, int]:
        if username == BOB:
            return self._bob_keys  # type: ignore[no-any-return]
        # R-LOG-4: anybody else gets a well-formed exchange whose proof can never match.
        return self._scram.make_auth_info(os.urandom(16).hex(), iteration_count=4096)  # type: ignore[no-any-return]

    async def ScramStart(self, request: auth_pb2.ScramStartRequest, context: Any) -> auth_pb2.ScramStartResponse:
        self.scram_requests.append(request)
        server = self._scram.make_server(self._keys)
        try:
            server.set_client_first(request.client_first)
        except ScramException:
            return auth_pb2.ScramStartResponse(status=auth_pb2.AUTH_STATUS_INVALID)
        conversation = os.urandom(8).hex()
        self._conversations[conversation] = server
        return auth_pb2.ScramStartResponse(status=auth_pb2.AUTH_STATUS_OK, conversation_id=conversation,
                                           server_first=server.get_server_first())

    async def ScramFinish(self, request: auth_pb2.ScramFinishRequest, context: Any) -> auth_pb2.ScramFinishResponse:
        server = self._conversations.pop(request.conversation_id, None)
        if server is None:
            return auth_pb2.ScramFinishResponse(status=auth_pb2.AUTH_STATUS_INVALID, server_final="e=other-error")
        try:
            server.set_client_final(request.client_final)
        except ScramException:
            return auth_pb2.ScramFinishResponse(status=auth_pb2.AUTH_STATUS_INVALID, server_final="e=invalid-proof")
        return auth_pb2.ScramFinishResponse(status=auth_pb2.AUTH_STATUS_OK, server_final=server.get_server_final(),
                                            account=BOB, role="user")

    async def Authenticate(self, request: auth_pb2.AuthenticateRequest, context: Any) -> auth_pb2.AuthenticateResponse:
        self.requests.append(request)
        if request.login == BOB and request.password == BOB_PASSWORD:
            return auth_pb2.AuthenticateResponse(status=auth_pb2.AUTH_STATUS_OK, account=BOB, role="user")
        if request.login == CAROL and request.password == BOB_PASSWORD:
            return auth_pb2.AuthenticateResponse(status=auth_pb2.AUTH_STATUS_OK, account=CAROL, role="user")
        if request.login == "locked@example.org":
            return auth_pb2.AuthenticateResponse(status=auth_pb2.AUTH_STATUS_LOCKED)
        return auth_pb2.AuthenticateResponse(status=auth_pb2.AUTH_STATUS_INVALID)


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.requests: list[policy_pb2.CheckRequest] = []
        self.auth_verdicts: dict[str, policy_pb2.Verdict] = {}  # client IP -> verdict after a login
        self.disconnect_delay = 0.0

    def stages(self, stage: policy_pb2.Stage.ValueType) -> list[policy_pb2.CheckRequest]:
        return [r for r in self.requests if r.stage == stage]

    async def Check(self, request: policy_pb2.CheckRequest, context: Any) -> policy_pb2.Verdict:
        if request.stage == policy_pb2.STAGE_DISCONNECT and self.disconnect_delay:
            await asyncio.sleep(self.disconnect_delay)
        self.requests.append(request)
        if request.stage == policy_pb2.STAGE_AUTH and request.session.client_ip in self.auth_verdicts:
            return self.auth_verdicts[request.session.client_ip]
        if request.stage == policy_pb2.STAGE_CONNECT and request.session.client_ip == BLOCKED_IP:
            return policy_pb2.Verdict(action=policy_pb2.ACTION_CLOSE, code=421, enhanced_code="4.0.0",
                                      text=f"421 4.0.0 {BLOCKED_TEXT}", rule="R-IPS-4")
        return policy_pb2.Verdict(action=policy_pb2.ACTION_ACCEPT, code=250)
