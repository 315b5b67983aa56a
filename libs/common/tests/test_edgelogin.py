"""The edge kit's reading of a login (rempart.common.edgelogin): the auth service's answer plus
policy's verdict after it, through real gRPC servers speaking the contracts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from rempart.common.clients import AuthClient, PolicyClient
from rempart.common.config import LoginSettings
from rempart.common.edgelogin import LoginAttempt, LoginOutcome
from rempart.common.pb.auth.v1 import auth_pb2, auth_pb2_grpc
from rempart.common.pb.policy.v1 import policy_pb2, policy_pb2_grpc
from rempart.common.sasl import PLAIN, Credentials, plain_message

A = policy_pb2
BLOCK_TEXT = "Intrusion prevention active for [192.0.2.7]"


@dataclass
class Peers(auth_pb2_grpc.AuthServiceServicer, policy_pb2_grpc.PolicyServiceServicer):  # type: ignore[misc]
    """The auth service answers ``status``; policy answers ``action`` at STAGE_AUTH."""

    status: int = auth_pb2.AUTH_STATUS_OK
    action: int = A.ACTION_ACCEPT
    logins: list[auth_pb2.AuthenticateRequest] = field(default_factory=list)
    checks: list[policy_pb2.CheckRequest] = field(default_factory=list)

    async def Authenticate(self, request: auth_pb2.AuthenticateRequest, context: Any) -> auth_pb2.AuthenticateResponse:
        self.logins.append(request)
        account = "bob@example.org" if self.status == auth_pb2.AUTH_STATUS_OK else ""
        return auth_pb2.AuthenticateResponse(status=self.status, account=account)

    async def Check(self, request: policy_pb2.CheckRequest, context: Any) -> policy_pb2.Verdict:
        self.checks.append(request)
        if self.action == A.ACTION_CLOSE:
            return policy_pb2.Verdict(action=A.ACTION_CLOSE, code=421, enhanced_code="4.0.0", text=BLOCK_TEXT,
                                      rule="R-IPS-4", ip_blocked=True)
        return policy_pb2.Verdict(action=self.action, code=250)


@pytest.fixture
async def peers() -> AsyncIterator[tuple[Peers, LoginAttempt]]:
    servicer = Peers()
    server = grpc.aio.server()
    auth_pb2_grpc.add_AuthServiceServicer_to_server(servicer, server)
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    auth, policy = AuthClient(f"127.0.0.1:{port}", 2.0), PolicyClient(f"127.0.0.1:{port}", 2.0)
    facts = policy_pb2.SessionFacts(session_id="s1", client_ip="192.0.2.7", protocol=A.PROTOCOL_IMAP, tls=True)
    try:
        yield servicer, LoginAttempt(auth, policy, LoginSettings(failure_delay_ms=0), facts, "imap")
    finally:
        await auth.close()
        await policy.close()
        await server.stop(None)


S = auth_pb2
TABLE = [
    # auth service, policy after it -> the login, the session closed
    (S.AUTH_STATUS_OK, A.ACTION_ACCEPT, LoginOutcome.OK, False),
    (S.AUTH_STATUS_OK, A.ACTION_DISCARD, LoginOutcome.OK, False),
    (S.AUTH_STATUS_OK, A.ACTION_TEMPFAIL, LoginOutcome.TEMPFAIL, False),
    (S.AUTH_STATUS_OK, A.ACTION_REJECT, LoginOutcome.FAILED, False),
    (S.AUTH_STATUS_OK, A.ACTION_CLOSE, LoginOutcome.FAILED, True),
    (S.AUTH_STATUS_INVALID, A.ACTION_ACCEPT, LoginOutcome.FAILED, False),
    (S.AUTH_STATUS_INVALID, A.ACTION_TEMPFAIL, LoginOutcome.FAILED, False),
    (S.AUTH_STATUS_INVALID, A.ACTION_CLOSE, LoginOutcome.FAILED, True),
    (S.AUTH_STATUS_LOCKED, A.ACTION_ACCEPT, LoginOutcome.FAILED, False),
    (S.AUTH_STATUS_IP_RESTRICTED, A.ACTION_ACCEPT, LoginOutcome.FAILED, False),
    (S.AUTH_STATUS_SECOND_FACTOR_REQUIRED, A.ACTION_ACCEPT, LoginOutcome.FAILED, False),
    (S.AUTH_STATUS_TEMPFAIL, A.ACTION_ACCEPT, LoginOutcome.TEMPFAIL, False),
    (S.AUTH_STATUS_UNSPECIFIED, A.ACTION_ACCEPT, LoginOutcome.TEMPFAIL, False),
]


@pytest.mark.parametrize(("status", "action", "outcome", "close"), TABLE)
async def test_r_log_4_login_reading_table(peers: tuple[Peers, LoginAttempt], status: int, action: int,
                                           outcome: LoginOutcome, close: bool) -> None:
    servicer, attempt = peers
    servicer.status, servicer.action = status, action
    decision = await attempt.password(Credentials("bob@example.org", "pw"), PLAIN)
    assert (decision.outcome, decision.close) == (outcome, close)
    assert decision.account == ("bob@example.org" if outcome is LoginOutcome.OK else "")
    if status in (S.AUTH_STATUS_TEMPFAIL, S.AUTH_STATUS_UNSPECIFIED):
        assert servicer.checks == []  # nothing to count: the auth service did not judge the password
        return
    [check] = servicer.checks
    assert (check.stage, check.auth_login, check.auth_success) == (A.STAGE_AUTH, "bob@example.org", status == S.AUTH_STATUS_OK)
    assert check.session.authenticated_account == ("bob@example.org" if status == S.AUTH_STATUS_OK else "")
    assert check.auth_failure == ("" if status == S.AUTH_STATUS_OK else auth_pb2.AuthStatus.Name(status))
    if close:
        assert decision.verdict is not None and decision.verdict.text == BLOCK_TEXT


async def test_r_log_4_other_authzid_refused_as_a_wrong_password(peers: tuple[Peers, LoginAttempt]) -> None:
    servicer, attempt = peers
    decision = await attempt.password(Credentials("bob@example.org", "pw", authzid="alice@example.org"), PLAIN)
    assert (decision.outcome, decision.close) == (LoginOutcome.FAILED, False)
    assert servicer.logins == []  # the password is not even tried
    [check] = servicer.checks
    assert (check.auth_success, check.auth_failure) == (False, "AUTH_STATUS_INVALID")  # counted (R-IPS-2)


async def test_r_log_2_own_authzid_logs_in(peers: tuple[Peers, LoginAttempt]) -> None:
    servicer, attempt = peers

    async def challenge(data: bytes) -> bytes:
        return plain_message(Credentials("bob@example.org", "pw", authzid="BOB@example.org"))

    decision = await attempt.sasl(PLAIN, None, challenge)
    assert decision.outcome is LoginOutcome.OK
    assert [(r.login, r.mechanism, r.protocol, r.client_ip) for r in servicer.logins] == [
        ("bob@example.org", "PLAIN", "imap", "192.0.2.7")]
