"""Fail-closed clients of the policy and auth services (DESIGN.md "Contracts").

A failed, refused or late call never lets mail through: the policy client turns it into a
TEMPFAIL verdict (``451 4.3.0``), the auth client into ``AUTH_STATUS_TEMPFAIL``.
"""

from __future__ import annotations

import logging

import grpc
from prometheus_client import Counter

from rempart.common.grpcutil import client_channel
from rempart.common.pb.auth.v1 import auth_pb2, auth_pb2_grpc
from rempart.common.pb.policy.v1 import policy_pb2, policy_pb2_grpc

log = logging.getLogger(__name__)

PEER_FAILURES = Counter(
    "rempart_grpc_client_failures_total", "gRPC calls that failed and were answered fail-closed", ["peer"]
)

TEMPFAIL_TEXT = "Temporary local problem - please try later"


def tempfail_verdict(reason: str) -> policy_pb2.Verdict:
    return policy_pb2.Verdict(
        action=policy_pb2.ACTION_TEMPFAIL, code=451, enhanced_code="4.3.0", text=TEMPFAIL_TEXT, rule=reason
    )


class PolicyClient:
    def __init__(self, target: str, timeout: float = 3.0) -> None:
        self.channel = client_channel(target)
        self._stub = policy_pb2_grpc.PolicyServiceStub(self.channel)
        self._timeout = timeout

    async def check(self, request: policy_pb2.CheckRequest) -> policy_pb2.Verdict:
        try:
            verdict: policy_pb2.Verdict = await self._stub.Check(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            PEER_FAILURES.labels("policy").inc()
            log.warning("policy call failed, failing closed: %s", exc.code().name,
                        extra={"session": request.session.session_id})
            return tempfail_verdict("policy-unavailable")
        if verdict.action == policy_pb2.ACTION_UNSPECIFIED:
            return tempfail_verdict("policy-empty-verdict")
        return verdict

    async def close(self) -> None:
        await self.channel.close()


class AuthClient:
    def __init__(self, target: str, timeout: float = 5.0) -> None:
        self.channel = client_channel(target)
        self._stub = auth_pb2_grpc.AuthServiceStub(self.channel)
        self._timeout = timeout

    async def authenticate(self, request: auth_pb2.AuthenticateRequest) -> auth_pb2.AuthenticateResponse:
        try:
            reply: auth_pb2.AuthenticateResponse = await self._stub.Authenticate(request, timeout=self._timeout)
            return reply
        except grpc.aio.AioRpcError as exc:
            PEER_FAILURES.labels("auth").inc()
            log.warning("auth call failed, failing closed: %s", exc.code().name,
                        extra={"session": request.session_id})
            return auth_pb2.AuthenticateResponse(status=auth_pb2.AUTH_STATUS_TEMPFAIL)

    async def set_password(
        self, account: str, password: str, skip_policy: bool = False
    ) -> auth_pb2.SetPasswordResponse:
        reply: auth_pb2.SetPasswordResponse = await self._stub.SetPassword(
            auth_pb2.SetPasswordRequest(account=account, password=password, skip_policy=skip_policy),
            timeout=self._timeout,
        )
        return reply

    async def close(self) -> None:
        await self.channel.close()
