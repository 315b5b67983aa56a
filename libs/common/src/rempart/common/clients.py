"""Fail-closed clients of the policy and auth services (DESIGN.md "Contracts").

A failed, refused or late call never lets mail through: the policy client turns it into a
TEMPFAIL verdict (``451 4.3.0``), the auth client into ``AUTH_STATUS_TEMPFAIL``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

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
STREAM_RETRY_SECONDS = 60.0


def tempfail_verdict(reason: str) -> policy_pb2.Verdict:
    return policy_pb2.Verdict(
        action=policy_pb2.ACTION_TEMPFAIL, code=451, enhanced_code="4.3.0", text=TEMPFAIL_TEXT, rule=reason
    )


def policy_failed(request: policy_pb2.CheckRequest, how: str, why: str) -> policy_pb2.Verdict:
    """A policy call or stream that failed: counted, logged, answered TEMPFAIL (fail closed)."""
    PEER_FAILURES.labels("policy").inc()
    log.warning("policy %s failed, failing closed: %s", how, why, extra={"session": request.session.session_id})
    return tempfail_verdict("policy-unavailable")


class PolicyChecker(Protocol):
    """What asks policy for one stage: the client (a unary call) or a session's stream."""

    async def check(self, request: policy_pb2.CheckRequest) -> policy_pb2.Verdict: ...


class PolicyClient:
    def __init__(self, target: str, timeout: float = 3.0) -> None:
        self.channel = client_channel(target)
        self._stub = policy_pb2_grpc.PolicyServiceStub(self.channel)
        self._timeout = timeout
        # Until then sessions use unary calls: the policy service answered Session with
        # UNIMPLEMENTED (an older release, during a rolling update).
        self.streams_unsupported_until = 0.0

    async def check(self, request: policy_pb2.CheckRequest) -> policy_pb2.Verdict:
        try:
            verdict: policy_pb2.Verdict = await self._stub.Check(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            return policy_failed(request, "call", exc.code().name)
        if verdict.action == policy_pb2.ACTION_UNSPECIFIED:
            return tempfail_verdict("policy-empty-verdict")
        return verdict

    def session(self) -> PolicySession:
        """A conversation for one SMTP session (opened at its first check)."""
        return PolicySession(self._stub, self._timeout, self)

    async def close(self) -> None:
        await self.channel.close()


class StreamEnded(EOFError):
    """The policy service ended the session's stream, with OK, before reading the request just
    written: a draining replica ends its streams between two stages (policy servicer's
    end_sessions), so the request was never decided and may be asked again on a new stream."""


class PolicySession:
    """One bidirectional stream per SMTP session: a stage's request, then its verdict, in order.

    Fail closed as the unary client: a stream that breaks, or a verdict that comes late,
    answers the stage in flight with TEMPFAIL, and the stream is dropped (a late verdict must
    never be read as the next stage's); the next stage opens a new stream, possibly to another
    policy replica. Stages of one session never overlap; the lock makes sure of it.
    """

    def __init__(self, stub: policy_pb2_grpc.PolicyServiceStub, timeout: float, unary: PolicyClient) -> None:
        self._stub = stub
        self._timeout = timeout
        self._unary = unary
        self._call: grpc.aio.StreamStreamCall[policy_pb2.CheckRequest, policy_pb2.Verdict] | None = None
        self._lock = asyncio.Lock()

    async def check(self, request: policy_pb2.CheckRequest) -> policy_pb2.Verdict:
        if time.monotonic() < self._unary.streams_unsupported_until:
            return await self._unary.check(request)
        async with self._lock:
            try:
                # asyncio.timeout, not wait_for: no task per stage (issue 11's profile).
                async with asyncio.timeout(self._timeout):
                    try:
                        verdict = await self._exchange(request)
                    except (StreamEnded, asyncio.InvalidStateError):
                        # Ended by a draining replica between two stages (or just before this
                        # write): nothing was decided; once more, on a new stream.
                        self._drop()
                        verdict = await self._exchange(request)
            except grpc.aio.AioRpcError as exc:
                self._drop()
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    # A policy service older than this edge (a rolling update, R-OPS-7): nothing
                    # was decided, so the stage is asked again the unary way, and so is the rest.
                    self._unary.streams_unsupported_until = time.monotonic() + STREAM_RETRY_SECONDS
                    return await self._unary.check(request)
                return policy_failed(request, "stream", exc.code().name)
            except (grpc.aio.UsageError, TimeoutError, StopAsyncIteration, EOFError, asyncio.InvalidStateError) as exc:
                self._drop()
                return policy_failed(request, "stream", type(exc).__name__)
        if verdict.action == policy_pb2.ACTION_UNSPECIFIED:
            return tempfail_verdict("policy-empty-verdict")
        return verdict

    async def _exchange(self, request: policy_pb2.CheckRequest) -> policy_pb2.Verdict:
        if self._call is None or self._call.done():
            self._call = self._stub.Session()
        await self._call.write(request)
        verdict = await self._call.read()
        if verdict is grpc.aio.EOF:
            raise StreamEnded("policy ended the stream")
        assert isinstance(verdict, policy_pb2.Verdict)
        return verdict

    def _drop(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def close(self) -> None:
        """End the conversation (after DISCONNECT's verdict): the server's loop ends cleanly."""
        async with self._lock:
            call, self._call = self._call, None
            if call is not None and not call.done():
                try:
                    await asyncio.wait_for(call.done_writing(), self._timeout)
                except (grpc.aio.AioRpcError, grpc.aio.UsageError, TimeoutError):
                    call.cancel()


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

    async def scram_start(self, request: auth_pb2.ScramStartRequest) -> auth_pb2.ScramStartResponse:
        """SCRAM-SHA-256, first round (RFC 5802 section 5, RFC 7677). Fail closed: TEMPFAIL.

        An unknown, locked or restricted user still gets ``OK`` and a well-formed server-first
        (R-LOG-4); the refusal comes with :meth:`scram_finish`. The edges drive the whole
        conversation through :meth:`rempart.common.edgelogin.LoginAttempt.scram`. The
        conversation lives in Redis for a short time and finishes once: any auth replica may
        answer the second round.
        """
        try:
            reply: auth_pb2.ScramStartResponse = await self._stub.ScramStart(request, timeout=self._timeout)
            return reply
        except grpc.aio.AioRpcError as exc:
            PEER_FAILURES.labels("auth").inc()
            log.warning("auth scram call failed, failing closed: %s", exc.code().name,
                        extra={"session": request.session_id})
            return auth_pb2.ScramStartResponse(status=auth_pb2.AUTH_STATUS_TEMPFAIL)

    async def scram_finish(self, conversation_id: str, client_final: str) -> auth_pb2.ScramFinishResponse:
        """SCRAM-SHA-256, second round: see :meth:`scram_start`. Fail closed: TEMPFAIL."""
        try:
            reply: auth_pb2.ScramFinishResponse = await self._stub.ScramFinish(
                auth_pb2.ScramFinishRequest(conversation_id=conversation_id, client_final=client_final),
                timeout=self._timeout,
            )
            return reply
        except grpc.aio.AioRpcError as exc:
            PEER_FAILURES.labels("auth").inc()
            log.warning("auth scram call failed, failing closed: %s", exc.code().name)
            return auth_pb2.ScramFinishResponse(status=auth_pb2.AUTH_STATUS_TEMPFAIL)

    # Credential management (admin API). These raise grpc.aio.AioRpcError when the auth service
    # fails or refuses the call, which the admin API answers 503 (or 404 for NOT_FOUND): a write
    # that did not happen is never reported as done.
    async def import_hash(self, account: str, scheme_hash: str) -> auth_pb2.ImportHashResponse:
        reply: auth_pb2.ImportHashResponse = await self._stub.ImportHash(
            auth_pb2.ImportHashRequest(account=account, scheme_hash=scheme_hash), timeout=self._timeout
        )
        return reply

    async def totp_enrol(self, account: str, issuer: str) -> auth_pb2.TotpEnrolResponse:
        reply: auth_pb2.TotpEnrolResponse = await self._stub.TotpEnrol(
            auth_pb2.TotpEnrolRequest(account=account, issuer=issuer), timeout=self._timeout
        )
        return reply

    async def totp_confirm(self, account: str, code: str) -> auth_pb2.TotpConfirmResponse:
        reply: auth_pb2.TotpConfirmResponse = await self._stub.TotpConfirm(
            auth_pb2.TotpConfirmRequest(account=account, code=code), timeout=self._timeout
        )
        return reply

    async def totp_disable(self, account: str, code: str) -> auth_pb2.TotpDisableResponse:
        reply: auth_pb2.TotpDisableResponse = await self._stub.TotpDisable(
            auth_pb2.TotpDisableRequest(account=account, code=code), timeout=self._timeout
        )
        return reply

    async def totp_status(self, account: str) -> auth_pb2.TotpStatusResponse:
        reply: auth_pb2.TotpStatusResponse = await self._stub.TotpStatus(
            auth_pb2.TotpStatusRequest(account=account), timeout=self._timeout
        )
        return reply

    async def app_password_create(self, account: str, name: str) -> auth_pb2.AppPasswordCreateResponse:
        reply: auth_pb2.AppPasswordCreateResponse = await self._stub.AppPasswordCreate(
            auth_pb2.AppPasswordCreateRequest(account=account, name=name), timeout=self._timeout
        )
        return reply

    async def app_password_list(self, account: str) -> auth_pb2.AppPasswordListResponse:
        reply: auth_pb2.AppPasswordListResponse = await self._stub.AppPasswordList(
            auth_pb2.AppPasswordListRequest(account=account), timeout=self._timeout
        )
        return reply

    async def app_password_revoke(self, account: str, name: str) -> auth_pb2.AppPasswordRevokeResponse:
        reply: auth_pb2.AppPasswordRevokeResponse = await self._stub.AppPasswordRevoke(
            auth_pb2.AppPasswordRevokeRequest(account=account, name=name), timeout=self._timeout
        )
        return reply

    # Helpdesk (R-ADM-4).
    async def unlock(self, account: str) -> auth_pb2.UnlockResponse:
        reply: auth_pb2.UnlockResponse = await self._stub.Unlock(
            auth_pb2.UnlockRequest(account=account), timeout=self._timeout
        )
        return reply

    async def totp_reset(self, account: str) -> auth_pb2.TotpResetResponse:
        reply: auth_pb2.TotpResetResponse = await self._stub.TotpReset(
            auth_pb2.TotpResetRequest(account=account), timeout=self._timeout
        )
        return reply

    async def app_password_revoke_all(self, account: str) -> auth_pb2.AppPasswordRevokeAllResponse:
        reply: auth_pb2.AppPasswordRevokeAllResponse = await self._stub.AppPasswordRevokeAll(
            auth_pb2.AppPasswordRevokeAllRequest(account=account), timeout=self._timeout
        )
        return reply

    async def close(self) -> None:
        await self.channel.close()
