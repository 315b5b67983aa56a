"""SMTP AUTH (RFC 4954): the mechanisms are the edge kit's (rempart.common.sasl) and so is the
reading of the auth result plus the policy verdict after it (rempart.common.edgelogin); what is
SMTP's own is here: the replies, the failure budget, and when AUTH waits for TLS (R-TLS-2)."""

from __future__ import annotations

from aiosmtpd.smtp import MISSING, AuthResult

from rempart.common import sasl
from rempart.common.clients import AuthClient, PolicySession
from rempart.common.config import SettingsCache
from rempart.common.edgelogin import LoginAttempt, LoginDecision, LoginOutcome
from rempart.common.netmatch import ip_in_networks
from rempart.common.pb.policy.v1 import policy_pb2
from rempart.smtp_edge import replies
from rempart.smtp_edge.session import EdgeSMTP


class _Answered(Exception):
    """The client cancelled or garbled a response and aiosmtpd has already replied."""


class SmtpLogins:
    def __init__(self, auth: AuthClient, config: SettingsCache) -> None:
        self.auth = auth
        self.config = config

    def update_auth_policy(self, server: EdgeSMTP) -> None:
        """R-TLS-2: plaintext AUTH before TLS only for trusted clients, when so configured."""
        if server.listener.implicit_tls or server.listener.require_starttls:
            return  # TLS already, or TLS required before anything (submission)
        settings = self.config.server
        allowed = not settings.tls.plaintext_auth_requires_tls or ip_in_networks(
            server.state.client_ip, settings.relay.trusted_hosts)
        server.require_tls_for_auth(not allowed)

    async def sasl(self, server: EdgeSMTP, mechanism: str, args: list[str], policy: PolicySession,
                   facts: policy_pb2.SessionFacts) -> AuthResult:
        async def challenge(data: bytes) -> bytes:
            answer = await server.challenge_auth(data)
            if answer is MISSING:
                raise _Answered  # aiosmtpd has answered "*" (501 5.7.0) or bad base64 (501 5.5.2)
            assert isinstance(answer, bytes)
            return answer

        attempt = LoginAttempt(self.auth, policy, self.config.server.login, facts, "smtp")
        try:
            initial = sasl.decode_response(args[1], initial=True) if len(args) > 1 else None
            decision = await attempt.sasl(mechanism, initial, challenge)
        except _Answered:
            return AuthResult(success=False, handled=True)
        except sasl.SaslCancelled:
            await server.push(replies.AUTH_ABORTED)
            return AuthResult(success=False, handled=True)
        except sasl.SaslMalformed as exc:
            await server.push(replies.AUTH_MALFORMED.format(error=exc))
            return AuthResult(success=False, handled=True)
        return await self._result(server, decision)

    async def _result(self, server: EdgeSMTP, decision: LoginDecision) -> AuthResult:
        """The kit's reading of auth and policy, in SMTP's words; budgets are SMTP's own."""
        if decision.close and decision.verdict is not None:
            await server.apply_verdict("auth", decision.verdict)
            return AuthResult(success=False, handled=True)
        if decision.outcome is LoginOutcome.TEMPFAIL:
            return AuthResult(success=False, handled=False, message=replies.AUTH_TEMPFAIL)
        if decision.outcome is LoginOutcome.FAILED:
            server.state.auth_failures += 1
            if server.state.auth_failures >= self.config.server.smtp.auth_failure_budget:
                await server.push(replies.TOO_MANY_AUTH_FAILURES)
                server.close_now()
                return AuthResult(success=False, handled=True)
            # R-LOG-4: the same reply whatever the reason (unknown, locked, restricted).
            return AuthResult(success=False, handled=False, message=replies.AUTH_INVALID)
        server.state.authenticated_account = decision.account
        return AuthResult(success=True, auth_data=decision.account, message=replies.AUTH_OK)
